"""One worker: a task bound to a machine and a worktree, driven through its runs.

The worker owns the I/O of a task's life -- preparing the worktree, starting runs through its
:class:`~supervisor.hosts.base.Host`, pumping their output into the log, noticing milestones --
and asks the pure parts what to do: :func:`supervisor.lifecycle.advance` for every state
change and :func:`supervisor.policy.decide` after every run.

Every transition goes to the ledger as it happens: the intent of a run before the host is asked
to start it, its pid right after, its end together with the task's new state in one
transaction.  A supervisor killed at any instant leaves the next one a true account.

The life is a loop of *attempt* (prepare, one run) and *follow the decision* (one method per
decision: done, give up, resume, back off, pause, machine lost).  The run slot is held by a
:class:`Slot`: which decisions keep it is the policy's rule (:func:`supervisor.policy.keeps_slot`).
"""

from __future__ import annotations

import posixpath
import random
import signal
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import anyio
import structlog

from supervisor import policy
from supervisor.config import FleetConfig, TaskConfig
from supervisor.hosts.base import (
    STREAMS,
    ExitStatus,
    Host,
    HostError,
    HostUnreachable,
    RunHandle,
    RunIdentity,
    RunSpec,
    Stream,
)
from supervisor.ledger import Ledger, LedgerUnwritable, RunRecord, TaskRecord
from supervisor.lifecycle import WorkerState, advance
from supervisor.limits import LimitDetector, LimitHit, OutputTail
from supervisor.lines import pump_output
from supervisor.logs import LogMux, Tag
from supervisor.outcome import Decision, MachineLost, WorkerStatus, judge
from supervisor.recovery import Adoption, Seen, look_settled
from supervisor.runio import limit_in, render
from supervisor.scheduling import Slot, SlotPool, StartGate, StartsGate, StopControl
from supervisor.workspace import Clone, ensure_worktree, worktree_name

_T = TypeVar("_T")


class FleetServices(Protocol):
    """What a worker needs from its fleet (``fleet.Fleet`` provides it)."""

    config: FleetConfig
    pool: SlotPool
    gate: StartGate
    mux: LogMux
    stop: StopControl
    starts: StartsGate
    ledger: Ledger
    shift_id: str

    @property
    def hosts(self) -> Mapping[str, Host]: ...

    async def clone_on(self, machine: str) -> Clone: ...

    async def run_root(self, machine: str) -> str: ...

    async def lease_path(self, machine: str) -> str: ...

    def limit_detector(self, machine: str) -> LimitDetector: ...

    def pause_machine(self, machine: str, until: float, reason: str, line: str) -> None: ...

    #: Requested when the fleet stops waiting for the machines that cannot be reached.
    @property
    def given_up(self) -> StopControl: ...

    async def machine_up(self, machine: str) -> bool: ...

    def machine_away(self, machine: str) -> str: ...

    def adopted_run_ended(self, machine: str, lease: str | None) -> None: ...


class Worker:
    """Drives one task from ``pending`` to a final state.

    ``record`` is the ledger's account of the task from earlier shifts; ``again`` starts it
    anew even if it ended (``--rerun``, ``--fresh``, or failed, stopped and lost ones).
    """

    def __init__(
        self,
        name: str,
        task: TaskConfig,
        fleet: FleetServices,
        *,
        record: TaskRecord | None = None,
        again: bool = False,
        origin: str = "config",
    ) -> None:
        self.name = name
        self.task = task
        self.fleet = fleet
        self.origin = origin
        self.adoption: Adoption | None = None
        self.status = WorkerStatus(worker=name, task=task.issue, title=task.title)
        self.slot = Slot(fleet.pool, fleet.starts)
        self._policy = policy.RestartPolicy(**fleet.config.restart.model_dump())
        self._first_kind = "first"
        self._limit_hit: LimitHit | None = None
        self._logger: structlog.typing.FilteringBoundLogger | None = None
        self._logger_tag: Tag | None = None
        self._restart_requested = False
        self._wake = anyio.Event()
        self._current: RunHandle | None = None
        self._run: RunRecord | None = None
        self._active = False
        self._again = False
        self._prepared = False
        #: The machine this worker waits for (``*``: any), for the fleet to tell when nothing
        #: is left but waiting for machines that cannot be reached.
        self.waiting_for: str | None = None
        self._run_wait: anyio.CancelScope | None = None
        if record is not None:
            self._first_kind = self.status.restore(record, again)

    # helpers -----------------------------------------------------------------------------

    @property
    def current(self) -> RunHandle | None:
        """The run in progress, if any."""
        return self._current

    @property
    def wants_runs(self) -> bool:
        """Whether the task is to run in this shift (a done one is not, unless asked)."""
        return not self.status.state.final or self._again

    @property
    def tag(self) -> Tag:
        return Tag(self.name, self.task.issue, self.status.machine or "-", self.status.run)

    def log(self, event: str, message: str, **fields: Any) -> None:
        tag = self.tag
        if self._logger is None or self._logger_tag != tag:
            self._logger, self._logger_tag = self.fleet.mux.logger(tag), tag
        self._logger.info(event, msg=message, **fields)

    def record(self) -> TaskRecord:
        """The task as the ledger keeps it."""
        return self.status.to_record(self.task.prompt, self.task.machine, self.origin)

    def persist(self) -> None:
        self.fleet.ledger.save_task(
            self.record(), shift=self.fleet.shift_id, worker=self.name,
            adopted_from=self.status.adopted_from,
        )

    def _set(self, state: WorkerState, reason: str = "", *, save: bool = True) -> None:
        self.status.state = advance(self.status.state, state)
        self.status.reason = reason
        if state.final:
            self.status.ended_at = time.time()
        if save:
            self.persist()

    async def _unless_stopped(
        self, wait: Callable[[], Awaitable[object]], waiting_for: str | None = None
    ) -> bool:
        """Run ``wait``; return False (cancelling it) if the fleet is asked to stop first --
        or, when it waits for a machine (``waiting_for``), gives up on unreachable ones."""
        with anyio.CancelScope() as scope, self.fleet.stop.on_request(scope.cancel):
            if waiting_for is None:
                await wait()
                return True
            self.waiting_for = waiting_for
            try:
                with self.fleet.given_up.on_request(scope.cancel):
                    await wait()
                    return True
            finally:
                self.waiting_for = None
        return False

    def _stop_reason(self) -> str:
        if self.fleet.stop.requested.is_set():
            return self.fleet.stop.reason
        if self.fleet.given_up.requested.is_set():
            return f"gave up waiting: {self.fleet.given_up.reason}"
        return self.fleet.starts.closed_reason or "stopped"

    def _not_started(self) -> None:
        """No run could start: stopped (or the soft deadline), or its machine given up."""
        if self.fleet.given_up.requested.is_set() and not self.fleet.stop.requested.is_set():
            self._set(WorkerState.LOST, self._stop_reason())
        else:
            self._set(WorkerState.STOPPED, self._stop_reason())

    # steering from outside ----------------------------------------------------------------

    def adopt(self, adoption: Adoption) -> None:
        """Take over a run of an earlier shift (recovery); a live one holds its slot now."""
        self.adoption = adoption
        if adoption.live:
            self.slot.take(adoption.run.machine)

    def lost_unchecked(self, reason: str) -> None:
        """Its earlier run could not be checked: do not start it again in this shift."""
        self._set(WorkerState.LOST, reason)

    def requeue(self) -> bool:
        """Start an ended task again on this same worker (``add``): same worktree, never a
        second worker in it.  Returns True when its ``run`` must be started again."""
        self._set(WorkerState.PENDING, "requeued")
        self.status.ended_at = None
        self.status.history = policy.History()
        self._first_kind = "first"
        if self._active:
            self._again = True
            return False
        return True

    def request_restart(self) -> RunHandle | bool:
        """Mark the task for an immediate new run (``agentize-fleet restart``).

        Returns the run to stop (the caller stops it with :meth:`stop_run`; the next run then
        starts at once in the same slot), ``True`` when the task was waiting (backoff, pause)
        and will start as soon as it has a slot, ``False`` when there is nothing to restart.
        """
        if self._current is not None:
            self._restart_requested = True
            return self._current
        if self.status.state in (WorkerState.BACKOFF, WorkerState.PAUSED):
            self._restart_requested = True
            self._wake.set()
            return True
        return False

    async def stop_run(self, handle: RunHandle) -> None:
        """Stop one run (``restart``): the same stop as the fleet's, on this run alone."""
        try:
            await handle.stop(self.fleet.config.stop_timeout)
        except HostUnreachable as exc:
            self._restart_requested = False
            self.log("restart-unreachable", f"✗ cannot restart run {self.status.run} now: {exc}")

    # the life ----------------------------------------------------------------------------

    async def run(self) -> WorkerStatus:
        """Run the task to its end (again, if requeued meanwhile); never raises for the task's
        own failures."""
        while True:
            self._active = True
            try:
                await self._life()
            finally:
                self._active = False
            if not self._again:
                return self.status
            self._again = False

    async def _life(self) -> None:
        if self.status.state.final and self.adoption is None:
            return  # done earlier, or failed before it began (no usable machine)
        pinned = self.task.machine
        if pinned is not None and not self.fleet.pool.capacity.get(pinned):
            self._fail(f"machine {pinned} cannot run agents in this fleet")
            return
        self.status.started_at = self.status.started_at or time.time()
        self._prepared = False
        try:
            await self._live()
        except HostError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug must cost one task, never the fleet or its agents
            self._fail(f"internal error: {exc!r}", traceback.format_exc())
            handle = self._current
            if handle is not None:
                with anyio.CancelScope(shield=True):
                    await handle.signal(signal.SIGKILL)
        finally:
            self.slot.release()

    def _fail(self, reason: str, detail: str = "") -> None:
        stopping = self.fleet.stop.requested.is_set() and not detail
        self.log("failed", f"✗ {reason}", error=reason, traceback=detail or None)
        if not self.status.state.final:
            # A helper command cut short by the stop (Ctrl-C reaches git too) is a stop.
            self.status.state = WorkerState.STOPPED if stopping else WorkerState.FAILED
            self.status.reason = reason
            self.status.ended_at = time.time()
            self.persist()

    async def _live(self) -> None:
        adoption, self.adoption = self.adoption, None
        decision: Decision | None = None
        kind: str | None = self._first_kind
        if adoption is not None:
            decision = await self._adopt(adoption)
            kind = "auto"
        while kind is not None:
            if decision is None:
                if not self.slot.held and not await self._get_slot():
                    self._not_started()
                    return
                decision = await self._attempt(kind)
            kind, decision = await self._follow(decision), None

    def _pin(self) -> str | None:
        """Where the next run must go: its worktree's machine (while that machine can take
        runs; else it starts over elsewhere), or the task's own pin."""
        s = self.status
        if s.workspace is not None and s.machine is not None:
            if self.fleet.pool.capacity.get(s.machine):
                return s.machine
            s.workspace = None
        return self.task.machine

    async def _get_slot(self) -> bool:
        """A slot for the next run; False if none will come (stopped, soft deadline)."""
        pin = self._pin()
        pool = self.fleet.pool
        if self.status.run and pool.would_wait(pin) and not self.fleet.starts.paused:
            where = f" on {pin}" if pin else ""
            self.log("waiting", f"⋯ waiting for a slot{where} ({pool.total} of "
                     f"{pool.total_cap} running)")
        waiting = lambda: self.slot.acquire(pin)  # noqa: E731
        if not await self._unless_stopped(waiting, pin or "*") or not self.slot.held:
            return False
        self.status.machine = self.slot.machine
        return True

    async def _attempt(self, kind: str) -> Decision:
        """Prepare the worktree if needed and make one run.  A machine that cannot be reached
        (or does not answer in time) before the run starts, or after its end was read, is the
        machine's trouble, not the task's: never a crash; the task waits for the machine or
        moves (``_elsewhere``)."""
        machine = self.slot.machine
        assert machine is not None
        self.status.machine = machine
        host = self.fleet.hosts[machine]
        try:
            if self.status.workspace is None or not self._prepared:
                await self._prepare(machine)  # once a shift: a worktree removed by hand returns
            return await self._one_run(host, kind)
        except HostUnreachable as exc:
            self._limit_hit = None
            return MachineLost(str(exc))

    async def _follow(self, decision: Decision) -> str | None:
        """Do what the decision says until the next run may start; return its prompt kind, or
        None when the task has ended."""
        if isinstance(decision, MachineLost):
            return await self._elsewhere(decision)
        if self.fleet.stop.requested.is_set() or self.status.state.final:
            if not self.status.state.final:
                self._set(WorkerState.STOPPED, self._stop_reason())
            return None
        if isinstance(decision, policy.Resume):
            return await self._resume()
        if isinstance(decision, policy.Restart):
            return await self._backoff(decision)
        if isinstance(decision, policy.Pause):
            return await self._pause(decision.until)
        return None  # Finish and GiveUp: the state is final already

    async def _resume(self) -> str | None:
        """A milestone hand-off keeps its slot; no new run starts while the fleet is paused,
        nor after the soft deadline."""
        if not await self._unless_stopped(self.fleet.starts.wait) or self.fleet.starts.closed:
            self._set(WorkerState.STOPPED, self._stop_reason())
            return None
        return "resume"

    async def _backoff(self, decision: policy.Restart) -> str | None:
        """Wait out a crash backoff, in the slot (short) or without it (long)."""
        if not policy.keeps_slot(decision):
            self.slot.release()
        if not await self._wait_until(time.time() + decision.delay):
            self._set(WorkerState.STOPPED, self._stop_reason())
            return None
        if self.slot.held and await self._resume() is None:
            return None  # stopped, or the soft deadline, while it waited in its slot
        return "auto"

    async def _pause(self, until: float) -> str | None:
        """A usage-limit hold: the slot goes to others (its machine takes no new run anyway)."""
        self.slot.release()
        if not await self._wait_until(until):
            self._set(WorkerState.STOPPED, self._stop_reason())
            return None
        return "resume"

    async def _elsewhere(self, lost: MachineLost) -> str | None:
        """Its machine cannot be reached, and no run of the task lives there (none started,
        or the last one's end was read): the task waits for the machine (its slot goes to
        others meanwhile) or, with ``requeue_lost`` and no pin, starts over on another
        machine in a fresh worktree.  A task whose run is out of reach is lost already."""
        if self.status.state.final or self.fleet.stop.requested.is_set():
            return None
        away_on = self.slot.machine or self.status.machine or "?"
        self.slot.release()
        pool = self.fleet.pool
        elsewhere = [m for m, cap in pool.capacity.items() if cap and m != away_on]
        if self.fleet.config.requeue_lost and self.task.machine is None and elsewhere:
            self.status.workspace = None
            self._prepared = False
            self.log("requeued", f"↪ {away_on} cannot be reached ({lost.reason}): the task "
                     "starts over on another machine", machine=away_on)
            return "first"
        self.log("waiting-machine", f"⋯ {away_on} cannot be reached ({lost.reason}): waiting "
                 "for it", machine=away_on)
        return "auto"

    async def _committed(self, write: Callable[[], _T]) -> _T | None:
        """``write`` a transition that an act waits for (the act happens only once it is
        committed): while the ledger cannot be written, wait and try again.  None if the fleet
        stops first."""
        while True:
            try:
                return write()
            except LedgerUnwritable:
                if not await self._unless_stopped(self.fleet.ledger.writable):
                    return None

    async def _wait_until(self, at: float) -> bool:
        """Sleep until ``at`` (or a restart request); False if the fleet stops meanwhile."""
        self.status.next_run_at = at

        async def nap() -> None:
            while (left := at - time.time()) > 0 and not self._restart_requested:
                self._wake = anyio.Event()
                with anyio.move_on_after(left):
                    await self._wake.wait()

        ok = await self._unless_stopped(nap)
        self._restart_requested = False
        self.status.next_run_at = None
        return ok

    # one run -------------------------------------------------------------------------------

    async def _prepare(self, machine: str) -> None:
        """The worker clone (once per machine) and this task's worktree (re-used if there)."""
        if self.status.state is not WorkerState.PREPARING:
            self._set(WorkerState.PREPARING)
        clone = await self.fleet.clone_on(machine)
        tree = worktree_name(self.fleet.config.worktree_name, self.task.issue, self.task.title)
        self.status.workspace = await ensure_worktree(clone, tree)
        self._prepared = True
        self.persist()
        self.log("prepared", f"worktree {self.status.workspace}",
                 workspace=self.status.workspace)

    async def _prompt(self, host: Host, kind: str) -> tuple[str, str]:
        config = self.fleet.config
        if kind == "auto":  # after a crash: resume if any milestone exists in the worktree
            assert self.status.workspace is not None
            existing = await host.glob(self.status.workspace, self._globs())
            kind = "resume" if existing else "first"
        template = (
            config.agent.resume_prompt
            if kind == "resume"
            else (self.task.prompt or config.agent.first_prompt)
        )
        return kind, render(template, self._values(""))

    def _values(self, prompt: str) -> dict[str, str]:
        return {
            "issue": str(self.task.issue),
            "title": self.task.title,
            "prompt": prompt,
            "workspace": self.status.workspace or "",
        }

    def _globs(self) -> list[str]:
        issue = str(self.task.issue)
        return [g.replace("{issue}", issue) for g in self.fleet.config.milestone_globs]

    async def _one_run(self, host: Host, prompt_kind: str) -> Decision:
        fleet = self.fleet
        config = fleet.config
        machine, workspace = self.status.machine, self.status.workspace
        assert workspace is not None and machine is not None
        kind, prompt = await self._prompt(host, prompt_kind)
        before = await host.glob(workspace, self._globs())
        staggered = fleet.gate.interval > 0  # else no wait, and no watcher task for it
        if staggered and not await self._unless_stopped(fleet.gate.wait_turn):
            return policy.Finish()  # stopped before it started: `_follow` sees the stop
        # New runs may be held (``pause``; the log or the ledger cannot be written).
        if not await self._unless_stopped(fleet.starts.wait) or fleet.stop.requested.is_set():
            return policy.Finish()  # stopped before it started: `_follow` sees the stop
        if fleet.starts.closed:
            self._set(WorkerState.STOPPED, self._stop_reason())
            return policy.Finish()
        root = await fleet.run_root(machine)
        lease = await fleet.lease_path(machine)
        # Written before the host is asked: a supervisor killed during the start leaves the
        # next one an intent to look for, never a run nobody knows of.  No intent, no start.
        run = await self._committed(lambda: fleet.ledger.run_intent(
            self.record(), shift=fleet.shift_id, worker=self.name, machine=machine,
            workspace=workspace, run_dir_of=lambda n: posixpath.join(root, self.name, f"run-{n}"),
            lease_path=lease, prompt_kind=kind, milestones_before=sorted(before),
        ))
        if run is None:
            return policy.Finish()  # stopped while the ledger could not be written
        self._run = run
        self.status.run = run.number
        argv = [render(part, self._values(prompt)) for part in config.agent_command]
        env = {
            **config.agent.env,
            **self.task.env,
            "AGENTIZE_FLEET_ISSUE": str(self.task.issue),
            "AGENTIZE_FLEET_RUN": str(run.number),
            "AGENTIZE_FLEET_WORKSPACE": workspace,
            "AGENTIZE_FLEET_TITLE": self.task.title,
        }
        # The run directory says whose run it is, for whoever finds it without the ledger.
        meta = {"task": str(self.task.issue), "run": str(run.number), "shift": fleet.shift_id,
                "worker": self.name, "machine": machine}
        spec = RunSpec(argv=argv, cwd=workspace, run_dir=run.run_dir, lease_path=lease,
                       lease_timeout=config.lease_timeout, env=env, meta=meta)
        self._limit_hit = None
        try:
            handle = await host.start(spec)
        except HostUnreachable as exc:
            # Its answer was lost with the machine: the run may live there.  It stays this
            # worker's (its slot counts) until its run directory says whether it started.
            found = await self._unconfirmed(host, run, exc)
            if not isinstance(found, RunHandle):
                return found
            handle = found
        except HostError as exc:
            fleet.ledger.run_ended(run.id, state="abandoned",
                                   reason=f"start failed: {exc.message}")
            self._run = None
            raise
        fleet.ledger.run_started(run.id, handle.identity.pid, handle.identity.start_ticks)
        self.status.milestones_before = sorted(before)
        self.status.lease_path = lease
        self._running(handle)
        self.log(
            "run-started",
            f"▶ run {run.number} started (pid {handle.identity.pid}, {kind} prompt: {prompt})",
            pid=handle.identity.pid, prompt=prompt, prompt_kind=kind, run_dir=run.run_dir,
        )
        return await self._finish_run(host, handle, before, {})

    async def _unconfirmed(
        self, host: Host, run: RunRecord, error: HostUnreachable
    ) -> RunHandle | Decision:
        """A start whose answer was lost with its machine: once the machine answers again,
        its run directory says whether the run started (its handle, to follow as if the start
        had answered) or not (abandoned: a new run starts, no crash).  While the machine is
        away the run may live: nothing else starts in its slot, and if the fleet gives up on
        the machine the intent stays open for the next ``up`` to look at."""
        machine = run.machine
        self.log("start-unconfirmed", f"⋯ run {run.number}: its start could not be confirmed "
                 f"({error.message}); looking at its run directory once {machine} answers")
        while await self._unless_stopped(lambda: self.fleet.machine_up(machine), machine):
            try:
                look = (await look_settled(host, [run], local=False))[run.id]
                if look.seen is Seen.STARTED:
                    assert look.pid is not None and look.ticks is not None
                    handle = await host.attach(RunIdentity(machine, run.run_dir, look.pid,
                                                           look.ticks))
                    if handle is not None:
                        return handle
            except HostUnreachable:
                continue  # away again: wait for it again
            if look.seen is Seen.NO_AGENT:
                return self._ended(ExitStatus(look.code, reason="the run did not start"), [])
            self.fleet.ledger.run_ended(run.id, state="abandoned",
                                        reason="never started (its start was not confirmed)")
            self._run = None
            return policy.Restart(0.0)
        away = self.fleet.machine_away(machine) or machine
        return self._out_of_reach(f"{away}: run {run.number} may have started there")

    def _out_of_reach(self, why: str) -> Decision:
        """The run cannot be followed in this shift: it stays open in the ledger for the next
        ``up`` to find by its run directory; the task is lost (stopped, if the fleet stops)."""
        self._run = None
        stopping = self.fleet.stop.requested.is_set()
        return self._ended(ExitStatus(None, lost=True, reason=why), [],
                           lost="" if stopping else why)

    def _running(self, handle: RunHandle) -> None:
        self._current = handle
        self.status.pid = handle.identity.pid
        self.status.start_ticks = handle.identity.start_ticks
        self.status.run_dir = handle.identity.run_dir
        self.status.run_started_at = time.time()
        self._set(WorkerState.RUNNING)

    async def _adopt(self, adoption: Adoption) -> Decision:
        """Take over a run of an earlier shift: read its output on from where the logs stopped
        (to its end, if it ended while no supervisor watched), then decide as if watched."""
        run, handle = adoption.run, adoption.handle
        s = self.status
        s.run, s.workspace, s.machine = run.number, run.workspace, run.machine
        s.milestones_before = list(run.milestones_before)
        s.lease_path = run.lease_path
        s.adopted_from = run.supervised_by or run.shift
        self._run = run
        self._prepared = run.workspace is not None  # its agent works in it
        self._set(WorkerState.PREPARING)
        # Its output is logged here only once the ledger names this shift among the run's
        # supervisors: a later adopter resumes from the logs of the shifts named there.
        await self._committed(lambda: self.fleet.ledger.run_supervised(run.id, self.fleet.shift_id))
        self._running(handle)
        where = ", ".join(f"{k} @{v}" for k, v in adoption.offsets.items()) or "the start"
        what = "adopted" if adoption.live else "took over the end of"
        self.log(
            "adopted",
            f"⇄ {what} run {run.number} (pid {handle.identity.pid}) of dead fleet "
            f"{s.adopted_from}, reading its output from {where}",
            pid=handle.identity.pid, from_fleet=s.adopted_from, offsets=dict(adoption.offsets),
            live=adoption.live,
        )
        host = self.fleet.hosts[run.machine]
        try:
            return await self._finish_run(
                host, handle, set(run.milestones_before), adoption.offsets
            )
        finally:
            self.fleet.adopted_run_ended(run.machine, run.lease_path)

    async def _finish_run(
        self, host: Host, handle: RunHandle, before: set[str], offsets: Mapping[Stream, int]
    ) -> Decision:
        workspace = self.status.workspace
        assert workspace is not None
        status = await self._follow_output(handle, offsets)
        self._current = None
        self.status.pid = None
        if status is None:  # its machine is away and the fleet stopped waiting for it
            away = self.fleet.machine_away(host.name) or host.name
            return self._out_of_reach(f"{away}: run {self.status.run} is out of reach")
        self.status.last_exit = status.code
        after = set(before)  # its milestones, once the machine answers (if it goes away now)
        while True:
            try:
                after = await host.glob(workspace, self._globs())
                break
            except HostUnreachable:
                if not await self._unless_stopped(lambda: self.fleet.machine_up(host.name),
                                                  host.name):
                    break
                await anyio.sleep(1.0)  # (a host that does not say it is away: not too often)
        return self._ended(status, sorted(after - before))

    async def _follow_output(
        self, handle: RunHandle, offsets: Mapping[Stream, int]
    ) -> ExitStatus | None:
        """Pump the run's output into the log until it ends; stop it if the fleet stops."""

        async def pump() -> None:
            tails = {s: OutputTail() for s in STREAMS}
            mux = self.fleet.mux
            await pump_output(
                mux, self.tag, handle.output(offsets), offsets, self.fleet.config.max_line_bytes,
                on_block=lambda stream, block: tails[stream].add(block),
                # While the log cannot be written, the output waits in the run's own files.
                pause=lambda: self._unless_stopped(mux.writable),
            )
            self._limit_hit = limit_in(
                tails.values(), self.fleet.limit_detector(self.status.machine or "local")
            )

        status: ExitStatus | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            with self.fleet.stop.on_request(lambda: tg.start_soon(self._stop_run, handle)):
                status = await self._run_end(handle)
                if status is None:
                    tg.cancel_scope.cancel()  # its output waits in its files, for the next up
        return status

    async def _run_end(self, handle: RunHandle) -> ExitStatus | None:
        """The run's end, however long its machine is away (its host finds the run again by
        its run directory once the machine is back); None when the fleet gives up on the
        machine, or stops while the run cannot be reached."""
        with (
            anyio.CancelScope() as self._run_wait,
            self.fleet.given_up.on_request(self._run_wait.cancel),
        ):
            self.waiting_for = handle.identity.host
            try:
                return await handle.wait()
            finally:
                self.waiting_for = None
        return None

    def _give_up_run(self) -> None:
        if self._run_wait is not None:
            self._run_wait.cancel()

    async def _stop_run(self, handle: RunHandle) -> None:
        """The fleet stops: this run too, SIGTERM first (its task starts on the request).  A
        run whose machine cannot be reached is left to its watchdog (its lease is not renewed
        any more) and to the next ``up``."""
        stop = self.fleet.stop
        self._set(WorkerState.STOPPING)
        timeout = self.fleet.config.stop_timeout
        self.log("stopping", f"■ stopping: SIGTERM to the run's process group ({timeout:g}s)")
        try:
            await handle.stop(
                timeout,
                sooner=stop.forced,
                before_kill=lambda: self.log(
                    "killing", "■ SIGKILL to what is left of the run's process tree"
                ),
            )
        except HostUnreachable as exc:
            self.log("stop-unreachable", f"■ cannot stop run {self.status.run} now ({exc}): "
                     "its watchdog stops it once its lease runs out")
            self._give_up_run()

    # the end of a run ---------------------------------------------------------------------

    def _ended(self, status: ExitStatus, new_milestones: list[str], *, lost: str = "") -> Decision:
        """Decide what follows a run (:func:`supervisor.outcome.judge`), and record its end
        with the task's new state in one transaction (a crash leaves both or neither)."""
        s = self.status
        hit = self._limit_hit
        stop = self.fleet.stop
        verdict = judge(
            s, self._policy, status, new_milestones, hit, lost=lost,
            stopping=stop.reason if stop.requested.is_set() else None,
            restart_requested=self._restart_requested, now=time.time(), rand=random.random(),
        )
        self._restart_requested = False
        if verdict.state is WorkerState.STOPPED and s.state is not WorkerState.STOPPING:
            s.state = advance(s.state, WorkerState.STOPPING)  # it ended as the stop came
        s.state = advance(s.state, verdict.state)
        s.reason = verdict.reason
        if verdict.state.final:
            s.ended_at = time.time()
        if self._run is not None:
            self.fleet.ledger.run_ended(
                self._run.id, exit_code=status.code, lost=status.lost, outcome=verdict.outcome,
                reason=status.reason, task=self.record(), shift=self.fleet.shift_id,
                worker=self.name,
            )
            self._run = None
        else:
            self.persist()
        for event, message, fields in verdict.lines:
            self.log(event, message, **fields)
        if isinstance(verdict.decision, policy.Pause) and hit is not None:
            assert s.machine is not None
            self.fleet.pause_machine(s.machine, verdict.decision.until, "usage limit", hit.line)
        return verdict.decision
