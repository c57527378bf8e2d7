"""A supervisor that dies (SIGKILL) leaves no agent running unsupervised.

The next ``up`` on the same state directory re-adopts the dead fleet's runs (default) or stops
them (``on_orphans = "stop"``); without a next ``up`` the run wrapper's lease watchdog stops
them; and a pid that was reused by an unrelated process is never signalled.  What the dead
supervisor was doing is read from the ledger, as the next ``up`` reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Harness, task
from fleet_helpers import (
    agent_pids,
    alive,
    cli,
    events,
    explain,
    kill_up,
    only_run_dir,
    output_lines,
    read_json,
    run_dirs,
    run_records,
    sigkill,
    start_ticks,
    wait_for,
    wait_ready,
    wait_states,
)

from supervisor.ledger import Ledger, ledger_path

GRANDCHILD = re.compile(r"^fake-agent: grand(?:-grand)?child pid (\d+)$")
# Enough steps that each run is caught in the middle, prints before and after the kill.
STEPS = {"FAKE_AGENT_STEPS": "25", "FAKE_AGENT_STEP_DELAY": "0.08"}


def running_in_ledger(
    state_dir: Path, tasks: int, shift: str | None = None
) -> dict[int, dict[str, Any]] | None:
    """The ledger's running runs once ``tasks`` of them have a pid (and, given ``shift``, are
    watched by that shift), by task: pid, start ticks, run directory, lease, run number."""
    with contextlib.suppress(Exception):
        ledger = Ledger.reader(state_dir)
        if ledger is None:
            return None
        with ledger:
            rows = {
                r.issue: {
                    "task": r.issue,
                    "pid": r.pid,
                    "start_ticks": r.start_ticks,
                    "run_dir": r.run_dir,
                    "lease_path": r.lease_path,
                    "runs": r.number,
                    "worker": r.worker,
                }
                for r in ledger.open_runs()
                if r.state == "running" and r.pid and (shift is None or r.supervised_by == shift)
            }
        if len(rows) == tasks:
            return rows
    return None


def file_lines(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", "replace")
    lines = text.split("\n")
    return lines[:-1] if text.endswith("\n") or not text else lines


def grandchildren(records: list[dict[str, Any]]) -> list[int]:
    return [
        int(m[1]) for r in records if r["stream"] == "stdout" and (m := GRANDCHILD.match(r["line"]))
    ]


def new_run_dir(state_dir: Path, old: str) -> Path:
    others = [p for run_id, p in run_dirs(state_dir).items() if run_id != old]
    assert len(others) == 1, others
    return others[0]


def wrapper_alive(run_dir: str) -> bool:
    try:
        pid = int(Path(run_dir, "wrapper").read_text().split()[0])
    except (OSError, ValueError):
        return False
    if not alive(pid):
        return False
    with contextlib.suppress(OSError):
        return b"runner.sh" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


def kill_fleet_mid_run(
    fleet: Harness, config: Path, issues: list[int], lines: int = 3
) -> tuple[str, Path, dict[int, dict[str, Any]]]:
    """Start ``up``, wait until every task runs and has logged ``lines`` stdout lines, SIGKILL
    ``up``; return the dead fleet's id, run directory and its runs as the ledger has them."""
    up = fleet.start(config)
    wait_ready(up)
    wait_states(up, dict.fromkeys(issues, "running"))
    run_dir = only_run_dir(fleet.state_dir)
    wait_for(lambda: running_in_ledger(fleet.state_dir, len(issues)), 10, "pids in the ledger")

    def logged() -> bool:
        records = run_records(run_dir)
        return all(len(output_lines(records, i, 1, "stdout")) >= lines for i in issues)

    wait_for(logged, 15, f"{lines} output lines of every task in the JSONL")
    kill_up(up)
    rows = running_in_ledger(fleet.state_dir, len(issues))
    assert rows is not None, "the ledger lost its running runs"
    for row in rows.values():
        assert alive(row["pid"], row["start_ticks"]), f"run of #{row['task']} died with up"
    return run_dir.name, run_dir, rows


def test_a_new_up_adopts_the_runs_of_a_killed_one(fleet: Harness) -> None:
    tasks = [task(1, "sleep:1+finish"), task(2, "sleep:1+finish"), task(3, "milestone,finish")]
    config = fleet.write(fleet.config(tasks, agent={"env": STEPS}))
    old_id, old_dir, orphans = kill_fleet_mid_run(fleet, config, [1, 2, 3])

    second = fleet.start(config)
    result = second.wait(45)
    assert result.returncode == 0, result.explain()
    new_dir = new_run_dir(fleet.state_dir, old_id)
    new_records = run_records(new_dir)
    old_records = run_records(old_dir)

    adopted = events(new_records, "adopted")
    assert sorted(e["task"] for e in adopted) == [1, 2, 3], adopted
    assert {e["from_fleet"] for e in adopted} == {old_id}
    assert {e["pid"] for e in adopted} == {w["pid"] for w in orphans.values()}
    summary = read_json(new_dir / "summary.json")
    assert summary["exit_code"] == 0
    rows = {w["task"]: w for w in summary["workers"]}
    assert {t: w["state"] for t, w in rows.items()} == {1: "done", 2: "done", 3: "done"}
    assert {w["adopted_from"] for w in rows.values()} == {old_id}
    assert (rows[3]["runs"], rows[3]["milestones"]) == (2, 1), rows[3]
    # The dead fleet's run is closed with what was done about it.
    old_summary = read_json(old_dir / "summary.json")
    assert len(old_summary["orphans"]) == 3, old_summary["orphans"]
    assert all(note.startswith("adopted") for note in old_summary["orphans"])

    # Each adopted run ran once, to its end: no run was started again.
    assert [r["run"] for r in fleet.runs_of(1)] == [1]
    assert [r["run"] for r in fleet.runs_of(2)] == [1]
    assert [r["run"] for r in fleet.runs_of(3)] == [1, 2]
    ends = {(r["issue"], r["run"]): r["exit"] for r in fleet.agent_records("end")}
    assert ends == {(1, 1): 0, (2, 1): 0, (3, 1): 0, (3, 2): 0}

    # Not a line lost or repeated across the two supervisors: old log + new log == the file.
    for issue, row in orphans.items():
        for stream in ("stdout", "stderr"):
            before = output_lines(old_records, issue, 1, stream)
            after = output_lines(new_records, issue, 1, stream)
            expected = file_lines(Path(row["run_dir"], stream))
            assert before + after == expected, (issue, stream, len(before), len(after))
            if stream == "stdout":
                assert before and after, (issue, len(before), len(after))  # spans the kill

    # Nothing is left running.
    pids = agent_pids(fleet)
    assert [p for p in pids.values() if alive(p)] == []
    assert [r for r in orphans.values() if wrapper_alive(r["run_dir"])] == []


def test_a_run_started_just_before_the_kill_is_adopted_not_started_again(
    fleet: Harness,
) -> None:
    """SIGKILL within a few milliseconds of an agent's start (4 of 4 such kills left no pid in
    the old state file, and the task was started again beside its living run): the intent and
    the pid were in the ledger before and right after the start, so the next `up` adopts it."""
    config = fleet.write(
        fleet.config([task(1, "sleep:2+finish")], agent={"env": {"FAKE_AGENT_STEPS": "3"}})
    )
    for attempt in range(3):
        up = fleet.start(config)
        wait_for(
            lambda n=attempt, up=up: len(fleet.agent_records("start")) > n or up.popen.poll(),
            15,
            "the agent's start",
        )
        kill_up(up)
        if attempt < 2:
            # Let this one end (the next attempt needs a task to start again).
            again = fleet.start(config).wait(30)
            assert again.returncode == 0, again.explain()
            fleet.write(
                fleet.config(
                    [task(attempt + 2, "sleep:2+finish")], agent={"env": {"FAKE_AGENT_STEPS": "3"}}
                )
            )
    result = fleet.start(config).wait(30)
    assert result.returncode == 0, result.explain()
    starts = fleet.agent_records("start")
    assert sorted(r["issue"] for r in starts) == [1, 2, 3], starts  # each once
    assert sorted((r["issue"], r["exit"]) for r in fleet.agent_records("end")) == [
        (1, 0),
        (2, 0),
        (3, 0),
    ]
    assert [p for p in agent_pids(fleet).values() if alive(p)] == []


def test_on_orphans_stop_stops_them_then_runs_the_tasks(fleet: Harness) -> None:
    issues = [1, 2, 3]
    plans = {1: "hang", 2: "grandchildren:1+hang", 3: "ignore-term+hang"}
    config_of = {
        "on_orphans": "stop",
        "stop_timeout": 2,
        "agent": {"env": {"FAKE_AGENT_STEPS": "3"}},
    }
    config = fleet.write(fleet.config([task(i, plans[i]) for i in issues], **config_of))
    old_id, old_dir, orphans = kill_fleet_mid_run(fleet, config, issues)
    old_pids = [w["pid"] for w in orphans.values()]
    grand = grandchildren(run_records(old_dir))
    assert len(grand) == 2 and all(alive(p) for p in grand), grand

    # The same tasks, now quick to finish (a fresh run 1 would otherwise hang again).
    fleet.write(fleet.config([task(i, "finish") for i in issues], **config_of))
    result = fleet.start(config).wait(45)
    assert result.returncode == 0, result.explain()
    new_dir = new_run_dir(fleet.state_dir, old_id)
    new_records = run_records(new_dir)

    stopped = events(new_records, "orphan-stopped")
    assert sorted(e["task"] for e in stopped) == issues, stopped
    assert {e["pid"] for e in stopped} == set(old_pids)
    assert events(new_records, "adopted") == []
    # They were stopped before the new runs started.
    first_start = min(e["ts"] for e in events(new_records, "run-started"))
    assert max(e["ts"] for e in stopped) <= first_start
    assert [p for p in old_pids + grand if alive(p)] == []
    assert [r for r in orphans.values() if wrapper_alive(r["run_dir"])] == []

    summary = read_json(new_dir / "summary.json")
    assert {w["task"]: w["state"] for w in summary["workers"]} == dict.fromkeys(issues, "done")
    assert all(w["adopted_from"] is None for w in summary["workers"])
    old_summary = read_json(old_dir / "summary.json")
    assert len(old_summary["orphans"]) == 3
    assert all(note.startswith("stopped") for note in old_summary["orphans"])
    # Each task ran twice: the stopped orphan (run 1), then a new run (run 2: runs are
    # numbered per task across shifts), which finished.
    for issue in issues:
        starts = fleet.runs_of(issue)
        assert [r["run"] for r in starts] == [1, 2], starts
        assert starts[1]["pid"] != starts[0]["pid"]
    assert [p for p in agent_pids(fleet).values() if alive(p)] == []


def test_the_lease_watchdog_stops_runs_of_a_dead_supervisor(fleet: Harness) -> None:
    lease_timeout = 3
    config = fleet.write(
        fleet.config(
            [task(1, "hang"), task(2, "grandchildren:1+hang")],
            lease_timeout=lease_timeout,
            agent={"env": {"FAKE_AGENT_STEPS": "3"}},
        )
    )
    _old_id, run_dir, orphans = kill_fleet_mid_run(fleet, config, [1, 2])
    killed_at = time.monotonic()
    grand = grandchildren(run_records(run_dir))
    assert len(grand) == 2, grand
    pids = [w["pid"] for w in orphans.values()] + grand

    # One watchdog guards both runs (named in LEASE.dog), not one per run: a run start costs
    # no extra process.  A second one started together with it leaves after its first look.
    (lease,) = {w["lease_path"] for w in orphans.values()}
    dog_pid = int(Path(f"{lease}.dog").read_text().split()[0])
    assert alive(dog_pid)
    assert {e.read_text().strip() for e in Path(f"{lease}.runs").iterdir()} == {
        w["run_dir"] for w in orphans.values()
    }

    def runner_processes() -> list[int]:
        return [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if any("runner.sh" in part for part in p.info["cmdline"] or [])
            and str(run_dir) in " ".join(p.info["cmdline"] or [])
        ]

    wait_for(
        lambda: len(runner_processes()) == len(orphans) + 1,
        5,
        "the run wrappers and exactly one watchdog",
    )
    assert dog_pid in runner_processes()

    # Nobody renews the lease now; the runs live on a little ...
    time.sleep(1.0)
    assert all(alive(p) for p in pids), "the runs died at once: not the watchdog's doing"
    # ... and are stopped once it is older than lease_timeout.
    wait_for(
        lambda: not any(alive(p) for p in pids),
        lease_timeout + 7 - (time.monotonic() - killed_at),
        "the lease watchdog to stop the orphaned runs",
        interval=0.1,
    )
    wait_for(
        lambda: not any(wrapper_alive(r["run_dir"]) for r in orphans.values()),
        5,
        "the run wrappers to end",
    )
    for row in orphans.values():
        note = Path(row["run_dir"], "note").read_text()
        assert "not renewed" in note, note
        assert Path(row["run_dir"], "exit").read_text().strip() == str(128 + signal.SIGTERM)
    wait_for(lambda: not alive(dog_pid), 10, "the watchdog to leave after stopping the runs")

    # The dead fleet shows as such.
    runs = cli(fleet, config, "runs")
    assert runs.returncode == 0, explain(runs)
    assert runs.stdout.splitlines()[1].split()[1] == "died", runs.stdout
    assert cli(fleet, config, "status").returncode == 3
    # Its report is written from the ledger: it never wrote a summary.
    report = cli(fleet, config, "report", "--shift", _old_id, timeout=60)
    assert report.returncode == 0, explain(report)
    assert "supervisor died" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("wrapper_gone", [False, True], ids=["exit-recorded", "wrapper-gone"])
def test_a_reused_pid_is_never_signalled(fleet: Harness, wrapper_gone: bool) -> None:
    config = fleet.write(fleet.config([task(1, "hang,finish")], concurrency=1))
    old_id, _old_dir, orphans = kill_fleet_mid_run(fleet, config, [1])
    row = orphans[1]
    run_dir = Path(row["run_dir"])
    # The agent dies too; with `wrapper_gone` its wrapper first (power loss), so no exit file.
    if wrapper_gone:
        sigkill(int((run_dir / "wrapper").read_text().split()[0]))
    assert alive(row["pid"], row["start_ticks"])
    sigkill(row["pid"])
    wait_for(lambda: not alive(row["pid"]), 5, "the agent to die")
    if wrapper_gone:
        time.sleep(0.2)
        assert not (run_dir / "exit").exists()
    else:
        wait_for(lambda: (run_dir / "exit").exists(), 5, "the wrapper to record the exit")

    # An unrelated process now has the agent's pid (in a session of its own, so that its
    # group id is its pid too); the ledger and the run's pid file still name the old start time.
    dummy = subprocess.Popen(
        ["sleep", "300"],
        env=fleet.env(),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        ticks = wait_for(lambda: start_ticks(dummy.pid), 5, "the dummy's start time")
        assert ticks != row["start_ticks"]
        db = sqlite3.connect(ledger_path(fleet.state_dir))
        db.execute("UPDATE runs SET pid = ? WHERE issue = 1", (dummy.pid,))
        db.commit()
        db.close()
        (run_dir / "pid").write_text(f"{dummy.pid} {row['start_ticks']}\n")
        (run_dir / "wrapper").write_text(f"{dummy.pid} {ticks + 1}\n")  # wrapper's pid: reused too

        result = fleet.start(config).wait(45)
        assert result.returncode == 0, result.explain()
        assert dummy.poll() is None, f"the dummy was killed ({dummy.returncode})"
        assert alive(dummy.pid, ticks)
        proc_state = Path(f"/proc/{dummy.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert proc_state == "S", proc_state  # not stopped either

        new_dir = new_run_dir(fleet.state_dir, old_id)
        summary = read_json(new_dir / "summary.json")
        (worker,) = summary["workers"]
        assert worker["state"] == "done", worker
        assert (worker["runs"], worker["crashes"]) == (2, 1), worker
        assert [r["run"] for r in fleet.runs_of(1)] == [1, 2]
        assert events(run_records(new_dir), "orphan-stopped") == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(dummy.pid, signal.SIGKILL)
        dummy.wait(timeout=5)


def test_a_run_adopted_twice_loses_and_repeats_nothing(fleet: Harness) -> None:
    # Some output at once, then a quiet spell (an agent thinking), then the end.
    config = fleet.write(
        fleet.config(
            [task(1, "sleep:3+finish")],
            agent={"env": {"FAKE_AGENT_STEPS": "4", "FAKE_AGENT_STEP_DELAY": "0.01"}},
        )
    )
    first_id, first_dir, orphans = kill_fleet_mid_run(fleet, config, [1], lines=6)
    row = orphans[1]

    second = fleet.start(config)
    wait_ready(second)
    second_dir = new_run_dir(fleet.state_dir, first_id)
    wait_for(lambda: events(run_records(second_dir), "adopted"), 10, "the second fleet to adopt")
    wait_for(
        lambda: running_in_ledger(fleet.state_dir, 1, second_dir.name),
        10,
        "the adopted run watched by the second fleet in the ledger",
    )
    kill_up(second)
    assert alive(row["pid"], row["start_ticks"]), "the run ended too early for this test"

    result = fleet.start(config).wait(30)
    assert result.returncode == 0, result.explain()
    third_dir = next(
        p for p in run_dirs(fleet.state_dir).values() if p not in (first_dir, second_dir)
    )
    assert len(events(run_records(third_dir), "adopted")) == 1
    logged = [
        line
        for run_dir in (first_dir, second_dir, third_dir)
        for line in output_lines(run_records(run_dir), 1, 1, "stdout")
    ]
    assert logged == file_lines(Path(row["run_dir"], "stdout"))
    assert [p for p in agent_pids(fleet).values() if alive(p)] == []


def test_a_dead_fleets_watchdog_ends_with_the_runs_it_adopted(fleet: Harness) -> None:
    """The adopting fleet dismisses the dead one's watchdog as soon as the adopted runs end,
    not at its own end, nor at the watchdog's next look (here every 10 s)."""
    tasks = [task(1, "sleep:2+finish"), task(2, "sleep:2+finish")]
    config = fleet.write(fleet.config(tasks, lease_timeout=30, agent={"env": STEPS}))
    old_id, _old_dir, orphans = kill_fleet_mid_run(fleet, config, [1, 2])
    (lease,) = {w["lease_path"] for w in orphans.values()}
    dog_pid = int(Path(f"{lease}.dog").read_text().split()[0])
    assert alive(dog_pid)

    # The next fleet adopts both, and has a task of its own that keeps it going.
    fleet.write(fleet.config([*tasks, task(3, "hang")], lease_timeout=30, agent={"env": STEPS}))
    second = fleet.start(config)
    wait_ready(second)

    def adopted_ended() -> bool:
        return {(r["issue"], r["exit"]) for r in fleet.agent_records("end")} >= {(1, 0), (2, 0)}

    wait_for(adopted_ended, 20, "the adopted runs to end")
    wait_for(lambda: not alive(dog_pid), 4, "the dead fleet's watchdog to be dismissed")
    assert second.popen.poll() is None, "the adopting fleet is still running"
    assert cli(fleet, config, "down").returncode == 0
    result = second.wait(20)
    assert result.returncode == 130, result.explain()
    assert not result.leftovers, result.leftovers
    assert {
        e["from_fleet"]
        for e in events(run_records(new_run_dir(fleet.state_dir, old_id)), "adopted")
    } == {old_id}


@pytest.mark.parametrize("all_ended", [True, False])
def test_dismissal_ends_every_watchdog_of_the_lease_once_its_runs_have_ended(
    tmp_path: Path, all_ended: bool
) -> None:
    """The fleet's end stops the watchdog named in LEASE.dog and any other listed in
    LEASE.dog.all (two runs starting at once may each have started one), but only once every
    registered run has its exit file; a process whose start time differs is never signalled."""
    from supervisor.hosts.base import STOP_WATCHDOG

    lease = tmp_path / "lease"
    runs = [tmp_path / "run-1", tmp_path / "run-2"]
    for run in runs:
        run.mkdir()
    (runs[0] / "exit").write_text("0\n")
    if all_ended:
        (runs[1] / "exit").write_text("143\n")
    Path(f"{lease}.runs").mkdir()  # the registry: an entry per run (wrapper pid-ticks)
    for number, run in enumerate(runs, 1):
        Path(f"{lease}.runs", f"{number}-1").write_text(f"{run}\n")
    dogs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        ticks = [start_ticks(d.pid) for d in dogs]
        named, other, stranger = dogs
        Path(f"{lease}.dog").write_text(f"{named.pid} {ticks[0]}\n")
        Path(f"{lease}.dog.all").write_text(
            f"{other.pid} {ticks[1]}\n{named.pid} {ticks[0]}\n{stranger.pid} {ticks[2] + 1}\n"
        )
        done = subprocess.run(
            ["sh", "-c", STOP_WATCHDOG, "sh", str(lease)], timeout=10, capture_output=True
        )
        assert done.returncode == 0, done.stderr

        def code(proc: subprocess.Popen[bytes], expect_dead: bool) -> int | None:
            try:  # a signalled one is seen dead within 5 s; a spared one still lives after 0.5 s
                return proc.wait(timeout=5 if expect_dead else 0.5)
            except subprocess.TimeoutExpired:
                return None

        codes = [code(d, all_ended and d is not stranger) for d in dogs]
        if all_ended:
            assert codes[:2] == [-signal.SIGTERM, -signal.SIGTERM], codes
        else:
            assert codes[:2] == [None, None], codes
        assert codes[2] is None, "a pid whose start time does not match was signalled"
    finally:
        for d in dogs:
            d.kill()
            d.wait(timeout=5)


def test_a_batch_torn_by_the_kill_is_not_logged_twice(fleet: Harness) -> None:
    """The dead shift was killed in the middle of writing a batch: records of lines after the
    run's last ``off`` reached its log, the batch's last record (the one with ``off``) did not.
    The adopter resumes at that ``off``; the torn batch is cut from the dead shift's log first,
    so across the two logs every line of the run is there exactly once."""
    config = fleet.write(fleet.config([task(1, "sleep:1+finish")], agent={"env": STEPS}))
    old_id, old_dir, orphans = kill_fleet_mid_run(fleet, config, [1])
    row = orphans[1]
    log = old_dir / "fleet.jsonl"
    records = run_records(old_dir)
    stdout = [r for r in records if r["stream"] == "stdout" and r["task"] == 1]
    resume_at = max(r["off"] for r in stdout if "off" in r)
    wait_for(
        lambda: Path(row["run_dir"], "stdout").stat().st_size > resume_at,
        10,
        "more output of the orphaned run",
    )
    after = Path(row["run_dir"], "stdout").read_bytes()[resume_at:]
    torn_lines = after.decode("utf-8", "replace").split("\n")[:-1][:2]
    assert torn_lines, "the run printed nothing after the kill"
    last = stdout[-1]
    with log.open("ab") as out:
        for n, line in enumerate(torn_lines, start=1):
            record = {k: last[k] for k in ("ts", "worker", "task", "machine", "run", "stream")}
            record.update(seq=last["seq"] + n, line=line)
            out.write((json.dumps(record, separators=(",", ":")) + "\n").encode())
        out.write(b'{"ts":"2026-12-04T00:00:00.000Z","worker":')  # cut mid-record

    result = fleet.start(config).wait(45)
    assert result.returncode == 0, result.explain()
    new_dir = new_run_dir(fleet.state_dir, old_id)
    before = output_lines(run_records(old_dir), 1, 1, "stdout")
    after_lines = output_lines(run_records(new_dir), 1, 1, "stdout")
    assert before + after_lines == file_lines(Path(row["run_dir"], "stdout"))
    assert log.read_bytes().endswith(b"}\n"), "the torn tail is cut away"
    assert [p for p in agent_pids(fleet).values() if alive(p)] == []
