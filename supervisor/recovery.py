"""Recovery at start-up: every run an earlier shift left behind is dealt with before any new one.

A supervisor may die at any instant; its runs do not die with it (the wrapper runs them in a
session of their own) and the ledger says what it was doing.  Before any worker of the new
shift may ask for a slot, every run the ledger has in ``intent`` or ``running`` -- whichever
shift made it, however many shifts died since -- plus every run directory a scan of the
machines finds unfinished (the safety net behind the ledger: a power cut may lose its last
transactions) is looked at, and:

* a run that **lives** is adopted: its slot is taken in the pool at once (so the cap holds at
  every instant, adoptions included), its worker reads its output on from the last offset the
  logs of the shifts that watched it recorded, and its dead shift's lease is renewed for as long
  as it is watched;
* or **stopped**: ``on_orphans = "stop"``, a task the config no longer lists, a second live run
  of one task, a run the ledger does not know;
* a run that **ended while no supervisor watched** goes to its worker as well, which reads the
  rest of its output and its exit status and lets the task's policy decide what follows, as if
  it had been watched;
* an intent whose run **never started** (no wrapper in its run directory a few seconds on)
  becomes ``abandoned``; its task starts a new run.

Then the lease watchdogs of the dead shifts are dismissed where no run of theirs is left (each
checks that itself), rather than lingering until their next look.
"""

from __future__ import annotations

import enum
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio
import structlog

from supervisor.config import FleetConfig
from supervisor.hosts.base import (
    STREAMS,
    Host,
    HostError,
    HostUnreachable,
    RunHandle,
    RunIdentity,
    Stream,
)
from supervisor.hosts.runfiles import UNSTARTED_AFTER, RunState, RunStatus
from supervisor.ledger import Ledger, RunRecord
from supervisor.logwriter import repair_dead_log
from supervisor.machines import Machines
from supervisor.records import LOG_NAME, last_offsets, log_files

#: A wrapper that runs but has not written the agent's pid yet gets this long to do so.
PID_WAIT = 10.0
PROBE_CONCURRENCY = 16


class Seen(enum.Enum):
    """How far a run got, from its run directory."""

    GONE = "gone"  # no run directory
    UNSTARTED = "unstarted"  # a directory, no wrapper yet
    STARTING = "starting"  # a wrapper, no pid and no exit yet
    NO_AGENT = "no-agent"  # an exit but no pid: the wrapper could not start the agent
    STARTED = "started"  # a pid: alive or not, its handle tells


@dataclass(frozen=True)
class Look:
    seen: Seen
    age: float = 0.0
    pid: int | None = None
    ticks: int | None = None
    code: int | None = None


@dataclass(frozen=True)
class Adoption:
    """A run of an earlier shift that a worker takes over instead of starting one."""

    run: RunRecord
    handle: RunHandle
    offsets: Mapping[Stream, int]
    #: Still running (its slot is taken); otherwise it ended while no supervisor watched.
    live: bool


class Adopter(Protocol):
    """What recovery needs of a worker."""

    def adopt(self, adoption: Adoption) -> None: ...

    def lost_unchecked(self, reason: str) -> None: ...

    @property
    def wants_runs(self) -> bool: ...


class RecoveringFleet(Protocol):
    """What recovery needs of the fleet."""

    config: FleetConfig
    ledger: Ledger
    shift_id: str
    machines: Machines
    log: structlog.typing.FilteringBoundLogger

    def adopter_for(self, issue: int) -> Adopter | None: ...


@dataclass
class Recovery:
    """What recovery did: (shift, line) per run, for the dead shifts' summaries."""

    notes: list[tuple[str, str]]
    #: machine -> leases of dead shifts seen: their watchdogs are dismissed at the shift's end.
    leases: dict[str, set[str]]


async def recover(fleet: RecoveringFleet, died: Sequence[str]) -> Recovery:
    """Deal with every run earlier shifts left behind (see the module docstring)."""
    ledger = fleet.ledger
    for shift in died:
        # Before any offset is read from it: a batch cut by the crash is not logged twice.
        repair_dead_log(fleet.config.state_path / "runs" / shift / LOG_NAME)
    runs = ledger.open_runs()
    # The watchdogs to dismiss once recovery is done (each stays while a run it guards is
    # left): those of the shifts that died, and those whose runs such a shift watched (an
    # adopter killed before it could dismiss them), besides those of every open run.
    leases: dict[str, set[str]] = defaultdict(set)
    for run in [r for shift in died for r in ledger.runs(shift=shift)] + runs:
        if run.lease_path:
            leases[run.machine].add(run.lease_path)
    notes: list[tuple[str, str]] = []
    by_machine: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        by_machine[run.machine].append(run)
    looks: dict[int, Look] = {}
    unreachable: dict[int, str] = {}

    async def look_on(machine: str, group: list[RunRecord]) -> None:
        host = fleet.machines.host_for(machine)
        if host is None:
            for run in group:
                fleet.log.warning(
                    "orphan-unknown-machine",
                    msg=f"run {run.number} of #{run.issue} ({run.run_dir}) is on machine "
                    f"{machine}, which is no longer configured: left alone",
                    task=run.issue,
                )
            return
        view = fleet.machines.get(machine)
        try:
            looks.update(await look_settled(host, group, view is not None and view.local))
        except HostError as exc:
            for run in group:
                unreachable[run.id] = f"machine {machine} could not be checked: {exc.message}"

    async with anyio.create_task_group() as tg:
        for machine, group in by_machine.items():
            tg.start_soon(look_on, machine, group)

    # The newest live run of a task is the one adopted; older ones are stopped.
    adopted: set[int] = set()
    for run in sorted(runs, key=lambda r: -r.id):
        if run.id in unreachable:
            _unchecked(fleet, run, unreachable[run.id], notes)
            continue
        look = looks.get(run.id)
        if look is None:
            continue
        note = await _settle(fleet, run, look, adopted)
        if note:
            notes.append((run.supervised_by or run.shift, note))
    await _stray_runs(fleet)
    for machine, paths in leases.items():
        view = fleet.machines.get(machine)
        if view is not None:
            await fleet.machines.dismiss_watchdogs(view, sorted(paths))
    return Recovery(notes, dict(leases))


async def look_settled(host: Host, runs: list[RunRecord], local: bool) -> dict[int, Look]:
    """The runs' looks, once those still starting have had the time to get on.  ``local``:
    the supervisor made their run directories itself, just before it started the wrapper, so
    a run without one never started; elsewhere a start command may still be on its way."""
    deadline = time.monotonic() + PID_WAIT
    looks: dict[int, Look] = {}
    pending = list(runs)
    while pending:
        found = await look(host, [r.run_dir for r in pending])
        waiting = []
        for run in pending:
            seen = found.get(run.run_dir, Look(Seen.GONE))
            if _may_still_start(run, seen, local) and time.monotonic() < deadline:
                waiting.append(run)
            else:
                looks[run.id] = seen
        pending = waiting
        if pending:
            await anyio.sleep(0.2)
    return looks


def _may_still_start(run: RunRecord, seen: Look, local: bool) -> bool:
    if run.state != "intent":
        return False
    if seen.seen is Seen.STARTING:
        return True
    if seen.seen is Seen.UNSTARTED:
        return seen.age < UNSTARTED_AFTER
    if seen.seen is Seen.GONE:
        return not local and time.time() - run.intent_at < UNSTARTED_AFTER
    return False


async def look(host: Host, run_dirs: Sequence[str]) -> dict[str, Look]:
    """How far each run got, from the files of its run directory (one look per machine)."""
    if not run_dirs:
        return {}
    return {d: _look_of(status) for d, status in (await host.probe(list(run_dirs))).items()}


def _look_of(status: RunStatus) -> Look:
    """What recovery makes of a run directory's status (``Host.probe``, ``hosts/runfiles``)."""
    if status.state is RunState.GONE:
        return Look(Seen.GONE)
    if status.state is RunState.UNSTARTED:  # the host has applied the age rule already
        return Look(Seen.UNSTARTED, UNSTARTED_AFTER)
    if status.pid is not None and status.start_ticks is not None:
        return Look(Seen.STARTED, UNSTARTED_AFTER, status.pid, status.start_ticks, status.code)
    if status.state is RunState.RUNNING:  # a start in flight: its pid comes in a moment
        return Look(Seen.STARTING)
    if status.state is RunState.EXITED:  # the wrapper recorded why the agent did not start
        return Look(Seen.NO_AGENT, UNSTARTED_AFTER, code=status.code)
    return Look(Seen.UNSTARTED, UNSTARTED_AFTER)  # the wrapper went before starting the agent


async def _settle(fleet: RecoveringFleet, run: RunRecord, look: Look, adopted: set[int]) -> str:
    """Adopt, stop, record or abandon one run; return a line saying which (or "")."""
    ledger = fleet.ledger
    label = f"#{run.issue} run {run.number} of shift {run.shift}"
    if look.seen is not Seen.STARTED:
        if look.seen is Seen.NO_AGENT:
            ledger.run_ended(
                run.id, exit_code=look.code, outcome="not-started", reason="the run did not start"
            )
            return f"recorded {label}: it did not start (exit {look.code})"
        ledger.run_ended(run.id, state="abandoned", reason="never started: its supervisor died")
        fleet.log.info(
            "run-abandoned",
            msg=f"∅ {label} never started: abandoned",
            task=run.issue,
            run=run.number,
        )
        return f"abandoned {label}"
    assert look.pid is not None and look.ticks is not None
    host = fleet.machines.host_for(run.machine)
    assert host is not None
    if run.state == "intent" or run.pid != look.pid:
        ledger.run_started(run.id, look.pid, look.ticks)
    handle = await host.attach(RunIdentity(run.machine, run.run_dir, look.pid, look.ticks))
    if handle is None:
        ledger.run_ended(run.id, lost=True, outcome="lost", reason="run directory gone")
        return f"lost {label}: its run directory is gone"
    live = await handle.alive()
    adopter = fleet.adopter_for(run.issue)
    why_stop = ""
    if adopter is None or not adopter.wants_runs:
        why_stop = "its task is no longer in the config"
    elif fleet.config.on_orphans == "stop":
        why_stop = 'on_orphans = "stop"'
    elif run.issue in adopted:
        why_stop = "a newer run of its task is adopted"
    if why_stop:
        return await _stop(fleet, run, handle, live, why_stop, label)
    assert adopter is not None
    adopted.add(run.issue)  # the adopter records that this shift supervises it
    if live:
        fleet.machines.adopt_lease(run.machine, run.lease_path, run.run_dir)
    offsets = offsets_of(fleet.config.state_path, run, ledger.worker_names(run.issue))
    adopter.adopt(Adoption(run, handle, offsets, live))
    return f"{'adopted' if live else 'took over the end of'} {label}"


async def _stop(
    fleet: RecoveringFleet, run: RunRecord, handle: RunHandle, live: bool, why: str, label: str
) -> str:
    """Stop a run that is not to be adopted (or record how it ended) and record its end."""
    if live:
        await handle.stop(fleet.config.stop_timeout)
        fleet.log.info(
            "orphan-stopped",
            msg=f"■ stopped orphan {label} (pid {run.pid or '?'}): {why}",
            task=run.issue,
            pid=handle.identity.pid,
            from_fleet=run.shift,
        )
    status = await handle.wait()
    fleet.ledger.run_ended(
        run.id,
        exit_code=status.code,
        lost=status.lost,
        outcome="stopped" if live else "ended-unwatched",
        reason=why,
    )
    task = fleet.ledger.task(run.issue)
    if live and task is not None and fleet.adopter_for(run.issue) is None:
        task.state, task.reason = "stopped", f"its run {run.number} was stopped: {why}"
        fleet.ledger.save_task(task, shift=fleet.shift_id, worker="-")
    return f"{'stopped' if live else 'recorded the end of'} {label}: {why}"


def _unchecked(
    fleet: RecoveringFleet, run: RunRecord, reason: str, notes: list[tuple[str, str]]
) -> None:
    """A run on a machine that cannot be reached: its task is not started again in this shift
    (the run may live on there); the next ``up`` looks again."""
    adopter = fleet.adopter_for(run.issue)
    if adopter is not None:
        adopter.lost_unchecked(f"its run {run.number} could not be checked: {reason}")
    fleet.log.warning(
        "orphan-unchecked",
        msg=f"✗ #{run.issue} run {run.number}: {reason}; the task waits for the next `up`",
        task=run.issue,
    )
    notes.append(
        (run.supervised_by or run.shift, f"could not check #{run.issue} run {run.number}: {reason}")
    )


async def _stray_runs(fleet: RecoveringFleet) -> None:
    """The safety net: run directories without an ``exit`` file that the ledger does not hold
    open (a power cut lost the transactions, or a start whose answer was lost).  Any of them
    still alive is stopped: nobody can say whose it is and it may share a worktree.  Only runs
    of this state directory's own shifts, on machines this shift holds: a workdir may have
    served other fleets, whose runs are theirs to mind."""
    ledger = fleet.ledger
    ours = {s.id for s in ledger.shifts()}
    for view in list(fleet.machines):
        if not view.local and view.claimed is None:
            continue
        try:
            base, unfinished = await _unfinished_runs(fleet, view.name)
        except HostError:
            continue
        for run_dir in unfinished:
            if run_dir[len(base) + 1 :].split("/", 1)[0] not in ours:
                continue
            known = ledger.run_by_dir(run_dir)
            if known is not None and known.state in ("intent", "running"):
                continue
            try:
                seen = (await look(view.host, [run_dir])).get(run_dir)
                if seen is None or seen.pid is None or seen.ticks is None:
                    continue
                handle = await view.host.attach(
                    RunIdentity(view.name, run_dir, seen.pid, seen.ticks)
                )
                if handle is None or not await handle.alive():
                    continue
                await handle.stop(fleet.config.stop_timeout)
            except (HostError, HostUnreachable):
                continue
            fleet.log.warning(
                "stray-stopped",
                msg=f"■ stopped a run the ledger does not hold open: {run_dir} on {view.name}",
                machine=view.name,
            )


async def _unfinished_runs(fleet: RecoveringFleet, machine: str) -> tuple[str, list[str]]:
    """Where every shift keeps its run directories on ``machine``, and those of them without an
    ``exit`` file."""
    view = fleet.machines[machine]
    if view.local:
        base = str(fleet.config.state_path / "runs")
    else:
        base = f"{await view.host.resolve_path(view.workdir)}/.agentize-fleet/runs"
    return base, sorted(await view.host.scan(base))


def offsets_of(state_path: Path, run: RunRecord, workers: Mapping[str, str]) -> dict[Stream, int]:
    """Where the logs of the shifts that watched ``run`` stopped reading its output: the
    greatest offset per stream their logs hold (:func:`supervisor.records.last_offsets`).
    ``workers`` names the task's worker in each shift (an adopter may have called it
    otherwise than the shift that started the run).  Output is logged in whole batches, each
    ending with its ``off``: resuming from there repeats and loses nothing."""
    offsets: dict[Stream, int] = {}
    for shift in run.supervisors or (run.shift,):
        found = last_offsets(
            log_files(state_path / "runs" / shift), workers.get(shift, run.worker), run.number
        )
        for stream in STREAMS:
            if stream in found:
                offsets[stream] = max(offsets.get(stream, 0), found[stream])
    return offsets
