"""Machines that come and go, in-process (issue 16's rules, on the fake Host of
``tests/fakehost.py``, which reports its reachability as the SSH host does and never gives a
run up while it is away):

* a run on a machine that goes away stays its worker's (its slot counts against the machine's
  ``max_agents``); its end is read once the machine is back and judged as if watched -- exit 0
  is done, a stop by its watchdog starts the next run without counting a crash;
* a task is never requeued beside a run of it that may live: ``requeue_lost`` moves only a
  task with no run on the machine, which otherwise waits for it; never a crash;
* a start whose answer was lost is settled by its run directory once the machine is back;
* when nothing is left but waiting for a machine that stays away, the shift gives its tasks up
  (``lost``), leaving their runs open in the ledger for the next ``up``;
* each change is in the ledger and the report names it.

The same against a real sshd: ``test_ssh_away.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.fleet import Fleet, FleetResult
from supervisor.ledger import Ledger
from tests.fakehost import FakeHost, Script, fake_config, until
from tests.test_fleet_inproc import _structlog_restored, states  # noqa: F401  (autouse)

pytestmark = pytest.mark.anyio
LIMIT = 15.0


def two_machines(tmp_path: Path, tasks: list[int], **overrides: Any) -> Any:
    """m1 (max 1, unreachable after 0.2 s) first, then local (max 1)."""
    settings: dict[str, Any] = {
        "concurrency": 2,
        "local": {"max_agents": 1},
        "machines": [
            {"name": "m1", "host": "m1.invalid", "max_agents": 1, "unreachable_after": 0.2}
        ],
    }
    return fake_config(tmp_path, [{"issue": n} for n in tasks], **{**settings, **overrides})


async def run_two(config: Any, m1: FakeHost, local: FakeHost) -> tuple[Fleet, FleetResult]:
    fleet = Fleet(config, hosts={"m1": m1, "local": local})
    with anyio.fail_after(LIMIT):
        return fleet, await fleet.run()


def machine_states(config: Any, name: str = "m1") -> list[str]:
    with Ledger.reader(config.state_path) as ledger:  # type: ignore[union-attr]
        return [e["state"] for e in ledger.machine_events(name)]


def report_of(fleet: Fleet) -> str:
    return (fleet.run_dir / "report.md").read_text()


@pytest.mark.parametrize("requeue", [False, True])
async def test_a_run_is_followed_to_its_end_across_its_machines_absence(
    tmp_path: Path, requeue: bool
) -> None:
    """#1 runs on m1, which goes away mid-run; #1 ends (exit 0) while it is away.  Once it is
    back the end is read: #1 done after one run, whether or not ``requeue_lost`` -- never
    started again beside itself; nothing else started on m1 meanwhile."""
    m1 = FakeHost("m1", {1: [Script(duration=0.4, away=(0.1, 0.8))]})
    local = FakeHost("local", {2: [Script(duration=0.05)], 3: [Script(duration=0.05)]})
    config = two_machines(tmp_path, [1, 2, 3], requeue_lost=requeue)
    fleet, result = await run_two(config, m1, local)
    assert result.exit_code == 0 and states(result) == dict.fromkeys((1, 2, 3), "done")
    assert [(s.issue, s.run) for s in m1.starts] == [(1, 1)]
    assert sorted((s.issue, s.run) for s in local.starts) == [(2, 1), (3, 1)]
    assert result.workers[0].crashes == 0
    assert machine_states(config) == ["unreachable", "back", "up"]
    assert "machine m1 unreachable since" in report_of(fleet)
    assert ", back at " in report_of(fleet)


async def test_a_run_stopped_by_its_watchdog_while_away_is_restarted_not_counted(
    tmp_path: Path,
) -> None:
    m1 = FakeHost(
        "m1", {1: [Script(duration=0.3, away=(0.05, 0.6), watchdog=True), Script(duration=0.05)]}
    )
    config = two_machines(tmp_path, [1], local={"max_agents": 0})
    _, result = await run_two(config, m1, FakeHost("local"))
    assert result.exit_code == 0
    (worker,) = result.workers
    assert (worker.state, worker.run, worker.crashes) == ("done", 2, 0)
    assert not m1.overlapping(1)


@pytest.mark.parametrize("requeue", [False, True])
async def test_a_task_between_runs_waits_for_its_machine_or_moves(
    tmp_path: Path, requeue: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#1's first run on m1 crashes; m1 goes away during its backoff.  The next attempt
    cannot reach m1: no crash for that; #1 waits for m1 and runs there again -- or, with
    ``requeue_lost``, starts over on local (no run of it lives on m1)."""
    monkeypatch.setattr("supervisor.workrun.random.random", lambda: 0.9)  # backoff: 0.27 s
    m1 = FakeHost("m1", {1: [Script(exit=1, duration=0.05), Script()]})
    local = FakeHost("local", {1: [Script()]})
    config = two_machines(
        tmp_path, [1], requeue_lost=requeue, restart={"backoff_base": 0.3, "backoff_max": 0.3}
    )
    fleet = Fleet(config, hosts={"m1": m1, "local": local})

    async def away_after_the_crash() -> None:
        worker = fleet.worker_for(1)
        assert worker is not None
        await until(lambda: worker.status.state == "backoff", LIMIT)
        m1.go_away(0.7)

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(away_after_the_crash)
            result = await fleet.run()
    assert result.exit_code == 0
    (worker,) = result.workers
    assert (worker.state, worker.crashes) == ("done", 1)
    if requeue:
        assert [s.run for s in m1.starts] == [1] and [s.run for s in local.starts] == [2]
        assert local.starts[0].argv[-1] == "/issue-to-impl 1"  # starts over: first prompt
    else:
        assert [s.run for s in m1.starts] == [1, 2] and not local.starts
        assert m1.starts[1].at >= m1.starts[0].ended_at + 0.6  # type: ignore[operator]


@pytest.mark.parametrize("started", [True, False])
async def test_a_start_whose_answer_was_lost_is_settled_by_its_run_directory(
    tmp_path: Path, started: bool
) -> None:
    """m1 goes away while #1 starts: once it is back, the run directory says whether the run
    started (then it is followed: one run) or not (abandoned, a new run: still one agent)."""
    m1 = FakeHost(
        "m1", {1: [Script(duration=0.1, unanswered=0.4, started=started), Script(duration=0.05)]}
    )
    config = two_machines(tmp_path, [1], local={"max_agents": 0})
    _, result = await run_two(config, m1, FakeHost("local"))
    assert result.exit_code == 0 and states(result) == {1: "done"}
    assert len(m1.starts) == 1 and result.workers[0].crashes == 0
    with Ledger.reader(config.state_path) as ledger:  # type: ignore[union-attr]
        runs = [(r.number, r.state) for r in ledger.runs(issue=1)]
    assert runs == ([(1, "ended")] if started else [(1, "abandoned"), (2, "ended")])


async def test_a_machine_that_stays_away_ends_the_shift_with_its_tasks_lost(
    tmp_path: Path,
) -> None:
    """m1 goes away for good under #1's run; #2 runs on local and ends.  Then nothing is left
    but waiting for m1: #1 is lost (not failed, not crashed), its run left open in the ledger
    for the next ``up``; the report says m1 was not back by the end."""
    m1 = FakeHost("m1", {1: [Script(hang=True, away=(0.05, math.inf))]})
    local = FakeHost("local", {2: [Script(duration=0.3)]})
    config = two_machines(tmp_path, [1, 2])
    fleet, result = await run_two(config, m1, local)
    assert result.exit_code == 1 and states(result) == {1: "lost", 2: "done"}
    assert result.workers[0].crashes == 0
    with Ledger.reader(config.state_path) as ledger:  # type: ignore[union-attr]
        (run,) = ledger.runs(issue=1)
    assert run.state == "running"  # open: the next `up` looks at it again
    assert "machine m1 unreachable since" in report_of(fleet)
    assert "not back by the shift's end" in report_of(fleet)
