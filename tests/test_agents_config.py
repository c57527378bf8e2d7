"""The config surface of the agent kinds: ``[agent] kind`` and its default command, the flags a
kind manages, ``stall_timeout``, ``max_usage_wait``, ``[max_cost_usd]``; bad input gets the
usual one-paragraph error naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from supervisor.agents import KINDS
from supervisor.config import AgentKindName, FleetConfig, load_config
from supervisor.config_errors import ConfigError


def _load(tmp_path: Path, text: str) -> FleetConfig:
    file = tmp_path / "fleet.toml"
    file.write_text('repository = "git@example.invalid:me/x.git"\n' + text)
    return load_config(file)


def test_the_config_knows_every_kind() -> None:
    assert set(get_args(AgentKindName)) == set(KINDS)


def test_defaults_keep_todays_behaviour(tmp_path: Path) -> None:
    config = _load(tmp_path, "")
    assert config.agent.kind == "command"
    assert config.agent.command == ["claude", "-p", "{prompt}", "--dangerously-skip-permissions"]
    assert config.agent.stall_timeout == 1800.0
    assert config.max_usage_wait == 12 * 3600.0
    assert config.max_cost_usd.task is None and config.max_cost_usd.fleet is None
    assert "{issue}" in config.agent.continue_prompt


@pytest.mark.parametrize("kind", ["claude", "codex", "gemini"])
def test_each_kind_has_its_default_command(tmp_path: Path, kind: str) -> None:
    config = _load(tmp_path, f'[agent]\nkind = "{kind}"\n')
    assert config.agent.command == list(KINDS[kind].default_command)


def test_a_kind_with_the_users_command(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        '[agent]\nkind = "claude"\n'
        'command = ["/opt/claude/bin/claude", "--model", "opus"]\n'
        "stall_timeout = 0\n"
        "[max_cost_usd]\ntask = 5\nfleet = 50.5\n",
    )
    assert config.agent.command == ["/opt/claude/bin/claude", "--model", "opus"]
    assert config.agent.stall_timeout == 0
    assert config.max_cost_usd.task == 5.0 and config.max_cost_usd.fleet == 50.5


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[agent]\nkind = "cursor"\n', ["`agent.kind`", "'claude'", "cursor"]),
        (
            '[agent]\nkind = "claude"\ncommand = ["claude", "-p", "{prompt}"]\n',
            ["`agent.command`", "'-p'", "'claude'", "remove it"],
        ),
        (
            '[agent]\nkind = "claude"\ncommand = ["claude", "--output-format", "json"]\n',
            ["`agent.command`", "'--output-format'"],
        ),
        ('[agent]\nkind = "codex"\ncommand = ["codex", "exec"]\n', ["'exec'", "'codex'"]),
        (
            '[agent]\nkind = "gemini"\ncommand = ["gemini", "--resume", "latest"]\n',
            ["'--resume'", "'gemini'"],
        ),
        (
            '[agent]\nkind = "claude"\n'
            'command = ["claude", "--append-system-prompt", "{prompt}"]\n',
            ["'{prompt}'", "passes the prompt itself"],
        ),
        ("[agent]\nstall_timeout = -5\n", ["`agent.stall_timeout`"]),
        ("max_usage_wait = -1\n", ["`max_usage_wait`"]),
        ("[max_cost_usd]\ntask = 0\n", ["`max_cost_usd.task`"]),
        ("[max_cost_usd]\nweekly = 3\n", ["`max_cost_usd.weekly`"]),
    ],
)
def test_bad_input_is_one_clear_paragraph(tmp_path: Path, text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    message = str(caught.value)
    assert "fleet.toml" in message and "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message


def test_kind_command_accepts_any_flags(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        '[agent]\ncommand = ["claude", "-p", "{prompt}", "--verbose",'
        ' "--output-format", "stream-json"]\n',
    )
    assert config.agent.kind == "command"


def test_env_override_of_the_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTIZE_FLEET_AGENT__KIND", "codex")
    config = _load(tmp_path, "")
    assert config.agent.kind == "codex" and config.agent.command == ["codex"]


def test_a_relative_command_keeps_its_name_through_a_symbolic_link(tmp_path: Path) -> None:
    """``scripts/fake-claude`` is a link to ``fake-agent``, which speaks Claude's protocol only
    when called by that name: the path is made absolute, never resolved."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "real").write_text("")
    (tmp_path / "bin" / "alias").symlink_to("real")
    config = _load(tmp_path, '[agent]\nkind = "claude"\ncommand = ["bin/alias"]\n')
    assert config.agent_command[0] == str(tmp_path.absolute() / "bin" / "alias")
