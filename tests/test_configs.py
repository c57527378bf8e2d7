"""The bundled configs load and say what the README says they say (none of them is run here)."""

from __future__ import annotations

from pathlib import Path

from supervisor.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_example_config_is_claude_code_headless() -> None:
    config = load_config(CONFIGS / "fleet.example.toml")
    assert config.agent.kind == "claude"
    assert config.agent.command == ["claude", "--dangerously-skip-permissions"]
    assert config.agent.first_prompt == "/issue-to-impl {issue}"
    assert config.agent.resume_prompt == "Continue from the latest milestone"
    assert config.concurrency == 3
    assert config.worktree_name == "issue-{issue}"
    assert [t.issue for t in config.tasks.items] == [42, 57]


def test_demo_config_paths_resolve_against_its_directory() -> None:
    config = load_config(CONFIGS / "demo.toml")
    root = CONFIGS.parent
    assert config.repository_url == str(root / ".demo" / "origin")
    assert config.agent_command[0] == str(root / "scripts" / "fake-agent")
    assert config.state_path == root / ".demo" / "state"
    assert [t.issue for t in config.tasks.items] == [1, 2, 3, 4, 5, 6]
    plans = {t.issue: t.env["FAKE_AGENT_PLAN"] for t in config.tasks.items}
    assert "milestone" in plans[2] and plans[3].startswith("crash")
