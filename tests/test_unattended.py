"""Unattended runs (issue 5): deadlines, cron's bare environment, the GitHub task source through
a fake ``gh``, usage-limit pauses, the morning report and its notification hooks."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

from tests.conftest import AGENT, ROOT, Harness, task, wait_for

CLI = Path(sys.executable).parent / "agentize-fleet"


def test_deadline_stops_new_runs_lets_one_finish_and_kills_one_past_grace(fleet: Harness) -> None:
    cfg = fleet.write(
        fleet.config(
            [
                task(1, "sleep:3+finish"),  # ends inside the grace period
                task(2, "hang"),  # still running at the hard deadline: stopped
                task(3, "finish"),  # never starts: the cap is full until the soft deadline
            ],
            concurrency=2,
            stop_timeout=2,
        )
    )
    run = fleet.run(cfg, "--max-duration", "2s", "--grace", "3s", timeout=40)
    assert run.returncode == 5, run.explain()
    states = {w["task"]: w["state"] for w in run.summary["workers"]}
    assert states == {1: "done", 2: "stopped", 3: "stopped"}
    assert run.events("deadline-soft") and run.events("deadline-hard")
    assert run.elapsed < 2 + 3 + 2 + 10
    report = json.loads((run.run_dir / "report.json").read_text())
    assert report["exit_code"] == 5
    assert sorted(report["left"]) == [2, 3]
    assert "left unfinished: #2, #3" in (run.run_dir / "report.md").read_text()
    assert [r["issue"] for r in fleet.agent_records("start")].count(3) == 0


def test_cron_bare_environment_without_tty(fleet: Harness, tmp_path: Path) -> None:
    """``env -i HOME=… PATH=/usr/bin:/bin agentize-fleet up -c FILE``, from another directory."""
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    shutil.copy(AGENT, conf_dir / "agent")
    config = fleet.config([task(1, "finish"), task(2, "milestone,finish")])
    config.update(repository="../origin", workspace_root="ws", state_dir="state")
    config["agent"]["command"] = ["./agent", "{prompt}"]
    config["agent"]["env"].pop("FAKE_AGENT_RECORD")
    cfg = conf_dir / "fleet.toml"
    from tests.conftest import to_toml

    cfg.write_text(to_toml(config))
    env = {"HOME": str(fleet.home), "PATH": "/usr/bin:/bin", "AGENTIZE_E2E_TEST_MARK": fleet.mark}
    done = subprocess.run(
        [str(CLI), "up", "-c", str(cfg), "--once"],
        cwd="/",
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "\x1b[" not in done.stdout  # no colour without a TTY
    assert (conf_dir / "ws" / "origin.git" / "trees" / "issue-2").is_dir()
    summaries = list((conf_dir / "state" / "runs").glob("*/summary.json"))
    assert len(summaries) == 1
    assert json.loads(summaries[0].read_text())["exit_code"] == 0


def _fake_gh(bin_dir: Path, log: Path, *, fail: bool = False) -> None:
    issues = [
        {
            "number": 11,
            "title": "Add the widget",
            "labels": [{"name": "agentize:plan"}],
            "state": "OPEN",
        },
        {
            "number": 12,
            "title": "Already has a PR",
            "labels": [{"name": "agentize:plan"}],
            "state": "OPEN",
        },
        {
            "number": 13,
            "title": "Marked done",
            "labels": [{"name": "agentize:plan"}, {"name": "agentize:done"}],
            "state": "OPEN",
        },
    ]
    prs = [
        {
            "number": 99,
            "headRefName": "feature-x",
            "body": "Closes #12",
            "closingIssuesReferences": [],
        }
    ]
    script = f"""\
        #!/bin/sh
        printf '%s\\n' "$*" >> {log}
        {"echo 'error: gh auth login required' >&2; exit 1" if fail else ""}
        case "$1 $2" in
          "issue list") printf '%s' '{json.dumps(issues)}' ;;
          "pr list") printf '%s' '{json.dumps(prs)}' ;;
          *) echo "unexpected: $*" >&2; exit 1 ;;
        esac
        """
    gh = bin_dir / "gh"
    gh.write_text(textwrap.dedent(script))
    gh.chmod(0o755)


def _github_config(fleet: Harness) -> Path:
    config = fleet.config([])
    config["tasks"] = {
        "source": "github",
        "labels": ["agentize:plan"],
        "skip_labels": ["agentize:done"],
    }
    return fleet.write(config)


def test_github_source_through_gh(fleet: Harness, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gh.log"
    _fake_gh(bin_dir, log)
    path = f"{bin_dir}:{os.environ['PATH']}"
    run = fleet.run(_github_config(fleet), env={"PATH": path})
    assert run.returncode == 0, run.explain()
    assert [w["task"] for w in run.summary["workers"]] == [11]
    assert run.task_summary(11)["title"] == "Add the widget"
    calls = log.read_text()
    assert "issue list" in calls and "--label agentize:plan" in calls and "pr list" in calls


def test_github_source_missing_or_failing_gh_is_a_clear_error(
    fleet: Harness, tmp_path: Path
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    git = shutil.which("git")
    assert git is not None
    (empty / "git").symlink_to(git)
    run = fleet.run(_github_config(fleet), env={"PATH": str(empty)})
    assert run.returncode == 2
    assert "gh" in run.stderr and "Traceback" not in run.stderr
    assert "fleet.toml" in run.stderr

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_gh(bin_dir, tmp_path / "gh.log", fail=True)
    run = fleet.run(_github_config(fleet), env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert run.returncode == 2
    assert "gh auth login" in run.stderr and "Traceback" not in run.stderr


def test_usage_limit_pauses_the_machine_and_resumes_without_a_crash(fleet: Harness) -> None:
    cfg = fleet.write(
        fleet.config([task(1, "usage-limit:3,finish"), task(2, "finish")], concurrency=1)
    )
    run = fleet.run(cfg, timeout=40)
    assert run.returncode == 0, run.explain()
    first = run.task_summary(1)
    assert first["state"] == "done" and first["crashes"] == 0 and first["usage_pauses"] == 1
    assert first["runs"] == 2
    (event,) = run.events("usage-limit")
    reset_at = event["reset_at"]
    assert reset_at is not None
    assert run.events("machine-paused") and run.events("machine-resumed")
    # Nothing started on the paused machine before the reset time.
    later = [r for r in fleet.agent_records("start") if (r["issue"], r["run"]) != (1, 1)]
    assert later and all(r["t"] >= reset_at - 0.05 for r in later)
    assert fleet.runs_of(1)[1]["argv"] == ["Continue from the latest milestone"]


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[bytes] = []  # noqa: RUF012

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        _Hook.received.append(self.rfile.read(length))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_report_rows_and_notifications(fleet: Harness, tmp_path: Path) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    notified = tmp_path / "notified.txt"
    try:
        config = fleet.config(
            [task(1, "finish"), task(2, "milestone,finish"), task(3, "crash:4")],
            restart={"backoff_base": 0.01, "backoff_max": 0.02, "max_crashes": 1},
        )
        config["notify"] = {
            "command": [
                sys.executable,
                "-c",
                f"import sys; open({str(notified)!r}, 'w').write(sys.argv[1])",
                "{report}",
            ],
            "webhook": f"http://127.0.0.1:{server.server_port}/hook",
        }
        run = fleet.run(fleet.write(config))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert run.returncode == 1, run.explain()
    report_json = run.run_dir / "report.json"
    data = json.loads(report_json.read_text())
    rows = {t["task"]: t for t in data["tasks"]}
    assert rows[1]["state"] == "done" and rows[1]["commits"][0].endswith("issue 1: implement")
    assert rows[2]["milestones"] == 1 and "Work Remaining" not in rows[2]["work_remaining"]
    assert rows[2]["work_remaining"].startswith("-")
    assert rows[2]["latest_milestone"] == ".tmp/milestones/issue-2-milestone-1.md"
    assert rows[3]["state"] == "failed" and rows[3]["crashes"] == 2
    assert any("crashing with exit 4" in line for line in rows[3]["last_crash_output"])
    assert len(rows[3]["last_crash_output"]) <= 20
    assert data["totals"]["done"] == 2 and data["totals"]["failed"] == 1
    md = (run.run_dir / "report.md").read_text()
    assert "| #3 |" in md and "failed" in md and "exit code **1**" in md
    assert notified.read_text() == str(report_json)
    assert _Hook.received and json.loads(_Hook.received[-1]) == data

    # `report` rebuilds it after the fact.
    again = subprocess.run(
        [str(CLI), "report", "-c", str(fleet.tmp / "fleet.toml"), "--print"],
        capture_output=True,
        text=True,
        timeout=60,
        env=fleet.env(),
        cwd=ROOT,
    )
    assert again.returncode == 0, again.stderr
    assert "| #2 |" in again.stdout


def test_failed_notification_is_logged_not_fatal(fleet: Harness) -> None:
    config = fleet.config([task(1, "finish")])
    config["notify"] = {"command": ["/nonexistent/notify"], "webhook": "http://127.0.0.1:9/x"}
    run = fleet.run(fleet.write(config))
    assert run.returncode == 0, run.explain()
    problems = run.events("notify-failed")
    assert len(problems) == 2


def test_ctrl_c_during_the_report_skips_only_the_report(fleet: Harness, tmp_path: Path) -> None:
    """A Ctrl-C while the report's notification hook runs ends the hook, not the fleet's own
    end: the summary, every record (the agent's lines included), the exit code of the work."""
    hooked = tmp_path / "hook-started"
    config = fleet.config([task(1, "finish")])
    config["notify"] = {
        "command": ["sh", "-c", f'echo $$ >"{hooked}"; exec sleep 60', "sh"],
        "timeout": 120,
    }
    started = fleet.start(fleet.write(config))
    hook_pid = int(
        wait_for(
            lambda: hooked.exists() and hooked.read_text().strip(), 30, "the notify hook to start"
        )
    )
    os.killpg(started.popen.pid, signal.SIGINT)
    run = started.wait(20)
    assert run.returncode == 0, run.explain()  # the work was done; only the hook was cut off
    assert run.summary["exit_code"] == 0
    (skipped,) = run.events("report-skipped")
    assert "SIGINT" in skipped["line"] and "agentize-fleet report --shift" in skipped["line"]
    assert run.events("fleet-ended"), "the fleet ended in order"
    assert "Traceback" not in run.stderr
    lines = [r["line"] for r in run.records if r["stream"] == "stdout" and r["task"] == 1]
    assert "All tests passed (3/3)!" in lines
    run.assert_seq_gapless()
    wait_for(lambda: not _alive(hook_pid), 10, "the notify hook to be gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_watch_polls_the_github_source_for_new_issues(fleet: Harness, tmp_path: Path) -> None:
    """``--watch`` re-reads the source every poll interval; the deadline ends the watch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    issues_file = tmp_path / "issues.json"
    issues_file.write_text(
        json.dumps([{"number": 21, "title": "First", "labels": [], "state": "OPEN"}])
    )
    gh = bin_dir / "gh"
    gh.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        case "$1 $2" in
          "issue list") cat {issues_file} ;;
          "pr list") echo '[]' ;;
        esac
        """)
    )
    gh.chmod(0o755)
    config = fleet.config([])
    config["tasks"] = {"source": "github", "poll_interval": 0.5}
    started = fleet.start(
        fleet.write(config),
        "--watch",
        "--max-duration",
        "5s",
        "--grace",
        "2s",
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    import time

    deadline = time.monotonic() + 20
    while not fleet.runs_of(21) and time.monotonic() < deadline:
        time.sleep(0.1)
    issues_file.write_text(
        json.dumps(
            [
                {"number": 21, "title": "First", "labels": [], "state": "OPEN"},
                {"number": 22, "title": "Filed later", "labels": [], "state": "OPEN"},
            ]
        )
    )
    run = started.wait(30)
    assert run.returncode == 0, run.explain()
    states = {w["task"]: w["state"] for w in run.summary["workers"]}
    assert states == {21: "done", 22: "done"}
    assert [e["task"] for e in run.events("task-added")] == [22]
    assert run.events("deadline-soft")


def test_two_fleets_never_share_a_workspace_root(fleet: Harness) -> None:
    """Another state directory does not make another fleet welcome on the same worktrees."""
    first_cfg = fleet.write(fleet.config([task(1, "hang")]), "first.toml")
    first = fleet.start(first_cfg)

    wait_for(lambda: fleet.runs_of(1), 20, "the first fleet's agent")
    second_cfg = fleet.write(
        fleet.config([task(2, "finish")], state_dir=str(fleet.tmp / "other-state")), "second.toml"
    )
    second = fleet.run(second_cfg, timeout=20)
    assert second.returncode == 4, second.explain()
    assert f"pid {first.popen.pid}" in second.stderr
    assert str(fleet.workspace_root) in second.stderr
    os.kill(first.popen.pid, signal.SIGTERM)
    assert first.wait(30).returncode == 130
