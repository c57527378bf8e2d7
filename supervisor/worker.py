"""One worker: a task bound to a machine and a worktree, driven through its runs.

The worker owns the I/O of a task's life -- the slot it runs in, the waits between its runs
(backoff, a usage hold, a machine lost) -- and asks the pure parts what to do:
:func:`supervisor.lifecycle.advance` for every state change and
:func:`supervisor.outcome.judge` (with :func:`supervisor.policy.decide` and the agent kind's
verdict) after every run.  One run's own steps (prepare, start or adopt, read, judge, record)
are :class:`supervisor.workrun.RunDriver`'s.

The life is a loop of *attempt* (prepare, one run) and *follow the decision* (one method per
decision: done, give up, resume, back off, pause, machine lost).  The run slot is held by a
:class:`Slot`: which decisions keep it is the policy's rule (:func:`supervisor.policy.keeps_slot`).
How the next run starts -- which agent session, which prompt -- is in the task's status
(``next_resume``, ``next_prompt``), decided with each run's end and kept in the ledger.
"""

from __future__ import annotations

import signal
import time
import traceback

import anyio

from supervisor import policy
from supervisor.agents import NextStep
from supervisor.config import TaskConfig
from supervisor.hosts.base import HostError, HostUnreachable, RunHandle
from supervisor.ledger import TaskRecord
from supervisor.lifecycle import WorkerState
from supervisor.outcome import FIRST, Decision, MachineLost, WorkerStatus, usage_wait_too_long
from supervisor.recovery import Adoption
from supervisor.scheduling import Slot
from supervisor.workrun import FleetServices, RunDriver

#: How long stopping a run after a bug may take (an SSH machine may not answer).
KILL_AFTER_BUG_TIMEOUT = 10.0

__all__ = ["FleetServices", "Worker"]


class Worker(RunDriver):
    """Drives one task from ``pending`` to a final state.

    ``record`` is the ledger's account of the task from earlier shifts; ``again`` starts it
    again even if it ended (failed, stopped and lost ones; an interrupted one -- stopped, lost
    -- goes on in its agent session), ``anew`` from scratch (``--rerun``, ``--fresh``).
    """

    def __init__(
        self,
        name: str,
        task: TaskConfig,
        fleet: FleetServices,
        *,
        record: TaskRecord | None = None,
        again: bool = False,
        anew: bool = False,
        origin: str = "config",
    ) -> None:
        super().__init__(name, task, fleet, origin)
        self.adoption: Adoption | None = None
        self.slot = Slot(fleet.pool, fleet.starts)
        self._wake = anyio.Event()
        self._active = False
        self._again = False
        if record is not None:
            usage = fleet.ledger.task_usage(task.issue)
            self.status.restore(record, usage, again=again, anew=anew)
            if self.status.next_prompt == "first":
                self._cost_from = record.runs

    # the worker's view ---------------------------------------------------------------------

    @property
    def wants_runs(self) -> bool:
        """Whether the task is to run in this shift (a done one is not, unless asked)."""
        return not self.status.state.final or self._again

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
        self._plan(FIRST)
        self._cost_from = self.status.run
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
        """Stop one run (``restart``, a stall): the same stop as the fleet's, on this run
        alone; a run whose machine cannot be reached now is left as it is."""
        try:
            await handle.stop(self.fleet.config.stop_timeout)
        except HostUnreachable as exc:
            self._restart_requested, self._stalled = False, ""
            self.log("stop-unreachable", f"✗ cannot stop run {self.status.run} now: {exc}")

    def stall(self, quiet: float) -> RunHandle | None:
        """The stall watchdog found the run silent for ``quiet`` seconds: mark it stalled and
        return it to be stopped (its session is then resumed like a crash's); None when there
        is no run, or it is being stopped already."""
        handle = self._current
        if handle is None or self._stalled or self.status.state is not WorkerState.RUNNING:
            return None
        self._stalled = f"stalled: no output for {quiet:.0f}s"
        self.log(
            "stalled",
            f"⌛ run {self.status.run} printed nothing for {quiet:.0f}s "
            "(stall_timeout): stopping it; its session is resumed",
            quiet=round(quiet, 1),
        )
        return handle

    def wake(self) -> None:
        """Cut a wait short (new runs were closed: a paused task stops waiting for its reset)."""
        self._wake.set()

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
                await self._kill_after_bug(handle)
        finally:
            self.slot.release()

    async def _kill_after_bug(self, handle: RunHandle) -> None:
        """Stop the run a bug left behind, bounded in time; a kill that fails is logged, not
        raised (the error being handled is the one the operator needs to see), and the run's
        lease, no longer renewed, has its watchdog stop it."""
        with anyio.move_on_after(KILL_AFTER_BUG_TIMEOUT, shield=True):
            try:
                await handle.signal(signal.SIGKILL)
            except (HostError, OSError) as exc:
                self.log(
                    "kill-failed",
                    f"✗ could not stop run {self.status.run}: {exc}; its "
                    "watchdog stops it once its lease is not renewed",
                    error=str(exc),
                )

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
        if adoption is not None:
            decision = await self._adopt(adoption)
        going_on = True
        while going_on:
            if decision is None:
                if self.slot.held and self.slot.machine in self.fleet.pool.closed:
                    # Its machine is held (a usage limit) or unreachable: a resume or restart
                    # in its slot waits for it like any new run.
                    self.slot.release()
                if not self.slot.held and not await self._get_slot():
                    self._not_started()
                    return
                decision = await self._attempt()
            going_on, decision = await self._follow(decision), None

    def _not_started(self) -> None:
        """No run could start: stopped (or new runs closed), or its machine given up."""
        if self.fleet.given_up.requested.is_set() and not self.fleet.stop.requested.is_set():
            self._set(WorkerState.LOST, self._stop_reason())
        else:
            self._set(WorkerState.STOPPED, self._stop_reason())

    def _pin(self) -> str | None:
        """Where the next run must go: its worktree's machine, or the task's own pin.  It
        starts over elsewhere, in a fresh worktree, when that machine cannot take runs in this
        shift -- or (``requeue_lost``, no pin) cannot be reached now: no run of the task lives
        there (this is asked between runs only)."""
        s = self.status
        if s.workspace is not None and s.machine is not None:
            pool = self.fleet.pool
            away = self.fleet.machine_away(s.machine)
            moves = bool(away) and self.fleet.config.requeue_lost and self.task.machine is None
            if moves and not any(cap for m, cap in pool.capacity.items() if m != s.machine):
                moves = False  # nowhere else to go: it waits
            if pool.capacity.get(s.machine) and not moves:
                return s.machine
            if moves:
                self.log(
                    "requeued",
                    f"↪ {away}: the task starts over on another machine",
                    machine=s.machine,
                )
            s.workspace = None
            self._prepared = False
            self._plan(FIRST)  # its agent session stays in that worktree
        return self.task.machine

    def _plan(self, step: NextStep) -> None:
        self.status.next_resume, self.status.next_prompt = step.session.resume, step.prompt

    async def _get_slot(self) -> bool:
        """A slot for the next run; False if none will come (stopped, soft deadline)."""
        pin = self._pin()
        pool = self.fleet.pool
        away = self.fleet.machine_away(pin) if pin else ""
        if away:
            self.log("waiting-machine", f"⋯ waiting for {pin} ({away})", machine=pin)
        elif self.status.run and pool.would_wait(pin) and not self.fleet.starts.paused:
            where = f" on {pin}" if pin else ""
            self.log(
                "waiting", f"⋯ waiting for a slot{where} ({pool.total} of {pool.total_cap} running)"
            )
        waiting = lambda: self.slot.acquire(pin)  # noqa: E731
        if not await self._unless_stopped(waiting, pin or "*") or not self.slot.held:
            return False
        self.status.machine = self.slot.machine
        return True

    async def _attempt(self) -> Decision:
        """Prepare the worktree if needed and make one run.  A machine that cannot be reached
        (or does not answer in time) before the run starts is the machine's trouble, not the
        task's: never a crash; the task waits for the machine or moves (``_elsewhere``)."""
        machine = self.slot.machine
        assert machine is not None
        self.status.machine = machine
        host = self.fleet.hosts[machine]
        try:
            if self.status.workspace is None or not self._prepared:
                await self._prepare(machine)  # once a shift: a worktree removed by hand returns
            return await self._one_run(host)
        except HostUnreachable as exc:
            self._agent = None
            return MachineLost(str(exc))

    async def _follow(self, decision: Decision) -> bool:
        """Do what the decision says until the next run may start (True), or the task has ended
        (False); how the next run starts is in ``status.next_resume``/``next_prompt``."""
        if isinstance(decision, MachineLost):
            return await self._elsewhere(decision)
        if self.fleet.stop.requested.is_set() or self.status.state.final:
            if not self.status.state.final:
                self._set(WorkerState.STOPPED, self._stop_reason())
            return False
        if isinstance(decision, policy.Resume):
            return await self._resume()
        if isinstance(decision, policy.Restart):
            return await self._backoff(decision)
        if isinstance(decision, policy.Pause):
            return await self._pause(decision.until)
        return False  # Finish and GiveUp: the state is final already

    async def _resume(self) -> bool:
        """A milestone hand-off keeps its slot; no new run starts while the fleet is paused,
        nor after the soft deadline."""
        if not await self._unless_stopped(self.fleet.starts.wait) or self.fleet.starts.closed:
            self._set(WorkerState.STOPPED, self._stop_reason())
            return False
        return True

    async def _backoff(self, decision: policy.Restart) -> bool:
        """Wait out a crash backoff, in the slot (short) or without it (long)."""
        if not policy.keeps_slot(decision):
            self.slot.release()
        if not await self._wait_until(time.time() + decision.delay, closable=True):
            self._set(WorkerState.STOPPED, self._stop_reason())
            return False
        # In its slot it may be stopped, or meet the soft deadline, before it starts again.
        return not self.slot.held or await self._resume()

    async def _pause(self, until: float) -> bool:
        """A usage-limit hold: the slot goes to others (its machine takes no new run anyway).

        A hold longer than ``max_usage_wait`` (a seven-day window, monthly credit) is not slept
        through: new runs are closed fleet-wide, the running ones end, and ``up`` exits 5 with
        this task paused -- its session and reset time in the ledger, so the next ``up`` after
        the reset goes on with it.  A task waiting for its reset when new runs are closed
        (another task's long hold, a cost limit) stays paused the same way."""
        self.slot.release()
        wait = until - time.time()
        limit = self.fleet.config.max_usage_wait
        if wait > limit:
            self.status.next_run_at = until
            self.persist()
            self.fleet.close_starts(usage_wait_too_long(self.status.machine or "?", until, limit))
            return False
        if not await self._wait_until(until, closable=True):
            if not self.fleet.stop.requested.is_set():
                self.status.next_run_at = until
                self.persist()
                return False  # new runs were closed meanwhile: it stays paused
            self._set(WorkerState.STOPPED, self._stop_reason())
            return False
        return True

    async def _elsewhere(self, lost: MachineLost) -> bool:
        """Its machine cannot be reached, and no run of the task lives there (none started,
        or the last one's end was read): not a crash.  The slot goes to others meanwhile; the
        task waits for the machine or moves (:meth:`_pin` says which).  A task whose run is out
        of reach is lost already."""
        if self.status.state.final or self.fleet.stop.requested.is_set():
            return False
        self.slot.release()
        return True

    async def _wait_until(self, at: float, *, closable: bool = False) -> bool:
        """Sleep until ``at`` (or a restart request); False if the fleet stops meanwhile, or
        (``closable``) new runs are closed for good meanwhile."""
        self.status.next_run_at = at
        starts = self.fleet.starts

        async def nap() -> None:
            while (left := at - time.time()) > 0 and not self._restart_requested:
                if closable and starts.closed:
                    return
                self._wake = anyio.Event()
                with anyio.move_on_after(left):
                    await self._wake.wait()

        ok = await self._unless_stopped(nap) and not (closable and starts.closed)
        self._restart_requested = False
        self.status.next_run_at = None
        return ok
