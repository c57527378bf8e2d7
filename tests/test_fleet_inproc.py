"""The fleet in-process, on a fake Host (``tests/fakehost.py``): the cap, crashes, milestones,
stops, usage-limit holds, lost links, recovery of runs a dead shift left, and the slot rule of
restarts -- each in well under a second.  The end-to-end tests (real ``up``, real processes)
are in ``test_fleet_local.py``, ``test_orphans.py``, ``test_steer.py`` and ``test_chaos.py``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest
import structlog

from supervisor.config import FleetConfig
from supervisor.fleet import Deadline, Fleet, FleetResult
from supervisor.ledger import Ledger, ShiftRecord, TaskRecord
from tests.fakehost import FakeHost, Script, fake_config, until

pytestmark = pytest.mark.anyio
LIMIT = 10.0


@pytest.fixture(autouse=True)
def _structlog_restored() -> Iterator[None]:
    """A fleet routes structlog into its log; the tests after this one get theirs back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def task(issue: int, **fields: Any) -> dict[str, Any]:
    return {"issue": issue, **fields}


async def run_fleet(
    config: FleetConfig, host: FakeHost, **kwargs: Any
) -> tuple[Fleet, FleetResult]:
    fleet = Fleet(config, hosts={host.name: host}, **kwargs)
    with anyio.fail_after(LIMIT):
        result = await fleet.run()
    return fleet, result


def states(result: FleetResult) -> dict[int, str]:
    return {w.task: str(w.state) for w in result.workers}


async def test_the_cap_holds_and_every_task_ends(tmp_path: Path) -> None:
    host = FakeHost(scripts={n: [Script(duration=0.03)] for n in range(1, 9)})
    config = fake_config(tmp_path, [task(n) for n in range(1, 9)], concurrency=3)
    _, result = await run_fleet(config, host)
    assert result.exit_code == 0
    assert states(result) == dict.fromkeys(range(1, 9), "done")
    assert host.peak == 3 and len(host.starts) == 8


async def test_crash_restarts_then_the_intensity_limit_fails_it(tmp_path: Path) -> None:
    host = FakeHost(scripts={1: [Script(exit=3), Script()], 2: [Script(exit=1)]})
    config = fake_config(tmp_path, [task(1), task(2)], restart={"max_crashes": 2})
    _, result = await run_fleet(config, host)
    assert result.exit_code == 1
    by_task = {w.task: w for w in result.workers}
    assert (by_task[1].state, by_task[1].run, by_task[1].crashes) == ("done", 2, 1)
    assert (by_task[2].state, by_task[2].run, by_task[2].crashes) == ("failed", 3, 3)
    assert "crashes within" in by_task[2].reason


async def test_a_milestone_resumes_with_the_resume_prompt(tmp_path: Path) -> None:
    host = FakeHost(scripts={4: [Script(milestone=True), Script(milestone=True), Script()]})
    config = fake_config(tmp_path, [task(4)])
    _, result = await run_fleet(config, host)
    assert result.exit_code == 0
    prompts = [s.argv[-1] for s in host.runs_of(4)]
    assert prompts == [
        "/issue-to-impl 4",
        "Continue from the latest milestone",
        "Continue from the latest milestone",
    ]
    assert (result.workers[0].milestones, result.workers[0].run) == (2, 3)


async def test_a_stop_stops_every_run_and_leaves_them_stopped(tmp_path: Path) -> None:
    host = FakeHost(scripts={n: [Script(hang=True)] for n in (1, 2, 3)})
    config = fake_config(tmp_path, [task(n) for n in (1, 2, 3)], concurrency=2)
    fleet = Fleet(config, hosts={"local": host})

    async def stop_when_running() -> None:
        await until(lambda: len(host.alive) >= 2)
        fleet.stop.request("test")

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_when_running)
            result = await fleet.run()
    assert result.exit_code == 130
    assert states(result) == dict.fromkeys((1, 2, 3), "stopped")
    assert not host.alive and [s.code for s in host.starts] == [143, 143]


async def test_a_usage_limit_holds_the_machine_and_gives_the_slot_back(tmp_path: Path) -> None:
    host = FakeHost(scripts={1: [Script(limit_in=0.4, exit=1), Script()], 2: [Script()]})
    config = fake_config(tmp_path, [task(1), task(2)], concurrency=1)
    _, result = await run_fleet(config, host)
    assert result.exit_code == 0
    _, second = host.runs_of(1)
    assert result.workers[0].usage_pauses == 1 and result.workers[0].crashes == 0
    assert second.argv[-1] == "Continue from the latest milestone"
    (hold,) = Ledger.reader(config.state_path).holds()  # type: ignore[union-attr]
    assert hold["machine"] == "local" and hold["reason"] == "usage limit"
    assert host.runs_of(2)[0].at >= hold["until"] - 0.05  # nothing new before the reset


async def test_a_reset_time_is_read_in_the_machines_time_zone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "resets 5pm" printed on a machine whose zone is not the supervisor's means 5pm there
    (the hour the test uses is six hours ahead of the machine's clock, whenever it runs)."""
    monkeypatch.setattr("supervisor.workrun.random.random", lambda: 0.0)  # no reset jitter
    zone = "Pacific/Kiritimati"  # UTC+14: 5pm there is not 5pm here, wherever here is
    if datetime.now(ZoneInfo(zone)).utcoffset() == datetime.now().astimezone().utcoffset():
        pytest.skip("the supervisor runs in the machine's zone")
    # Hours ahead of the machine's clock: never just passed (then it would mean "now").
    hour = (datetime.now(ZoneInfo(zone)).hour + 6) % 24
    said = f"{hour % 12 or 12}{'pm' if hour >= 12 else 'am'}"
    host = FakeHost(
        scripts={1: [Script(exit=1, stdout=(f"5-hour limit reached ∙ resets {said}",))]}, zone=zone
    )
    config = fake_config(tmp_path, [task(1)])
    fleet = Fleet(config, hosts={"local": host})

    async def stop_once_held() -> None:
        await until(lambda: fleet.machines["local"].held_until is not None)
        fleet.stop.request("test")

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_once_held)
            await fleet.run()
    until_at = fleet.machines["local"].held_until or 0.0
    with Ledger.reader(config.state_path) as ledger:  # type: ignore[union-attr]
        (hold,) = ledger.holds()
    there = datetime.fromtimestamp(hold["until"], ZoneInfo(zone))
    assert (there.hour, there.minute) == (hour, 0), there
    assert until_at == 0.0 or until_at == hold["until"]


# -- the slot rule (issue 15): what the console says is what happens -----------------------------


async def test_a_crashed_task_keeps_its_slot_through_a_short_backoff(tmp_path: Path) -> None:
    """cap 1: #1 crashes; its restart comes before #2 and #3 get the slot (it used to queue
    behind every pending task, "restarting in 0.1s" and then waiting minutes)."""
    host = FakeHost(scripts={1: [Script(exit=1), Script()], 2: [Script()], 3: [Script()]})
    config = fake_config(
        tmp_path,
        [task(1), task(2), task(3)],
        concurrency=1,
        restart={"backoff_base": 0.2, "backoff_max": 0.2},
    )
    fleet, result = await run_fleet(config, host)
    assert result.exit_code == 0
    order = [(s.issue, s.run) for s in host.starts]
    assert order == [(1, 1), (1, 2), (2, 1), (3, 1)], order
    crashed = [r for r in _events(fleet, "crashed")]
    assert "restarting in" in crashed[0]["line"] and "slot" not in crashed[0]["line"]


async def test_a_long_backoff_gives_the_slot_back_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("supervisor.workrun.random.random", lambda: 0.9)  # the jitter: 54 s
    host = FakeHost(scripts={1: [Script(exit=1), Script()], 2: [Script(duration=0.1)]})
    config = fake_config(
        tmp_path, [task(1), task(2)], concurrency=1, restart={"backoff_base": 60, "backoff_max": 60}
    )
    fleet = Fleet(config, hosts={"local": host})
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_restart_when_waiting, fleet, 1)
            result = await fleet.run()
    assert result.exit_code == 0
    (crashed,) = _events(fleet, "crashed")
    assert "its slot goes to others meanwhile" in crashed["line"]
    assert [(s.issue, s.run) for s in host.starts][:2] == [(1, 1), (2, 1)]


async def test_the_soft_deadline_ends_a_backoff_that_could_never_start_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#1 crashes into a long backoff; the soft deadline comes meanwhile: no new run may start
    after it, so #1 stops waiting (stopped, the deadline its reason) and the shift ends with
    #2's run instead of sleeping out the backoff (it used to wait a minute for nothing)."""
    monkeypatch.setattr("supervisor.workrun.random.random", lambda: 0.9)  # the jitter: 54 s
    host = FakeHost(scripts={1: [Script(exit=1), Script()], 2: [Script(duration=0.6)]})
    config = fake_config(
        tmp_path, [task(1), task(2)], concurrency=2, restart={"backoff_base": 60, "backoff_max": 60}
    )
    began = time.time()
    _, result = await run_fleet(config, host, deadline=Deadline(soft=time.time() + 0.3))
    assert time.time() - began < 5
    by_task = {w.task: w for w in result.workers}
    assert (by_task[1].state, by_task[1].run) == ("stopped", 1), by_task[1]
    assert "soft deadline" in by_task[1].reason
    assert by_task[2].state == "done"
    assert [(s.issue, s.run) for s in host.starts] == [(1, 1), (2, 1)]


async def _restart_when_waiting(fleet: Fleet, issue: int) -> None:
    worker = fleet.worker_for(issue)
    assert worker is not None
    await until(lambda: str(worker.status.state) == "backoff")
    await anyio.sleep(0.05)
    assert worker.request_restart() is True


async def test_restart_starts_the_next_run_at_once_in_the_same_slot(tmp_path: Path) -> None:
    """cap 1, #42 running, #7 pending: `restart 42` starts run 2 of #42 at once (it took 61 s,
    behind the pending tasks)."""
    host = FakeHost(
        scripts={42: [Script(hang=True), Script(duration=0.05)], 7: [Script(duration=0.05)]}
    )
    config = fake_config(tmp_path, [task(42), task(7)], concurrency=1)
    fleet = Fleet(config, hosts={"local": host})

    async def restart() -> None:
        await until(lambda: host.alive)
        answer = await fleet.handle_request({"cmd": "restart", "task": 42})
        assert answer["ok"] and "starts at once in its slot" in answer["message"], answer

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(restart)
            result = await fleet.run()
    assert result.exit_code == 0
    assert [(s.issue, s.run) for s in host.starts] == [(42, 1), (42, 2), (7, 1)]
    assert host.peak == 1
    assert result.workers[0].crashes == 0


# -- across shifts: the ledger -----------------------------------------------------------------


async def test_a_done_task_is_not_run_again_and_a_failed_one_is(tmp_path: Path) -> None:
    host = FakeHost(scripts={1: [Script()], 2: [Script(exit=1), Script()]})
    config = fake_config(tmp_path, [task(1), task(2)], restart={"max_crashes": 0})
    _, first = await run_fleet(config, host)
    assert states(first) == {1: "done", 2: "failed"}
    _, second = await run_fleet(config, host)
    assert states(second) == {1: "done", 2: "done"} and second.exit_code == 0
    assert [(s.issue, s.run) for s in host.starts] == [(1, 1), (2, 1), (2, 2)]
    await run_fleet(config, host, rerun=[1])
    assert [(s.issue, s.run) for s in host.starts][3:] == [(1, 2)]


def _dead_shift(state_dir: Path, shift: str) -> Ledger:
    """A ledger as a killed ``up`` leaves it: its shift still ``running``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.open(state_dir)
    ledger.begin_shift(
        ShiftRecord(
            id=shift,
            pid=999999,
            pid_ticks=1,
            host="h",
            config="c",
            dir=str(state_dir / "runs" / shift),
            name="inproc",
            concurrency=1,
            started_at=time.time() - 10,
            ended_at=None,
            exit_code=None,
            exit_meaning=None,
            state="running",
            found_by=None,
        )
    )
    return ledger


async def _orphan(
    host: FakeHost,
    ledger: Ledger,
    shift: str,
    issue: int,
    script: Script,
    state_dir: Path,
    lease: str | None = None,
) -> str:
    """A run of ``issue`` started by the dead shift, alive on ``host`` (or ended, as scripted)."""
    from supervisor.hosts.base import RunSpec

    task_record = TaskRecord(issue=issue, state="running", workspace="/ws/issue", machine="local")
    run = ledger.run_intent(
        task_record,
        shift=shift,
        worker="w1",
        machine="local",
        workspace="/ws/issue",
        run_dir_of=lambda n: str(state_dir / "runs" / shift / "agents" / "w1" / f"run-{n}"),
        lease_path=lease,
        prompt_kind="first",
        milestones_before=[],
    )
    host.scripts[issue] = [script, *host.scripts.get(issue, [Script()])]
    handle = await host.start(
        RunSpec(
            argv=["agent"],
            cwd="/ws/issue",
            run_dir=run.run_dir,
            lease_path="",
            lease_timeout=0,
            env={"AGENTIZE_FLEET_ISSUE": str(issue), "AGENTIZE_FLEET_RUN": str(run.number)},
        )
    )
    ledger.run_started(run.id, handle.identity.pid, handle.identity.start_ticks)
    return run.run_dir


async def test_adoption_comes_first_and_takes_its_slot_at_once(tmp_path: Path) -> None:
    """cap 1: the dead shift's live run of #1 is adopted before #2 may start, and #2 starts
    only once it ended: never two agents under cap 1 (adoptions used to queue behind new runs)."""
    config = fake_config(tmp_path, [task(2), task(1)], concurrency=1)
    host = FakeHost(scripts={2: [Script()]})
    ledger = _dead_shift(config.state_path, "dead-1")
    await _orphan(host, ledger, "dead-1", 1, Script(duration=0.3), config.state_path)
    ledger.close()
    host.peak = len(host.alive)
    fleet, result = await run_fleet(config, host)
    assert result.exit_code == 0 and states(result) == {1: "done", 2: "done"}
    assert host.peak == 1
    assert [(s.issue, s.run) for s in host.starts] == [(1, 1), (2, 1)]  # no new run of #1
    (adopted,) = _events(fleet, "adopted")
    assert adopted["task"] == 1 and adopted["from_fleet"] == "dead-1" and adopted["live"]
    with Ledger.reader(config.state_path) as ledger:  # type: ignore[union-attr]
        assert ledger.shift("dead-1").state == "died"  # type: ignore[union-attr]
        (run,) = ledger.runs(issue=1)
        assert run.supervisors == ("dead-1", fleet.shift_id) and run.state == "ended"


async def test_a_dead_shifts_lease_lives_as_long_as_its_adopted_run(tmp_path: Path) -> None:
    """The adopted run's own lease is renewed while it is watched, no longer after; the dead
    shift's watchdogs are dismissed as soon as it ends (they used to outlive the adoption by
    up to a third of the lease)."""
    config = fake_config(tmp_path, [task(1), task(2)], lease_timeout=2)
    host = FakeHost(scripts={2: [Script(duration=1.5)]})
    ledger = _dead_shift(config.state_path, "dead-5")
    run_dir = await _orphan(
        host, ledger, "dead-5", 1, Script(duration=0.6), config.state_path, lease="/dead-5/lease"
    )
    ledger.close()
    fleet = Fleet(config, hosts={"local": host})
    renewed_while_watched: list[bool] = []

    async def watch() -> None:
        await until(lambda: host.runs_of(1)[0].ended_at is not None)
        renewed_while_watched.append(run_dir in host.leases)
        await anyio.sleep(0.1)  # its worker sees the end
        host.leases.clear()

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            result = await fleet.run()
    assert result.exit_code == 0
    assert renewed_while_watched == [True]
    assert run_dir not in host.leases  # not renewed once its run had ended
    dismissals = [c for c in host.commands if c[-1] == "/dead-5/lease"]
    assert dismissals and dismissals[0][:2] == ["sh", "-c"]


async def test_a_run_that_ended_unwatched_is_decided_as_if_watched(tmp_path: Path) -> None:
    """Its milestone is found and the task resumes (run 2, resume prompt); nothing is lost."""
    config = fake_config(tmp_path, [task(5)])
    host = FakeHost()
    ledger = _dead_shift(config.state_path, "dead-2")
    await _orphan(
        host, ledger, "dead-2", 5, Script(duration=0.0, milestone=True), config.state_path
    )
    ledger.close()
    await anyio.sleep(0.01)
    fleet, result = await run_fleet(config, host)
    assert result.exit_code == 0
    assert [(s.issue, s.run) for s in host.starts] == [(5, 1), (5, 2)]
    assert host.runs_of(5)[1].argv[-1] == "Continue from the latest milestone"
    assert result.workers[0].milestones == 1
    (adopted,) = _events(fleet, "adopted")
    assert adopted["live"] is False


async def test_an_intent_that_never_started_is_abandoned_and_run_anew(tmp_path: Path) -> None:
    config = fake_config(tmp_path, [task(6)])
    host = FakeHost()
    ledger = _dead_shift(config.state_path, "dead-3")
    ledger.run_intent(
        TaskRecord(issue=6),
        shift="dead-3",
        worker="w1",
        machine="local",
        workspace=None,
        run_dir_of=lambda n: f"/nowhere/run-{n}",
        lease_path=None,
        prompt_kind="first",
        milestones_before=[],
    )
    ledger.close()
    _, result = await run_fleet(config, host)
    assert result.exit_code == 0
    assert [(s.issue, s.run) for s in host.starts] == [(6, 2)]
    with Ledger.reader(config.state_path) as ledger:  # type: ignore[union-attr]
        assert [r.state for r in ledger.runs(issue=6)] == ["abandoned", "ended"]


async def test_a_task_no_longer_in_the_config_is_reported_and_its_run_stopped(
    tmp_path: Path,
) -> None:
    config = fake_config(tmp_path, [task(1)])
    host = FakeHost()
    ledger = _dead_shift(config.state_path, "dead-4")
    await _orphan(host, ledger, "dead-4", 9, Script(hang=True), config.state_path)
    ledger.close()
    fleet, result = await run_fleet(config, host)
    assert result.exit_code == 0 and not host.alive
    (said,) = _events(fleet, "task-unlisted")
    assert "task #9 is in the ledger but no longer in the config" in said["line"]
    (stopped,) = _events(fleet, "orphan-stopped")
    assert stopped["task"] == 9
    summary = (fleet.run_dir / "summary.json").read_text()
    assert '"not_in_config":[{"task":9' in summary


def _events(fleet: Fleet, name: str) -> list[dict[str, Any]]:
    import json

    with open(fleet.run_dir / "fleet.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    return [r for r in records if r.get("event") == name]
