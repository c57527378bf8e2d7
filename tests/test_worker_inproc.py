"""One worker in-process, against a fake Host and the real small parts (slot pool, gates, log,
ledger): what it writes to the ledger and when, what it decides after each kind of run end,
how it holds its slot -- in milliseconds.  The fleet around it: ``test_fleet_inproc.py``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.config import FleetConfig, TaskConfig
from supervisor.hosts.base import RunHandle, RunSpec
from supervisor.ledger import Ledger, ShiftRecord, TaskRecord
from supervisor.limits import LimitDetector, LimitPatterns, shared_detector
from supervisor.logwriter import LogMux
from supervisor.recovery import Adoption
from supervisor.scheduling import SlotPool, StartGate, StartsGate, StopControl
from supervisor.worker import Worker
from supervisor.workspace import Clone
from tests.fakehost import FakeHost, Script, fake_config, until

pytestmark = pytest.mark.anyio
SHIFT = "shift-1"


class Services:
    """What a worker needs of its fleet (``worker.FleetServices``), with real parts."""

    def __init__(self, tmp_path: Path, config: FleetConfig, host: FakeHost) -> None:
        self.config = config
        self.host = host
        self.hosts = {host.name: host}
        self.pool = SlotPool(config.concurrency, {host.name: config.concurrency})
        self.gate = StartGate(0)
        self.mux = LogMux(SHIFT, tmp_path / "fleet.jsonl", None)
        self.stop = StopControl()
        self.starts = StartsGate()
        config.state_path.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger.open(config.state_path)
        self.ledger.begin_shift(
            ShiftRecord(
                id=SHIFT,
                pid=1,
                pid_ticks=None,
                host="h",
                config="c",
                dir="d",
                name="n",
                concurrency=1,
                started_at=time.time(),
                ended_at=None,
                exit_code=None,
                exit_meaning=None,
                state="running",
                found_by=None,
            )
        )
        self.shift_id = SHIFT
        self.paused: list[tuple[str, float, str]] = []
        self._given_up = StopControl()
        self.adopted_ended: list[str] = []

    async def clone_on(self, machine: str) -> Clone:
        return Clone(self.host, "/clones/origin.git", "main")

    async def run_root(self, machine: str) -> str:
        return f"/runs/{SHIFT}"

    async def lease_path(self, machine: str) -> str:
        return f"/runs/{SHIFT}/lease"

    def limit_detector(self, machine: str) -> LimitDetector:
        return shared_detector(LimitPatterns())

    def pause_machine(self, machine: str, until: float, reason: str, line: str) -> None:
        self.paused.append((machine, until, reason))

    @property
    def given_up(self) -> StopControl:
        return self._given_up

    async def machine_up(self, machine: str) -> bool:
        await self.host.until_up()
        return True

    def machine_away(self, machine: str) -> str:
        return "" if self.host.reach.value == "up" else f"{machine} unreachable"

    def adopted_run_ended(self, machine: str, lease: str | None) -> None:
        self.adopted_ended.append(machine)

    def close_starts(self, reason: str) -> None:
        self.starts.close(reason)


def setup(tmp_path: Path, scripts: list[Script], **config: Any) -> tuple[Services, Worker]:
    host = FakeHost(scripts={7: scripts})
    services = Services(tmp_path, fake_config(tmp_path, [{"issue": 7}], **config), host)
    return services, Worker("w1", TaskConfig(issue=7, title="seven"), services)


async def life(worker: Worker) -> None:
    with anyio.fail_after(10):
        await worker.run()


async def test_the_intent_is_in_the_ledger_before_the_host_is_asked(tmp_path: Path) -> None:
    services, worker = setup(tmp_path, [Script()])
    seen: list[tuple[str, str]] = []
    start = services.host.start

    async def checking_start(spec: RunSpec) -> RunHandle:
        (run,) = services.ledger.open_runs()  # committed: another reader would see it
        seen.append((run.state, run.run_dir))
        assert (run.issue, run.number, run.workspace) == (7, 1, spec.cwd)
        return await start(spec)

    services.host.start = checking_start  # type: ignore[method-assign]
    await life(worker)
    assert seen == [("intent", "/runs/shift-1/w1/run-1")]
    (run,) = services.ledger.runs(issue=7)
    assert (run.state, run.exit_code, run.outcome) == ("ended", 0, "done")
    assert run.pid == 10001 and run.started_at is not None
    task = services.ledger.task(7)
    assert task is not None and (task.state, task.runs, task.last_exit) == ("done", 1, 0)
    assert [w.state for w in services.ledger.workers(SHIFT)] == ["done"]


async def slots_held_in(services: Services, worker: Worker, state: str) -> int:
    """Live the worker's life; return how many slots were held once it was in ``state``."""
    held: list[int] = []

    async def watch() -> None:
        await until(lambda: str(worker.status.state) == state)
        held.append(services.pool.total)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await life(worker)
    (count,) = held
    return count


async def test_a_crash_backs_off_in_its_slot_then_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The whole jitter range (rand 1.0: 0.3 s), so that the backoff lasts long enough to be
    # seen on a loaded machine (full jitter may otherwise make it a millisecond).
    monkeypatch.setattr("supervisor.workrun.random.random", lambda: 1.0)
    services, worker = setup(
        tmp_path, [Script(exit=2), Script()], restart={"backoff_base": 0.3, "backoff_max": 0.3}
    )
    assert await slots_held_in(services, worker, "backoff") == 1  # kept through the backoff
    assert (worker.status.state, worker.status.run, worker.status.crashes) == ("done", 2, 1)
    history = services.ledger.task(7).history  # type: ignore[union-attr]
    assert history["consecutive_crashes"] == 0 and len(history["crash_times"]) == 1
    assert [r.outcome for r in services.ledger.runs(issue=7)] == ["crashed", "done"]


async def test_a_usage_limit_gives_the_slot_back_and_holds_the_machine(tmp_path: Path) -> None:
    services, worker = setup(tmp_path, [Script(exit=1, limit_in=0.3), Script()])
    assert await slots_held_in(services, worker, "paused") == 0
    ((machine, until_at, reason),) = services.paused
    assert machine == "local" and reason == "usage limit" and until_at > time.time() - 5
    assert (worker.status.usage_pauses, worker.status.crashes) == (1, 0)
    assert services.host.runs_of(7)[1].argv[-1] == "Continue from the latest milestone"


async def test_a_machine_away_is_the_machines_trouble_never_a_crash(tmp_path: Path) -> None:
    """The machine goes away during run 1, which its watchdog stops meanwhile (its lease is
    not renewed): its end is read once the machine is back, and run 2 starts at once, the
    crash budget untouched."""
    services, worker = setup(
        tmp_path, [Script(duration=0.2, away=(0.05, 0.3), watchdog=True), Script()]
    )
    await life(worker)
    assert (worker.status.state, worker.status.crashes, worker.status.run) == ("done", 0, 2)
    first, second = services.ledger.runs(issue=7)
    assert (first.exit_code, first.outcome) == (143, "watchdog")
    assert second.outcome == "done" and second.intent_at >= services.host.runs_of(7)[0].at + 0.3


async def test_a_stop_stops_the_run_and_records_it(tmp_path: Path) -> None:
    services, worker = setup(tmp_path, [Script(hang=True)])

    async def stop() -> None:
        await until(lambda: services.host.alive)
        services.stop.request("test")

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop)
        await life(worker)
    assert (worker.status.state, worker.status.reason) == ("stopped", "test")
    (run,) = services.ledger.runs(issue=7)
    assert (run.exit_code, run.outcome) == (143, "stopped")
    assert services.pool.total == 0


async def test_an_adopted_run_is_followed_from_its_offsets(tmp_path: Path) -> None:
    services, worker = setup(tmp_path, [Script(stdout=["one", "two", "three"], duration=0.1)])
    record = TaskRecord(issue=7, state="running", machine="local", workspace="/ws")
    run = services.ledger.run_intent(
        record,
        shift="dead",
        worker="w9",
        machine="local",
        workspace="/ws",
        run_dir_of=lambda n: f"/runs/dead/w9/run-{n}",
        lease_path="/runs/dead/lease",
        prompt_kind="first",
        milestones_before=[],
    )
    handle = await services.host.start(
        RunSpec(
            argv=["a"],
            cwd="/ws",
            run_dir=run.run_dir,
            lease_path="",
            lease_timeout=0,
            env={"AGENTIZE_FLEET_ISSUE": "7", "AGENTIZE_FLEET_RUN": "1"},
        )
    )
    worker.adopt(Adoption(run, handle, {"stdout": len(b"one\n")}, live=True))
    assert services.pool.total == 1  # taken at once, before any wait
    await life(worker)
    services.mux.flush()
    lines = [
        line
        for line in (tmp_path / "fleet.jsonl").read_text().splitlines()
        if '"stream":"stdout"' in line
    ]
    assert ['"line":"two"' in lines[0], '"line":"three"' in lines[1]] == [True, True]
    assert len(lines) == 2 and worker.status.state == "done"
    assert services.adopted_ended == ["local"] and len(services.host.starts) == 1


async def test_a_bug_costs_the_task_and_a_failed_kill_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while a run is followed fails the task (the fleet goes on); stopping the run then
    fails too (its machine went away): logged, and the worker still ends normally."""
    services, worker = setup(tmp_path, [Script(duration=5)])

    async def broken(self: object, *args: object) -> None:
        services.host.go_away(float("inf"))
        raise RuntimeError("boom")

    monkeypatch.setattr("supervisor.workrun.RunDriver._follow_output", broken)
    await life(worker)
    assert str(worker.status.state) == "failed"
    assert "internal error: RuntimeError('boom')" in worker.status.reason
    services.mux.flush()
    text = (tmp_path / "fleet.jsonl").read_text()
    assert '"event":"kill-failed"' in text and "link lost (fake)" in text
