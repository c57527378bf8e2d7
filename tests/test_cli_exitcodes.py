"""One exit-code rule for every command (supervisor/exitcodes.py), on the real CLI:

* 2: nothing was done because of what was asked: an unknown shift, task or machine, a request
  the running fleet refuses;
* 1: the command ran and failed (a machine that cannot run agents in ``check``);
* 3: nothing to act on (no shift recorded yet, no fleet running).

And a failure is said once: ``check``'s table row, not a log line beside it; ``up``'s line
for an unreachable machine, not the SSH layer's as well.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, Harness, clean_env, task
from fleet_helpers import wait_ready
from test_cli_conventions import SHIFT, shift_dir

from supervisor.exitcodes import EXIT_FAILED, EXIT_NOTHING, EXIT_USAGE

TIMEOUT = 30


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args],
        cwd=ROOT,
        env=env or clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_unknown_shift_is_a_usage_error_for_logs_and_report(tmp_path: Path) -> None:
    state = shift_dir(tmp_path)
    config = tmp_path / "fleet.toml"
    config.write_text(f'repository = "{tmp_path}"\nstate_dir = "state"\n')
    for argv in (
        ["logs", "--shift", "nope"],
        ["logs", "--run", "nope"],
        ["report", "--shift", "nope"],
        ["report", "--run", "nope"],
    ):
        done = run(*argv, "-c", str(config))
        assert done.returncode == EXIT_USAGE, (argv, done.stderr)
        assert "no shift 'nope'" in done.stderr and SHIFT in done.stderr, done.stderr
    done = run("shifts", "--state-dir", str(state), "--json")
    assert done.returncode == 0 and json.loads(done.stdout)[0]["run"] == SHIFT


def test_no_shift_at_all_is_nothing_to_do(tmp_path: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text(f'repository = "{tmp_path}"\nstate_dir = "empty"\n')
    for argv in (["logs"], ["logs", "--shift", "x"], ["report"], ["shifts"], ["runs"]):
        done = run(*argv, "-c", str(config))
        assert done.returncode == EXIT_NOTHING, (argv, done.stderr)


def test_logs_names_an_unknown_task_machine_or_worker(tmp_path: Path) -> None:
    state = shift_dir(tmp_path)
    for flag, value, needle in (
        ("--task", "555", "no such task: 555"),
        ("--machine", "nosuch", "no such machine: nosuch"),
        ("--worker", "w9", "no such worker: w9"),
    ):
        done = run("logs", "--state-dir", str(state), flag, value)
        assert done.returncode == EXIT_USAGE, (flag, done.stderr)
        assert needle in done.stderr and "Traceback" not in done.stderr
        assert done.stdout == ""
    known = run("logs", "--state-dir", str(state), "--task", "7", "--machine", "local")
    assert known.returncode == 0 and "line 3" in known.stdout, known.stderr


def test_logs_knows_a_task_found_only_in_the_log(tmp_path: Path) -> None:
    """A task added while the shift ran is in its records, not in its config or summary."""
    state = shift_dir(tmp_path)
    log = state / "runs" / SHIFT / "fleet.jsonl"
    added = {
        "ts": "2026-01-01T00:01:00.000Z",
        "fleet": SHIFT,
        "worker": "w2",
        "task": 57,
        "machine": "box",
        "run": 1,
        "stream": "stdout",
        "seq": 1,
        "line": "added one",
    }
    with log.open("a") as handle:
        handle.write(json.dumps(added, separators=(",", ":")) + "\n")
    done = run("logs", "--state-dir", str(state), "--task", "57", "--machine", "box")
    assert done.returncode == 0, done.stderr
    assert "added one" in done.stdout and "line 1" not in done.stdout


def test_refusals_of_the_running_fleet_are_usage_errors(fleet: Harness) -> None:
    config = fleet.write(fleet.config([task(1, "hang")]))
    started = fleet.start(config)
    wait_ready(started)
    env = fleet.env()
    try:
        unknown = run("restart", "1234", "-c", str(config), env=env)
        assert unknown.returncode == EXIT_USAGE, unknown.stderr
        assert "#1234" in unknown.stderr
        duplicate = run("add", "1", "-c", str(config), env=env)
        assert duplicate.returncode in (0, EXIT_USAGE), duplicate.stderr  # 0: add idempotent
        # Fits in this command's argv, but not in AGENTIZE_FLEET_TITLE=... of the run's env.
        long_title = run("add", "10", "--title", "x" * 131_060, "-c", str(config), env=env)
        assert long_title.returncode == EXIT_USAGE, long_title.stderr
        assert "task #10" in long_title.stderr and "--title" in long_title.stderr
        assert "usage: agentize-fleet add" in long_title.stderr
    finally:
        run("down", "-c", str(config), env=env)
    assert started.wait(60).returncode == 130


def test_check_says_an_unreachable_machine_once_and_exits_1(
    fleet: Harness, closed_port: int
) -> None:
    config = fleet.config([task(1)])
    config["machines"] = [
        {"name": "box", "host": "127.0.0.3", "port": closed_port, "connect_timeout": 3}
    ]
    path = fleet.write(config)
    done = run("check", "-c", str(path), env=fleet.env())
    assert done.returncode == EXIT_FAILED, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("box ")]
    assert len(rows) == 1 and "refused" in rows[0], done.stdout
    assert done.stderr == "", "the table says it; a log line would say it twice"


def test_up_says_an_unreachable_machine_once(fleet: Harness, closed_port: int) -> None:
    config = fleet.config([task(1)])
    config["machines"] = [
        {
            "name": "box",
            "host": "127.0.0.3",
            "port": closed_port,
            "connect_timeout": 3,
            "max_agents": 1,
        }
    ]
    result = fleet.run(fleet.write(config), "--no-colour")
    assert result.returncode == 0, result.explain()
    said = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "connection refused" in line
    ]
    assert len(said) == 1, said
