"""Steering a running fleet from another process: ``status``, ``down``, ``restart``, ``add``,
``pause``/``resume``, ``runs``, the one-``up``-per-state-directory lock and the control socket.

Each test runs the real ``agentize-fleet up`` in the background (the ``fleet`` fixture kills
whatever is left, by pid) and the real CLI, or raw bytes on the socket, against it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import tempfile
import time
from pathlib import Path

import anyio
import pytest
from conftest import Harness, task
from fleet_helpers import (
    agent_pids,
    alive,
    cli,
    events,
    explain,
    only_run_dir,
    raw_request,
    read_json,
    request,
    run_records,
    try_status,
    wait_for,
    wait_ready,
    wait_states,
    workers_by_task,
)

from supervisor import control
from supervisor.ledger import Ledger
from supervisor.rundir import socket_path

# A crash backoff long enough that a crashed task is still in backoff when the test looks
# (full jitter: the delay is uniform in [0, base), so the base is far above the test's length).
GRANDCHILD = re.compile(r"^fake-agent: grand(?:-grand)?child pid (\d+)$")
LONG_BACKOFF = {"backoff_base": 100000.0, "backoff_max": 100000.0}


def test_status_json_shows_backoff_running_and_done(fleet: Harness) -> None:
    config = fleet.write(
        fleet.config(
            [task(1, "crash:1,finish"), task(2, "hang"), task(3, "finish")],
            restart=LONG_BACKOFF,
        )
    )
    up = fleet.start(config)
    wait_ready(up)
    wanted = {1: "backoff", 2: "running", 3: "done"}

    # Poll the socket (cheap), then read the same through the CLI.
    wait_states(up, wanted)

    def output_seen() -> bool:
        rows = workers_by_task(try_status(fleet.state_dir) or {})
        return rows[2]["last_output_age"] is not None

    wait_for(output_seen, 10, "the running agent's first output")
    answer = json.loads(cli(fleet, config, "status", "--json").stdout)
    rows = workers_by_task(answer)
    assert {t: rows[t]["state"] for t in wanted} == wanted, rows
    assert answer["ok"] is True
    assert answer["pid"] == up.popen.pid
    assert answer["paused"] is False

    backoff, running, done = rows[1], rows[2], rows[3]
    assert backoff["runs"] == 1 and backoff["crashes"] == 1, backoff
    assert backoff["pid"] is None and backoff["last_exit"] == 1, backoff
    assert backoff["next_run_at"] is not None and backoff["next_run_at"] > time.time()

    assert running["runs"] == 1 and running["crashes"] == 0, running
    assert isinstance(running["pid"], int) and alive(running["pid"]), running
    assert running["pid"] == agent_pids(fleet)[(2, 1)]
    assert running["cpu_percent"] is not None and running["cpu_percent"] >= 0, running
    assert running["rss_bytes"] is not None and running["rss_bytes"] > 0, running
    assert running["processes"] >= 1, running
    assert isinstance(running["last_output_age"], int | float), running
    assert 0 <= running["last_output_age"] < 60, running

    assert done["runs"] == 1 and done["crashes"] == 0 and done["pid"] is None, done
    assert done["last_exit"] == 0, done
    for row in (backoff, done):
        assert row["cpu_percent"] is None and row["rss_bytes"] is None, row

    # The human table: a header line and one row per task.
    table = cli(fleet, config, "status")
    assert table.returncode == 0, explain(table)
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"fleet {answer['fleet']} (pid {up.popen.pid})"), lines
    header = lines[1].split()
    assert header[:4] == ["task", "worker", "machine", "state"], lines
    assert {"pid", "run", "milestones", "crashes", "cpu%", "rss"} <= set(header), lines
    body = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(body) == {"#1", "#2", "#3"}, lines
    assert body["#1"][3] == "backoff" and body["#2"][3] == "running" and body["#3"][3] == "done"
    assert body["#2"][4] == str(running["pid"])
    # `ps` is the same command.
    ps = cli(fleet, config, "ps")
    assert ps.returncode == 0 and ps.stdout.splitlines()[1] == lines[1], explain(ps)

    assert cli(fleet, config, "down").returncode == 0
    assert up.wait(30).returncode == 130


def test_status_without_a_running_fleet_exits_3(fleet: Harness) -> None:
    config = fleet.write(fleet.config([task(1, "finish")]))
    for args in (["status"], ["status", "--json"], ["down"]):
        done = cli(fleet, config, *args)
        assert done.returncode == 3, explain(done)
        assert "no fleet is running" in done.stderr, explain(done)
        assert done.stdout == ""

    # Nor after a fleet has come and gone (its lock file stays, unlocked).
    result = fleet.run(config)
    assert result.returncode == 0, result.explain()
    assert (fleet.state_dir / "lock").exists()
    done = cli(fleet, config, "status")
    assert done.returncode == 3 and "no fleet is running" in done.stderr, explain(done)


def test_down_stops_a_running_fleet(fleet: Harness) -> None:
    # A state directory too deep for a socket path (sun_path is 108 bytes): the socket moves
    # to a directory of this user's in the temp directory (never a predictable path in a
    # shared one), still private, still found by the CLI.
    fleet.state_dir = fleet.tmp / ("deep-" * 20) / "state"
    path = socket_path(fleet.state_dir)
    assert path.parent == Path(tempfile.gettempdir()) / f"agentize-fleet-{os.geteuid()}", path
    config = fleet.write(
        fleet.config([task(1, "hang"), task(2, "grandchildren:1+hang")], stop_timeout=5)
    )
    up = fleet.start(config)
    wait_ready(up)
    wait_states(up, {1: "running", 2: "running"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    wait_for(lambda: len(agent_pids(fleet)) == 2, 10, "both agents' start records")

    def grandchildren() -> list[int]:
        lines = [
            r["line"]
            for r in run_records(only_run_dir(fleet.state_dir))
            if r["task"] == 2 and r["stream"] == "stdout"
        ]
        found = [int(m[1]) for line in lines if (m := GRANDCHILD.match(line))]
        return found if len(found) == 2 else []

    pids = list(agent_pids(fleet).values()) + wait_for(grandchildren, 10, "grandchild pids")
    assert all(alive(pid) for pid in pids)

    done = cli(fleet, config, "down")
    assert done.returncode == 0, explain(done)
    assert "stopping the fleet" in done.stdout
    result = up.wait(20)
    assert result.returncode == 130, result.explain()
    assert result.elapsed < 20
    assert [pid for pid in pids if alive(pid)] == []
    assert {w["state"] for w in result.summary["workers"]} == {"stopped"}
    assert events(result.records, "stopping")
    # The fleet is gone: its socket file with it, and status says so.
    assert not path.exists()
    assert cli(fleet, config, "status").returncode == 3


def test_restart_gives_a_task_a_new_run(fleet: Harness) -> None:
    config = fleet.write(fleet.config([task(42, "hang,finish"), task(7, "hang")]))
    up = fleet.start(config)
    wait_ready(up)
    wait_states(up, {42: "running", 7: "running"})
    first = wait_for(lambda: agent_pids(fleet).get((42, 1)), 10, "run 1 of #42")

    done = cli(fleet, config, "restart", "42")
    assert done.returncode == 0, explain(done)
    assert "task #42 restarting" in done.stdout
    wait_for(lambda: fleet.runs_of(42)[-1]["run"] == 2, 15, "run 2 of #42 to start")
    wait_states(up, {42: "done", 7: "running"})
    assert not alive(first)

    # A task the fleet does not have: an error, and the fleet goes on.
    missing = cli(fleet, config, "restart", "99")
    assert missing.returncode == 2, explain(missing)  # an unknown name: exitcodes.py
    assert "#99" in missing.stderr and "not in this fleet" in missing.stderr

    assert cli(fleet, config, "down").returncode == 0
    result = up.wait(20)
    assert [r["run"] for r in fleet.runs_of(42)] == [1, 2]
    assert [r["run"] for r in fleet.runs_of(7)] == [1]
    assert len(events(result.records, "restarting")) == 1
    assert events(result.records, "restarting")[0]["task"] == 42
    row = result.task_summary(42)
    assert row["state"] == "done" and row["runs"] == 2, row
    assert row["crashes"] == 0, row  # a restart on request is not a crash
    ends = [r for r in fleet.agent_records("end") if r["issue"] == 42]
    assert [(r["run"], r["exit"]) for r in ends] == [(2, 0)]  # run 1 was killed, run 2 finished


def test_restart_starts_the_new_run_at_once_in_the_slot_its_run_had(fleet: Harness) -> None:
    """Under cap 1 with a task waiting, `restart 42` used to put #42 behind it (61 s in a
    measured case): now run 2 starts at once, in the slot run 1 had."""
    config = fleet.write(
        fleet.config([task(42, "hang,sleep:1+finish"), task(7, "finish")], concurrency=1)
    )
    up = fleet.start(config)
    wait_ready(up)
    wait_states(up, {42: "running", 7: "pending"})
    wait_for(lambda: agent_pids(fleet).get((42, 1)), 10, "run 1 of #42")
    asked = time.time()
    done = cli(fleet, config, "restart", "42")
    assert done.returncode == 0 and "starts at once in its slot" in done.stdout, explain(done)
    second = wait_for(lambda: [r for r in fleet.runs_of(42) if r["run"] == 2], 15, "run 2")[0]
    assert second["t"] - asked < 8, second["t"] - asked  # the stop (SIGTERM) and a start
    result = up.wait(30)
    assert result.returncode == 0, result.explain()
    order = [(r["issue"], r["run"]) for r in fleet.agent_records("start")]
    assert order == [(42, 1), (42, 2), (7, 1)], order
    with Ledger.reader(fleet.state_dir) as ledger:  # type: ignore[union-attr]
        first, again = ledger.runs(issue=42)
    assert first.ended_at is not None and again.intent_at >= first.ended_at  # never two at once


def test_add_runs_a_new_task(fleet: Harness) -> None:
    config = fleet.write(fleet.config([task(1, "hang")]))
    up = fleet.start(config)
    wait_ready(up)
    wait_states(up, {1: "running"})

    done = cli(fleet, config, "add", "57", "--title", "added later")
    assert done.returncode == 0, explain(done)
    assert "task #57 added" in done.stdout
    # Adding a task the fleet already runs changes nothing: `add` is idempotent.
    again = cli(fleet, config, "add", "1")
    assert again.returncode == 0, explain(again)
    assert "already in the fleet (state running)" in again.stdout, explain(again)
    wait_states(up, {57: "done", 1: "running"})

    assert cli(fleet, config, "down").returncode == 0
    result = up.wait(20)
    assert result.returncode == 130, result.explain()
    row = result.task_summary(57)
    assert row["state"] == "done" and row["title"] == "added later", row
    assert (row["runs"], row["crashes"]) == (1, 0), row
    assert result.task_summary(1)["state"] == "stopped"
    assert [r["run"] for r in fleet.runs_of(57)] == [1]
    assert [r["exit"] for r in fleet.agent_records("end") if r["issue"] == 57] == [0]
    added = events(result.records, "task-added")
    assert [e["task"] for e in added] == [57], added


def test_add_is_idempotent_and_never_puts_two_workers_in_one_worktree(fleet: Harness) -> None:
    """``add N`` twice for an ended task used to start two workers in one worktree.  Now: a
    failed task is queued again on its own worker; a done one stays done unless --rerun."""
    config = fleet.write(
        fleet.config([task(1, "hang"), task(2, "crash:3,finish")], restart={"max_crashes": 0})
    )
    up = fleet.start(config)
    wait_ready(up)
    wait_states(up, {1: "running", 2: "failed"})

    first, second = cli(fleet, config, "add", "2"), cli(fleet, config, "add", "2")
    for done in (first, second):
        assert done.returncode == 0, explain(done)
    assert "task #2 (failed) queued again on w2" in first.stdout, explain(first)
    assert second.stdout.strip().endswith(
        (
            "already in the fleet (state pending)",
            "already in the fleet (state preparing)",
            "already in the fleet (state running)",
            "task #2 is already done; `add 2 --rerun` runs it again",
        )
    ), explain(second)
    wait_states(up, {2: "done"})
    done_again = cli(fleet, config, "add", "2")
    assert "already done; `add 2 --rerun` runs it again" in done_again.stdout
    rerun = cli(fleet, config, "add", "2", "--rerun")
    assert rerun.returncode == 0 and "queued again on w2" in rerun.stdout, explain(rerun)
    wait_for(lambda: len(fleet.runs_of(2)) == 3, 15, "run 3 of #2")
    wait_states(up, {2: "done"})

    assert cli(fleet, config, "down").returncode == 0
    result = up.wait(20)
    assert [w["worker"] for w in result.summary["workers"]] == ["w1", "w2"]
    runs = fleet.runs_of(2)
    assert [r["run"] for r in runs] == [1, 2, 3]
    assert len({r["cwd"] for r in runs}) == 1
    # Never two runs of #2 at once: each started after the one before it ended.
    ends = {r["run"]: r["t"] for r in fleet.agent_records("end") if r["issue"] == 2}
    assert all(runs[i + 1]["t"] >= ends[runs[i]["run"]] for i in range(2)), (runs, ends)


def test_pause_holds_new_runs_until_resume(fleet: Harness) -> None:
    config = fleet.write(
        fleet.config([task(1, "sleep:2.5+finish"), task(2, "finish")], concurrency=1)
    )
    up = fleet.start(config)
    wait_ready(up)
    wait_states(up, {1: "running", 2: "pending"})

    done = cli(fleet, config, "pause")
    assert done.returncode == 0 and "paused" in done.stdout, explain(done)
    assert try_status(fleet.state_dir)["paused"] is True  # type: ignore[index]
    assert fleet.agent_records("end") == [], "too slow: #1 ended before the pause"
    # Task 1 ends; task 2 must not start while paused.
    wait_for(lambda: [r for r in fleet.agent_records("end") if r["issue"] == 1], 15, "#1 to end")
    time.sleep(1.0)
    assert fleet.runs_of(2) == [], "task 2 started while the fleet was paused"
    assert workers_by_task(try_status(fleet.state_dir) or {})[2]["state"] == "pending"
    status = cli(fleet, config, "status")
    assert "(new runs paused)" in status.stdout.splitlines()[0], explain(status)

    resumed_at = time.time()
    done = cli(fleet, config, "resume")
    assert done.returncode == 0 and "allowed" in done.stdout, explain(done)
    result = up.wait(30)
    assert result.returncode == 0, result.explain()
    assert fleet.runs_of(2)[0]["t"] >= resumed_at
    assert [e["event"] for e in result.events() if e["event"] in ("pause", "resume")] == [
        "pause",
        "resume",
    ]


def test_pause_holds_restarts_and_resumes_until_resume(fleet: Harness) -> None:
    """A crash restart and a milestone resume that come due while paused wait for ``resume``
    (a resume keeps its slot, a restart gives it back: both are held)."""
    config = fleet.write(
        fleet.config(
            [task(1, "sleep:2.5+crash:3,finish"), task(2, "sleep:2.5+milestone,finish")],
            concurrency=2,
        )
    )
    up = fleet.start(config)
    wait_ready(up)
    wait_states(up, {1: "running", 2: "running"})
    assert cli(fleet, config, "pause").returncode == 0
    assert fleet.agent_records("end") == [], "too slow: a run ended before the pause"
    wait_for(lambda: len(fleet.agent_records("end")) == 2, 15, "both first runs to end")
    time.sleep(1.0)  # the crash backoff (at most 0.1 s) is long over: still no second run
    assert [r["run"] for r in fleet.runs_of(1)] == [1]
    assert [r["run"] for r in fleet.runs_of(2)] == [1]
    rows = workers_by_task(try_status(fleet.state_dir) or {})
    assert (rows[1]["state"], rows[2]["state"]) == ("backoff", "resuming"), rows

    resumed_at = time.time()
    assert cli(fleet, config, "resume").returncode == 0
    result = up.wait(30)
    assert result.returncode == 0, result.explain()
    for issue in (1, 2):
        runs = fleet.runs_of(issue)
        assert [r["run"] for r in runs] == [1, 2] and runs[1]["t"] >= resumed_at, runs


def test_a_second_up_exits_4_naming_the_first(fleet: Harness) -> None:
    config = fleet.write(fleet.config([task(1, "hang")]))
    up = fleet.start(config)
    wait_ready(up)

    t0 = time.monotonic()
    second = fleet.run(config, timeout=15)
    assert second.returncode == 4, second.explain()
    assert time.monotonic() - t0 < 10
    assert f"pid {up.popen.pid}" in second.stderr, second.explain()
    assert "already running" in second.stderr
    # It started nothing and left the first one alone.
    assert len(fleet.agent_records("start")) == 1
    assert len(list((fleet.state_dir / "runs").iterdir())) == 1
    assert up.popen.poll() is None
    assert try_status(fleet.state_dir) is not None

    assert cli(fleet, config, "down").returncode == 0
    assert up.wait(20).returncode == 130


def test_control_socket_is_private_and_survives_malformed_requests(fleet: Harness) -> None:
    config = fleet.write(fleet.config([task(1, "hang")]))
    up = fleet.start(config)
    wait_ready(up)
    wait_states(up, {1: "running"})
    path = socket_path(fleet.state_dir)
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600, oct(mode)

    # A client that connects and sends nothing does not block the others.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(str(path))
        bad_requests = {
            b"not json\n": "malformed",
            b"[1, 2]\n": "malformed",
            b'"status"\n': "malformed",
            b'{"cmd": 5}\n': "malformed",
            b"\xff\xfe\x00garbage\n": "",
            b"": "malformed",  # connect, then close the writing side at once
            b"{" + b" " * (70 * 1024) + b"\n": "larger than",
            b'{"cmd": "frobnicate"}\n': "unknown command",
            b'{"cmd": "restart"}\n': "needs",
            b'{"cmd": "restart", "task": "42"}\n': "needs",
            b'{"cmd": "restart", "task": true}\n': "needs",
            b'{"cmd": "add", "task": -3}\n': "needs",
            b'{"cmd": "restart", "task": 99}\n': "not in this fleet",
        }
        for data, error in bad_requests.items():
            answer = raw_request(fleet.state_dir, data)
            assert isinstance(answer, dict), (data[:40], answer)
            assert answer.get("ok") is False, (data[:40], answer)
            assert isinstance(answer.get("error"), str) and error in answer["error"], (
                data[:40],
                answer,
            )
        # Several requests on one line and a second line: only the first counts.
        answer = raw_request(fleet.state_dir, b'{"cmd": "status"}\n{"cmd": "down"}\n')
        assert answer["ok"] is True and answer["workers"][0]["task"] == 1

    # The fleet keeps running, answers, and its agent was not disturbed.
    assert up.popen.poll() is None
    status = request(fleet.state_dir, {"cmd": "status"})
    assert status["ok"] is True and workers_by_task(status)[1]["state"] == "running"
    assert status["stopping"] is False
    done = cli(fleet, config, "status", "--json")
    assert done.returncode == 0, explain(done)
    assert [r["run"] for r in fleet.runs_of(1)] == [1]

    assert cli(fleet, config, "down").returncode == 0
    assert up.wait(20).returncode == 130


def test_runs_lists_past_and_running_fleets(fleet: Harness) -> None:
    config = fleet.write(
        fleet.config([task(1, "finish"), task(2, "crash:3")], restart={"max_crashes": 0})
    )
    none = cli(fleet, config, "runs")
    assert none.returncode == 3 and "no fleet runs" in none.stderr, explain(none)
    assert cli(fleet, config, "shifts").returncode == 3

    first = fleet.run(config)
    assert first.returncode == 1, first.explain()  # task 2 failed
    first_id = first.run_dir.name

    # A second fleet, still running.
    fleet.write(fleet.config([task(3, "hang")]))
    up = fleet.start(config)
    wait_ready(up)

    done = cli(fleet, config, "runs", "--json")
    assert done.returncode == 0, explain(done)
    rows = json.loads(done.stdout)
    assert len(rows) == 2 and rows[0]["run"] == first_id, rows
    ended, running = rows
    assert ended["state"] == "ended" and ended["exit_code"] == 1, ended
    assert (ended["tasks"], ended["done"], ended["failed"]) == (2, 1, 1), ended
    assert ended["meaning"] == "some tasks failed"
    assert running["state"] == "running" and running["exit_code"] is None, running
    assert running["tasks"] == 1

    table = cli(fleet, config, "runs")
    assert table.returncode == 0, explain(table)
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["shift", "state", "tasks", "done", "failed", "exit", "meaning"]
    assert lines[1].split()[:6] == [first_id, "ended", "2", "1", "1", "1"], lines
    assert lines[2].split()[1:3] == ["running", "1"], lines

    assert cli(fleet, config, "down").returncode == 0
    assert up.wait(20).returncode == 130
    rows = json.loads(cli(fleet, config, "runs", "--json").stdout)
    assert [(r["state"], r["exit_code"]) for r in rows] == [("ended", 1), ("ended", 130)]
    assert read_json(fleet.state_dir / "runs" / first_id / "summary.json")["exit_code"] == 1


def test_a_control_socket_of_another_user_is_refused(tmp_path: Path) -> None:
    """Another user's socket where ours should be is not our fleet: nothing is sent to it."""
    if os.geteuid() != 0:
        pytest.skip("giving a socket to another user needs root")
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        os.chown(path, 12345, 12345)
        with pytest.raises(control.ControlError, match="belongs to another user"):
            anyio.run(control.request, path, {"cmd": "status"})
