"""Resource faults, the fleet's side (issue 12): a log or a ledger that cannot be written holds
new runs and never crashes the supervisor; running agents go on; what was held is written once
the disk takes it again; a state directory that cannot be used at start is exit 2.

The faults are real: the ledger's files or the shift's directory made immutable (``chattr +i``
refuses writes even to root, on an open file too: ``EPERM``, SQLite's ``disk I/O error``), a
small tmpfs filled to the last byte (``ENOSPC``, ``SQLITE_FULL``) or to the last inode.  The
writer's own handling of a full or read-only disk is tested in ``test_disk_faults.py``, whose
fixtures these tests share.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import supervisor.ledger
import supervisor.logwriter
from supervisor.fleet import Fleet
from supervisor.ledger import Ledger, LedgerUnwritable, TaskRecord, ledger_path
from supervisor.records import EventRecord, OutputRecord, log_files, parse
from tests.conftest import Harness, task, wait_for
from tests.fakehost import FakeHost, Script, fake_config, until
from tests.fleet_helpers import cli, try_status
from tests.sshd import SSHD
from tests.test_disk_faults import (  # noqa: F401  (fixtures: immutable, small_disk)
    chattr,
    fill,
    immutable,
    mount_tmpfs,
    small_disk,
    unmount,
)
from tests.test_fleet_inproc import _structlog_restored  # noqa: F401  (autouse)
from tests.test_ledger import intent, shift
from tests.test_ssh_fleet import machine, ssh_config

LIMIT = 20.0


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The log and the ledger try a failed write again every 50 ms (not every second)."""
    monkeypatch.setattr(supervisor.logwriter, "RETRY_INTERVAL", 0.05)
    monkeypatch.setattr(supervisor.ledger, "RETRY_INTERVAL", 0.05)


def ledger_files(state_dir: Path) -> list[Path]:
    path = ledger_path(state_dir)
    return [path, path.with_name(path.name + "-wal")]


def freeze(paths: list[Path], made: list[Path]) -> None:
    """``chattr +i`` each of ``paths`` (undone by the ``immutable`` fixture whatever happens)."""
    for path in paths:
        made.append(path)
        chattr(path, "+i")


def thaw(paths: list[Path]) -> None:
    for path in paths:
        chattr(path, "-i")


# -- the ledger ----------------------------------------------------------------------------------


def test_a_ledger_that_cannot_be_written_refuses_acts_and_keeps_what_was_done(
    tmp_path: Path,
    immutable: list[Path],
) -> None:
    """A transition that announces an act (an intent) is refused, so the act does not happen;
    those that record acts already done (a pid, an end) wait in memory, in order, and are
    written once the ledger can be written again; ``on_fault`` says when each of those began."""
    ledger = Ledger.open(tmp_path)
    ledger.begin_shift(shift("s1"))
    run_id = intent(ledger, TaskRecord(issue=1, state="running"), "s1")
    faults: list[LedgerUnwritable | None] = []
    ledger.on_fault = faults.append
    freeze(ledger_files(tmp_path), immutable)

    ledger.run_started(run_id, 123, 456)  # the agent runs: this cannot be undone
    assert len(faults) == 1 and isinstance(faults[0], LedgerUnwritable), faults
    assert "disk I/O error" in str(faults[0]) and "fix:" in str(faults[0])
    done = TaskRecord(issue=1, state="done", runs=1)
    ledger.run_ended(run_id, exit_code=0, outcome="done", task=done, shift="s1", worker="w1")
    with pytest.raises(LedgerUnwritable):
        intent(ledger, TaskRecord(issue=2), "s1")  # no intent, no start
    assert ledger.waiting == 2 and not ledger.retry() and len(faults) == 1

    with Ledger.reader(tmp_path) as reader:  # type: ignore[union-attr]
        assert reader.run(run_id).state == "intent"  # type: ignore[union-attr]
    thaw(ledger_files(tmp_path))
    assert ledger.retry() and faults[-1] is None and ledger.waiting == 0
    run = ledger.run(run_id)
    assert run is not None and (run.state, run.pid, run.exit_code) == ("ended", 123, 0)
    assert ledger.task(1).state == "done"  # type: ignore[union-attr]
    assert ledger.run(intent(ledger, TaskRecord(issue=2), "s1")) is not None
    assert [r.issue for r in ledger.runs()] == [1, 2]
    ledger.close()


# -- the fleet, in-process -----------------------------------------------------------------------


def _events(fleet: Fleet) -> list[EventRecord]:
    records = [
        parse(raw) for path in log_files(fleet.run_dir) for raw in path.read_bytes().splitlines()
    ]
    return [r for r in records if isinstance(r, EventRecord)]


@pytest.mark.anyio
@pytest.mark.parametrize("what", ["log", "ledger"])
async def test_no_run_starts_while_the_log_or_the_ledger_cannot_be_written(
    tmp_path: Path,
    immutable: list[Path],
    quick_retries: None,
    what: str,
) -> None:
    """cap 2: #1 (long) and #2 (short) run; the log (or the ledger) becomes unwritable.  #2's
    end finds it so: new runs are held -- #3 does not start, though a slot is free -- while #1
    goes on to its own end; once the file can be written again #3 starts, and the shift ends
    with every task done, every transition in the ledger and every event in the log."""
    host = FakeHost(
        scripts={1: [Script(duration=1.2)], 2: [Script(duration=0.2)], 3: [Script(duration=0.05)]}
    )
    config = fake_config(tmp_path, [{"issue": n} for n in (1, 2, 3)], concurrency=2)
    fleet = Fleet(config, hosts={"local": host})
    files = [fleet.run_dir / "fleet.jsonl"] if what == "log" else ledger_files(config.state_path)
    seen: dict[str, Any] = {}

    async def break_and_mend() -> None:
        await until(lambda: len(host.alive) == 2, LIMIT)
        freeze(files, immutable)
        await until(lambda: fleet.starts.holds, LIMIT)
        seen["held"] = dict(fleet.starts.holds)
        await until(lambda: host.runs_of(1)[0].ended_at is not None, LIMIT)
        await anyio.sleep(0.2)
        seen["starts while held"] = [s.issue for s in host.starts]
        seen["first run"] = host.runs_of(1)[0].code
        thaw(files)

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(break_and_mend)
            result = await fleet.run()
    assert seen["held"] == {what: f"the {what} cannot be written"}
    assert seen["starts while held"] == [1, 2] and seen["first run"] == 0
    assert result.exit_code == 0
    assert [s.issue for s in host.starts] == [1, 2, 3]
    names = [e.event for e in _events(fleet)]
    fault = names.index(f"{what}-unwritable")
    assert names.index(f"{what}-writable") < names.index("starts-resumed")
    assert names.count(f"{what}-unwritable") == 1 and fault < names.index("starts-resumed")
    with Ledger.reader(config.state_path) as ledger:  # type: ignore[union-attr]
        assert {t.issue: t.state for t in ledger.tasks().values()} == dict.fromkeys(
            (1, 2, 3), "done"
        )
        assert [(r.issue, r.state, r.exit_code) for r in ledger.runs()] == [
            (1, "ended", 0),
            (2, "ended", 0),
            (3, "ended", 0),
        ]
        assert ledger.shift(fleet.shift_id).state == "ended"  # type: ignore[union-attr]


# -- up, from the command line --------------------------------------------------------------------


@pytest.fixture
def few_inodes(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 400 inodes for the state directory, unmounted after the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "state-disk"
    mount_tmpfs(disk, "16m", "nr_inodes=400")
    try:
        yield disk
    finally:
        unmount(disk)


def leave_inodes(disk: Path, free: int) -> None:
    """Make or remove empty files in ``disk/filler`` until exactly ``free`` inodes are left."""
    filler = disk / "filler"
    filler.mkdir(exist_ok=True)
    made = sorted(filler.iterdir(), key=lambda p: int(p.name))
    count = len(made)
    while (left := os.statvfs(disk).f_ffree) != free:
        if left > free:
            count += 1
            (filler / str(count)).touch()
        else:
            made.pop().unlink()


def test_a_state_dir_that_runs_out_while_up_starts_is_exit_2_never_a_traceback(
    fleet: Harness, few_inodes: Path
) -> None:
    """Each file ``up`` makes as it starts is, in turn, the one the disk refuses (no inode
    left): the state directory's probe, the ledger's journal, the shift's log.
    Each is exit 2 with one message naming the file and the fix, and leaves no shift directory
    behind; past those the shift runs (what it cannot write is a line, not a crash)."""
    config = fleet.write(fleet.config([task(1, "exit")], state_dir=str(few_inodes)))
    first = fleet.run(config)
    assert first.returncode == 0, first.explain()
    refusals: list[str] = []
    for free in range(12):
        leave_inodes(few_inodes, free)
        shifts_before = set((few_inodes / "runs").iterdir())
        result = fleet.run(config)
        assert "Traceback" not in result.stderr + result.stdout, result.explain()
        if result.returncode != 2:
            break
        message = result.stderr.strip()
        assert "fix:" in message and str(few_inodes) in message, message
        assert "No space left on device" in message or "unable to open" in message, message
        assert set((few_inodes / "runs").iterdir()) == shifts_before
        refusals.append(message)
    assert result.returncode == 0, result.explain()
    assert len(refusals) >= 3, refusals
    said = "\n".join(refusals)
    for words in ("is not writable", "the ledger", "cannot write the fleet's log"):
        assert words in said, said
    # The shift that got past them said what it could not write, and ran its task.
    assert "not started again" in result.stdout, result.explain()
    said = "\n".join(line for line in result.stdout.splitlines() if "✗" in line)
    assert "control socket" in said or "shift.json" in said, result.explain()


def test_the_state_disk_fills_while_remote_agents_run(
    fleet: Harness,
    sshd: SSHD,
    tmp_path: Path,
    small_disk: Path,
) -> None:
    """``up`` on a state directory whose disk fills while its agents run (on an SSH machine,
    whose run directories are on another disk): no traceback, no agent killed, no new run
    while it is full; once there is room again every line of both streams is logged exactly
    once, the third task runs, and the summary and exit code are written."""
    state_disk = small_disk
    workdir = tmp_path / "m1-work"
    agent = {"FAKE_AGENT_STEPS": "40", "FAKE_AGENT_STEP_DELAY": "0.1"}
    config = ssh_config(
        fleet,
        [task(n, "stderr+finish") for n in (1, 2, 3)],
        concurrency=2,
        state_dir=str(state_disk),
        local={"max_agents": 0},
        agent={"env": agent},
        machines=[machine(sshd, "m1", workdir, max_agents=2)],
    )
    started = fleet.start(fleet.write(config))
    wait_for(lambda: len(fleet.agent_records("start")) == 2, 60, "two remote agents")
    shift_dir = wait_for(
        lambda: next((state_disk / "runs").glob("*/fleet.jsonl"), None), 10, "the log"
    ).parent
    wait_for(
        lambda: b'"stream":"stderr"' in (shift_dir / "fleet.jsonl").read_bytes(),
        20,
        "output in the log",
    )
    filler = fill(state_disk, 0)
    status = wait_for(
        lambda: (s := try_status(state_disk)) and s.get("held") and s, 20, "new runs held"
    )
    assert set(status["held"]) <= {"log", "ledger"}, status
    # The agents go on to their ends meanwhile, and the third task does not start.
    wait_for(lambda: fleet.agent_records("end"), 30, "an agent's end")
    time.sleep(0.5)
    assert sorted(r["issue"] for r in fleet.agent_records("start")) == [1, 2]
    assert (try_status(state_disk) or {}).get("held"), "new runs allowed on a full disk"
    filler.unlink()
    result = started.wait(90)
    assert result.returncode == 0, result.explain()
    assert "Traceback" not in result.stdout + result.stderr, result.explain()
    ends = fleet.agent_records("end")
    assert sorted((r["issue"], r["exit"]) for r in ends) == [(1, 0), (2, 0), (3, 0)]
    summary = json.loads((shift_dir / "summary.json").read_text())
    assert summary["exit_code"] == 0
    records = [
        parse(raw) for path in log_files(shift_dir) for raw in path.read_bytes().splitlines()
    ]
    events = [r.event for r in records if isinstance(r, EventRecord)]
    assert events.count("log-unwritable") <= 1 and events.count("starts-resumed") == 1, events
    with Ledger.reader(state_disk) as ledger:  # type: ignore[union-attr]
        runs = ledger.runs()
    assert sorted((r.issue, r.state, r.exit_code) for r in runs) == [
        (1, "ended", 0),
        (2, "ended", 0),
        (3, "ended", 0),
    ]
    for run in runs:
        for stream in ("stdout", "stderr"):
            logged = [
                r.line
                for r in records
                if isinstance(r, OutputRecord)
                and r.task == run.issue
                and r.run == run.number
                and r.stream == stream
            ]
            written = Path(run.run_dir, stream).read_text().splitlines()
            assert logged == written, (run.issue, stream, len(logged), len(written))


def test_a_shift_directory_that_refuses_writes_costs_lines_not_the_shift(
    fleet: Harness,
    immutable: list[Path],
) -> None:
    """The shift's directory and its log made immutable while two agents print (``EPERM``
    even for root, the same for the fleet as permissions taken away): new runs are held, the
    agents go on; SIGTERM then stops them as usual, and the shift ends with exit 130 and no
    traceback, though neither its log, its summary nor its report can be written -- it says
    so on the terminal.  Once writable again, ``report`` rebuilds the report from the
    ledger."""
    agent = {"FAKE_AGENT_STEPS": "400", "FAKE_AGENT_STEP_DELAY": "0.05"}
    config = fleet.write(
        fleet.config(
            [task(n, "stderr+finish") for n in (1, 2, 3)], concurrency=2, agent={"env": agent}
        )
    )
    started = fleet.start(config)
    wait_for(lambda: len(fleet.agent_records("start")) == 2, 30, "two agents")
    shift_dir = wait_for(
        lambda: next((fleet.state_dir / "runs").glob("*/fleet.jsonl"), None), 10, "the log"
    ).parent
    freeze([shift_dir / "fleet.jsonl", shift_dir], immutable)
    wait_for(lambda: (try_status(fleet.state_dir) or {}).get("held"), 20, "new runs held")
    os.kill(started.popen.pid, signal.SIGTERM)
    result = started.wait(60)
    assert result.returncode == 130, result.explain()
    assert "Traceback" not in result.stdout + result.stderr, result.explain()
    assert not result.leftovers, result.leftovers
    assert "could not be written" in result.stdout, result.explain()
    assert sorted(r["issue"] for r in fleet.agent_records("start")) == [1, 2]
    thaw([shift_dir / "fleet.jsonl", shift_dir])
    assert not (shift_dir / "summary.json").exists()
    with Ledger.reader(fleet.state_dir) as ledger:  # type: ignore[union-attr]
        (record,) = ledger.shifts()
        assert (record.state, record.exit_code) == ("ended", 130)
    done = cli(fleet, config, "report", "--shift", shift_dir.name)
    assert done.returncode == 0 and (shift_dir / "report.md").exists(), done.stderr
