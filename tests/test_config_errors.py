"""Bad configs end ``agentize-fleet up`` with exit 2 and one clear message; overrides work.

Every case runs the real CLI as a subprocess: the message must name the file, the field and
the fix, and never show a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Harness, task, to_toml

CONFIG_TIMEOUT = 20.0


def _assert_usage_error(result: Any, path: Path | str, *needles: str) -> None:
    """Exit 2, one paragraph naming ``path`` (the file, or the flag or variable at fault), the
    needles and a fix; no traceback; no shift started."""
    err = result.stderr
    assert result.returncode == 2, result.explain()
    assert "Traceback" not in err and "Traceback" not in result.stdout, err
    assert str(path) in err, err
    assert "fix" in err, err
    assert "(top level)" not in err and "(TOP LEVEL)" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    if isinstance(path, Path):
        assert not list(path.parent.glob("state/runs/*")), "a run was started from a bad config"


def _without(config: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in keys}


# Each case: a change to a valid config, and what the message must name.
INVALID: dict[str, tuple[Any, tuple[str, ...]]] = {
    "unknown-field": (lambda c: {**c, "colour": "red"}, ("colour",)),
    "unknown-nested-field": (
        lambda c: {**c, "restart": {**c["restart"], "max_crash": 2}},
        ("restart.max_crash",),
    ),
    "wrong-type": (lambda c: {**c, "concurrency": "many"}, ("concurrency", "many")),
    "missing-repository": (lambda c: _without(c, "repository"), ("repository",)),
    "concurrency-0": (lambda c: {**c, "concurrency": 0}, ("concurrency",)),
    "unknown-placeholder": (
        lambda c: {**c, "agent": {**c["agent"], "command": ["fake-agent", "{promt}"]}},
        ("agent.command", "{promt}"),
    ),
    "task-without-issue": (lambda c: {**c, "tasks": [{"title": "no number"}]}, ("issue",)),
    # Rules over several fields name the fields, not "(top level)".
    "duplicate-issue": (
        lambda c: {**c, "tasks": [{"issue": 1}, {"issue": 2}, {"issue": 1}]},
        ("`tasks.0.issue` and `tasks.2.issue`", "issue 1 is listed twice"),
    ),
    "no-machine-can-run": (
        lambda c: {**c, "local": {"max_agents": 0}},
        ("`local.max_agents`", "`machines`"),
    ),
    "task-on-unknown-machine": (
        lambda c: {**c, "tasks": [{"issue": 1, "machine": "gpu"}]},
        ("`tasks.0.machine`", "'gpu'"),
    ),
    "two-machines-one-name": (
        lambda c: {**c, "machines": [{"name": "m", "host": "a"}, {"name": "m", "host": "b"}]},
        ("`machines.0.name` and `machines.1.name`",),
    ),
    # An unknown key: the nearest known key, not an environment variable with the same typo.
    "misspelt-key": (lambda c: {**c, "concurency": 2}, ("did you mean `concurrency`?",)),
    "misspelt-nested-key": (
        lambda c: {**c, "restart": {**c["restart"], "max_crash": 2}},
        ("did you mean `max_crashes`?",),
    ),
    "misspelt-task-key": (
        lambda c: {**c, "tasks": [{"issue": 5, "titel": "x"}]},
        ("tasks.0.titel", "(issue 5)", "did you mean `title`?"),
    ),
    # Strict types for task fields: no bool, string or float taken for an issue number.
    "issue-true": (lambda c: {**c, "tasks": [{"issue": True}]}, ("tasks.0.issue", "True")),
    "issue-string": (lambda c: {**c, "tasks": [{"issue": "7"}]}, ("tasks.0.issue", "'7'")),
    "issue-float": (lambda c: {**c, "tasks": [{"issue": 1e9}]}, ("tasks.0.issue",)),
    # A title no run could be started with is refused up front, naming the task.
    "nul-in-title": (
        lambda c: {**c, "tasks": [{"issue": 42, "title": "a\0b"}]},
        ("tasks.0.title", "issue 42", "NUL"),
    ),
    "huge-title": (
        lambda c: {**c, "tasks": [{"issue": 43, "title": "x" * (128 * 1024)}]},
        ("tasks.0.title", "issue 43", "MAX_ARG_STRLEN"),
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_config_exits_2_with_file_field_and_fix(fleet: Harness, case: str) -> None:
    change, needles = INVALID[case]
    path = fleet.write(change(fleet.config([task(1)])))
    result = fleet.run(path, timeout=CONFIG_TIMEOUT)
    _assert_usage_error(result, path, *needles)
    assert "[env override: AGENTIZE_FLEET_CONCURENCY]" not in result.stderr


def test_bad_toml_syntax(fleet: Harness) -> None:
    text = to_toml(fleet.config([task(1)])).replace("concurrency = 3", "concurrency = = 3")
    assert "concurrency = = 3" in text
    path = fleet.write(text)
    line = text.splitlines().index("concurrency = = 3") + 1
    result = fleet.run(path, timeout=CONFIG_TIMEOUT)
    _assert_usage_error(result, path, f"line {line}")


def test_missing_config_file(fleet: Harness) -> None:
    path = fleet.tmp / "no-such-fleet.toml"
    result = fleet.run(path, timeout=CONFIG_TIMEOUT)
    _assert_usage_error(result, path, "does not exist")


def test_bad_value_from_the_environment(fleet: Harness) -> None:
    path = fleet.write(fleet.config([task(1)]))
    result = fleet.run(path, env={"AGENTIZE_FLEET_CONCURRENCY": "0"}, timeout=CONFIG_TIMEOUT)
    _assert_usage_error(
        result, path, "environment variable AGENTIZE_FLEET_CONCURRENCY='0'", "`concurrency`"
    )


@pytest.mark.parametrize("value", ["0", "-2"])
def test_bad_flag_value_names_the_flag(fleet: Harness, value: str) -> None:
    path = fleet.write(fleet.config([task(1)]))
    result = fleet.run(path, "--concurrency", value, timeout=CONFIG_TIMEOUT)
    _assert_usage_error(result, f"--concurrency {value}:", "1 or more")
    assert str(path) not in result.stderr, "a bad flag is blamed on the config file"


def test_list_from_the_environment_says_how_to_write_it(fleet: Harness) -> None:
    path = fleet.write(fleet.config([task(1)]))
    result = fleet.run(
        path, env={"AGENTIZE_FLEET_AGENT__COMMAND": "claude"}, timeout=CONFIG_TIMEOUT
    )
    _assert_usage_error(
        result,
        "AGENTIZE_FLEET_AGENT__COMMAND='claude'",
        "a list is expected",
        """'["claude","-p","{prompt}"]'""",
    )
    assert "EnvSettingsSource" not in result.stderr and "error parsing" not in result.stderr


def test_misspelt_environment_variable_is_warned_about(fleet: Harness) -> None:
    """A typo in a variable's name would do nothing at all: one warning line names it and the
    nearest real one; the run goes on (exit 0)."""
    path = fleet.write(fleet.config([task(1)]))
    result = fleet.run(
        path,
        env={
            "AGENTIZE_FLEET_CONCURENCY": "1",
            "AGENTIZE_FLEET_RESTART__MAX_CRASH": "4",
            "AGENTIZE_FLEET_ISSUE": "9",
        },
    )  # a run's own: no warning
    assert result.returncode == 0, result.explain()
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "agentize-fleet: warning: environment variable AGENTIZE_FLEET_CONCURENCY is not a "
        "config field and is ignored; did you mean AGENTIZE_FLEET_CONCURRENCY?",
        "agentize-fleet: warning: environment variable AGENTIZE_FLEET_RESTART__MAX_CRASH is not "
        "a config field and is ignored; did you mean AGENTIZE_FLEET_RESTART__MAX_CRASHES?",
    ], result.stderr


def test_repository_that_is_not_a_git_repository(fleet: Harness) -> None:
    """Exists, but git cannot clone it: refused before any task, not failed once per task."""
    plain = fleet.tmp / "plain-dir"
    plain.mkdir()
    inside = fleet.origin / "sub"  # inside a work tree, but not a repository of its own
    inside.mkdir()
    for repo in (plain, inside):
        config = fleet.config([task(1), task(2)])
        config["repository"] = str(repo)
        path = fleet.write(config)
        result = fleet.run(path, timeout=CONFIG_TIMEOUT)
        _assert_usage_error(result, path, "`repository`", "not a git repository", str(repo))
        assert not fleet.agent_records(), "an agent was started"


# -- overrides ----------------------------------------------------------------------------------


def _slow_tasks(fleet: Harness) -> Path:
    return fleet.write(
        fleet.config(
            [task(n) for n in range(1, 5)],
            concurrency=3,
            agent={"env": {"FAKE_AGENT_STEPS": "3", "FAKE_AGENT_STEP_DELAY": "0.1"}},
        )
    )


def test_environment_overrides_the_file(fleet: Harness) -> None:
    result = fleet.run(_slow_tasks(fleet), env={"AGENTIZE_FLEET_CONCURRENCY": "1"})
    assert result.returncode == 0, result.explain()
    assert len(fleet.agent_records("end")) == 4
    assert fleet.max_concurrent() == 1
    assert result.summary["concurrency"] == 1


def test_flag_overrides_the_environment(fleet: Harness) -> None:
    result = fleet.run(
        _slow_tasks(fleet), "--concurrency", "2", env={"AGENTIZE_FLEET_CONCURRENCY": "1"}
    )
    assert result.returncode == 0, result.explain()
    assert len(fleet.agent_records("end")) == 4
    assert fleet.max_concurrent() == 2
    assert result.summary["concurrency"] == 2


def test_nested_environment_override(fleet: Harness) -> None:
    path = fleet.write(
        fleet.config(
            [task(1, "crash:1"), task(2)],
            restart={"max_crashes": 5, "backoff_base": 0.01, "backoff_max": 0.02},
        )
    )
    result = fleet.run(path, env={"AGENTIZE_FLEET_RESTART__MAX_CRASHES": "1"})
    assert result.returncode == 1, result.explain()
    assert result.task_summary(1)["runs"] == 2  # more than 1 crash: failed at the 2nd
    assert result.task_summary(2)["state"] == "done"


def test_missing_repository_or_agent_program_is_a_config_error(fleet: Harness) -> None:
    config = fleet.config([task(1, "finish")])
    config["repository"] = str(fleet.tmp / "no-such-repo")
    run = fleet.run(fleet.write(config))
    assert run.returncode == 2
    assert "`repository`" in run.stderr and "does not exist" in run.stderr
    assert "Traceback" not in run.stderr

    config = fleet.config([task(1, "finish")])
    config["agent"]["command"] = ["no-such-agent-program", "{prompt}"]
    run = fleet.run(fleet.write(config))
    assert run.returncode == 2
    assert "agent.command" in run.stderr and "no-such-agent-program" in run.stderr
    assert "fix:" in run.stderr and "Traceback" not in run.stderr
