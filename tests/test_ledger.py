"""The ledger (``supervisor/ledger.py``): SQLite in the state directory, one transaction per
transition, readers that never write, a newer ledger refused; and the state directory that holds
it: private, and refused with one clear message when it cannot be used.

The crash tests SIGKILL a child process in the middle of its transactions (one caught inside a
transaction on purpose, then many at random moments) and check that the ledger holds the old
state or the new one, never a mix.
"""

from __future__ import annotations

import os
import random
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from supervisor.ledger import (
    SCHEMA_VERSION,
    Ledger,
    LedgerError,
    LedgerTooNew,
    ShiftRecord,
    TaskRecord,
    ledger_path,
)
from supervisor.rundir import StateDirUnusable, prepare_state_dir

ROOT = Path(__file__).resolve().parent.parent


def shift(shift_id: str, started_at: float = 0.0) -> ShiftRecord:
    return ShiftRecord(
        id=shift_id,
        pid=os.getpid(),
        pid_ticks=None,
        host="h",
        config="c.toml",
        dir="/d",
        name="n",
        concurrency=3,
        started_at=started_at or time.time(),
        ended_at=None,
        exit_code=None,
        exit_meaning=None,
        state="running",
        found_by=None,
    )


def intent(ledger: Ledger, task: TaskRecord, shift_id: str, worker: str = "w1") -> int:
    run = ledger.run_intent(
        task,
        shift=shift_id,
        worker=worker,
        machine="local",
        workspace="/ws",
        run_dir_of=lambda n: f"/runs/{shift_id}/{worker}/run-{n}",
        lease_path="/lease",
        prompt_kind="first",
        milestones_before=["b", "a"],
    )
    return run.id


def test_a_new_ledger_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        assert ledger.tasks() == {}
    path = ledger_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == (str(SCHEMA_VERSION),)
    finally:
        db.close()


def test_a_ledger_of_a_newer_version_is_refused_with_the_fix(tmp_path: Path) -> None:
    Ledger.open(tmp_path).close()
    db = sqlite3.connect(ledger_path(tmp_path))
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    for opener in (Ledger.open, Ledger.reader):
        with pytest.raises(LedgerTooNew) as caught:
            opener(tmp_path)
        message = str(caught.value)
        assert str(ledger_path(tmp_path)) in message and "newer" in message
        assert "fix: upgrade" in message


def test_a_file_that_is_not_a_ledger_is_a_clear_error(tmp_path: Path) -> None:
    ledger_path(tmp_path).write_bytes(b"not a database at all, " * 100)
    with pytest.raises(LedgerError) as caught:
        Ledger.open(tmp_path)
    assert str(ledger_path(tmp_path)) in str(caught.value)


def test_a_reader_never_creates_nor_writes(tmp_path: Path) -> None:
    assert Ledger.reader(tmp_path) is None
    assert not ledger_path(tmp_path).exists()
    writer = Ledger.open(tmp_path)
    writer.begin_shift(shift("s1"))
    task = TaskRecord(issue=7, title="seven")
    writer.save_task(task, shift="s1", worker="w1")
    reader = Ledger.reader(tmp_path)
    assert reader is not None
    # The reader sees what the writer committed, while the writer keeps the file open.
    assert reader.tasks()[7].title == "seven"
    task.state = "running"
    writer.save_task(task, shift="s1", worker="w1")
    assert reader.task(7) is not None and reader.task(7).state == "running"  # type: ignore[union-attr]
    with pytest.raises(LedgerError):
        reader.save_task(task, shift="s1", worker="w1")
    reader.close()
    writer.close()


def test_shifts_left_running_are_marked_died_by_the_next(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        assert ledger.begin_shift(shift("s1", 1.0)) == []
        ledger.end_shift("s1", 0, "all tasks done")
        assert ledger.begin_shift(shift("s2", 2.0)) == []
    with Ledger.open(tmp_path) as ledger:  # s2's `up` died without ending it
        assert ledger.begin_shift(shift("s3", 3.0)) == ["s2"]
        states = [(s.id, s.state, s.found_by) for s in ledger.shifts()]
    assert states == [("s1", "ended", None), ("s2", "died", "s3"), ("s3", "running", None)]


def test_runs_are_numbered_per_task_across_shifts(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        ledger.begin_shift(shift("s1"))
        task = TaskRecord(issue=42)
        first = intent(ledger, task, "s1")
        ledger.run_started(first, 1234, 99)
        ledger.run_ended(first, exit_code=1, outcome="crash", task=task, shift="s1", worker="w1")
        ledger.begin_shift(shift("s2"))
        # The next shift's worker starts from the ledger's record of the task.
        again = ledger.task(42)
        assert again is not None and again.runs == 1
        second = intent(ledger, again, "s2", worker="w3")
        runs = ledger.runs(issue=42)
    assert [(r.number, r.shift, r.worker, r.state) for r in runs] == [
        (1, "s1", "w1", "ended"),
        (2, "s2", "w3", "intent"),
    ]
    assert runs[0].pid == 1234 and runs[0].start_ticks == 99 and runs[0].exit_code == 1
    assert runs[1].id == second and runs[1].run_dir == "/runs/s2/w3/run-2"
    assert runs[1].milestones_before == ("a", "b")


def test_open_runs_and_the_chain_of_supervisors(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        ledger.begin_shift(shift("s1"))
        a, b = TaskRecord(issue=1), TaskRecord(issue=2)
        ra, rb = intent(ledger, a, "s1"), intent(ledger, b, "s1", "w2")
        ledger.run_started(rb, 5, 6)
        assert [r.id for r in ledger.open_runs()] == [ra, rb]
        ledger.run_ended(ra, state="abandoned", reason="never started")
        ledger.run_supervised(rb, "s2")
        ledger.run_supervised(rb, "s3")
        (open_run,) = ledger.open_runs()
        assert (open_run.supervised_by, open_run.supervisors) == ("s3", ("s1", "s2", "s3"))
        assert [r.id for r in ledger.runs(shift="s2")] == [rb]
        assert ledger.run_by_dir(open_run.run_dir) == open_run


def test_holds_machine_events_and_usage(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        ledger.begin_shift(shift("s1"))
        run = intent(ledger, TaskRecord(issue=3), "s1")
        ledger.hold("gpu1", "usage limit", time.time() + 60, shift="s1", line="limit reached")
        ledger.machine_event("gpu1", "unreachable", shift="s1", detail="timed out")
        ledger.record_usage(run, {"session_id": "abc", "cost_usd": 0.5, "turns": 3})
        with pytest.raises(ValueError):
            ledger.record_usage(run, {"nonsense": 1})
        assert [h["machine"] for h in ledger.holds(active_at=time.time())] == ["gpu1"]
        assert ledger.holds(active_at=time.time() + 120) == []
        assert ledger.machine_events("gpu1")[0]["state"] == "unreachable"


# -- crashes in the middle of a transaction ----------------------------------------------------

_INSIDE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from supervisor.ledger import Ledger, TaskRecord
    ledger = Ledger.open(Path(sys.argv[1]))
    task = ledger.task(5)
    task.state, task.reason = "done", "x" * 200000
    with ledger._tx() as db:
        db.execute("UPDATE runs SET state = 'ended', exit_code = 0")
        db.execute("UPDATE tasks SET state = 'done', reason = ?", (task.reason,))
        print("inside", flush=True)
        time.sleep(60)
    """
)


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def test_a_transaction_cut_by_sigkill_leaves_the_old_state(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        ledger.begin_shift(shift("s1"))
        task = TaskRecord(issue=5, state="running")
        run = intent(ledger, task, "s1")
        ledger.run_started(run, 10, 11)
    child = _child(_INSIDE, str(tmp_path))
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "inside"
    finally:
        _kill(child)
    with Ledger.open(tmp_path) as ledger:
        task_now = ledger.task(5)
        assert task_now is not None and (task_now.state, task_now.reason) == ("running", "")
        assert [(r.state, r.exit_code) for r in ledger.runs(issue=5)] == [("running", None)]


_LOOP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from supervisor.ledger import Ledger
    ledger = Ledger.open(Path(sys.argv[1]))
    task = ledger.task(9)
    print("ready", flush=True)
    while True:
        run = ledger.run_intent(
            task, shift="s1", worker="w1", machine="local", workspace="/ws",
            run_dir_of=lambda n: f"/runs/run-{n}", lease_path=None, prompt_kind="first",
            milestones_before=[],
        )
        ledger.run_started(run.id, run.number, run.number)
        task.last_exit = run.number % 256
        task.reason = "r" * (run.number % 7) * 9000  # now and then a transaction of many pages
        ledger.run_ended(run.id, exit_code=run.number % 256, outcome="crash", task=task,
                         shift="s1", worker="w1")
    """
)


def test_transitions_cut_by_sigkill_at_random_leave_old_or_new_state(tmp_path: Path) -> None:
    """Every transition that touches two tables (an intent and the task's run counter; an end
    and the task's last exit) is seen whole or not at all, wherever the kill lands."""
    with Ledger.open(tmp_path) as ledger:
        ledger.begin_shift(shift("s1"))
        ledger.save_task(TaskRecord(issue=9, state="running"), shift="s1", worker="w1")
    rng = random.Random(12)
    for _ in range(12):
        child = _child(_LOOP, str(tmp_path))
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.15))
        finally:
            _kill(child)
        with Ledger.open(tmp_path) as ledger:
            assert ledger._db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            task = ledger.task(9)
            runs = ledger.runs(issue=9)
            assert task is not None and runs
            assert [r.number for r in runs] == list(range(1, len(runs) + 1))
            assert task.runs == runs[-1].number  # the intent moved the counter with it
            ended = [r for r in runs if r.state == "ended"]
            assert all(r.state == "ended" for r in runs[:-1])
            # The task's last exit is the last ended run's: both were written together.
            assert task.last_exit == ended[-1].exit_code if ended else task.last_exit is None
            assert len(task.reason) == (ended[-1].number % 7) * 9000 if ended else True
            # Whatever was cut, the next run of the loop goes on from here: close its run.
            if runs[-1].state != "ended":
                ledger.run_ended(
                    runs[-1].id, exit_code=runs[-1].number % 256, task=task, shift="s1", worker="w1"
                )
                task.last_exit = runs[-1].number % 256
                task.reason = "r" * (runs[-1].number % 7) * 9000
                ledger.save_task(task, shift="s1", worker="w1")


# -- the state directory that holds it ------------------------------------------------------------


def test_the_state_directory_is_made_private(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    prepare_state_dir(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    opened = tmp_path / "opened"
    opened.mkdir(mode=0o755)
    opened.chmod(0o755)
    prepare_state_dir(opened)
    assert stat.S_IMODE(opened.stat().st_mode) == 0o700


@pytest.mark.parametrize("case", ["a-file", "another-users", "cannot-be-made"])
def test_an_unusable_state_directory_is_one_clear_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / "state"
    if case == "a-file":
        path.write_text("not a directory\n")
        words = "is not a directory"
    elif case == "another-users":
        if os.geteuid() != 0:
            pytest.skip("giving a directory to another user needs root")
        path.mkdir()
        os.chown(path, 12345, 12345)
        words = "belongs to another user (uid 12345)"
    else:
        path = Path("/proc/self/no-such/state")  # no one can make a directory there
        words = "cannot be made"
    with pytest.raises(StateDirUnusable) as caught:
        prepare_state_dir(path)
    message = str(caught.value)
    assert str(path) in message and words in message and "fix:" in message, message
    assert "\n" not in message
