"""One worker: a task bound to a machine and a worktree, driven through its runs.

The worker owns the I/O of a task's life -- preparing the worktree, starting runs through its
:class:`~supervisor.hosts.base.Host`, pumping their output into the log, noticing milestones --
and asks the pure parts what to do: :func:`supervisor.lifecycle.advance` for every state
change and :func:`supervisor.policy.decide` after every run.
"""

from __future__ import annotations

import contextlib
import posixpath
import random
import re
import signal
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    RunSpec,
    Stream,
)
from supervisor.lifecycle import WorkerState, advance
from supervisor.limits import (
    LimitHit,
    LimitPatterns,
    OutputTail,
    shared_detector,
)
from supervisor.lines import pump_output
from supervisor.logs import LogMux, Tag
from supervisor.scheduling import SlotPool, StartGate, StartsGate
from supervisor.workspace import Clone, ensure_worktree, worktree_name

_PLACEHOLDER = re.compile(r"\{(issue|title|prompt|workspace)\}")


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{issue}``-style placeholders once; values are never re-scanned or shell-parsed."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


class StopControl:
    """The fleet's stop request: graceful first, forced on a second request."""

    def __init__(self) -> None:
        self.requested = anyio.Event()
        self.forced = anyio.Event()
        self.reason = ""
        self._callbacks: set[Callable[[], object]] = set()

    def request(self, reason: str) -> None:
        if self.requested.is_set():
            self.forced.set()
        else:
            self.reason = reason
            self.requested.set()
            for callback in list(self._callbacks):
                callback()

    @contextlib.contextmanager
    def on_request(self, callback: Callable[[], object]) -> Iterator[None]:
        """Call ``callback`` when a stop is requested inside the block (at once if one was).

        What a worker does while it waits or runs, it does in its own task; a stop reaches it
        through this callback instead of a watcher task per wait (a task, a task group and a
        cancellation for every run of a thousand-task fleet).
        """
        if self.requested.is_set():
            callback()
            yield
            return
        self._callbacks.add(callback)
        try:
            yield
        finally:
            self._callbacks.discard(callback)


@dataclass
class WorkerStatus:
    """What ``status`` and the summary show of one worker."""

    worker: str
    task: int
    title: str
    state: WorkerState = WorkerState.PENDING
    machine: str | None = None
    workspace: str | None = None
    run: int = 0
    pid: int | None = None
    start_ticks: int | None = None
    run_dir: str | None = None
    milestones: int = 0
    crashes: int = 0
    last_crash_run: int | None = None
    usage_pauses: int = 0
    last_exit: int | None = None
    reason: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    run_started_at: float | None = None
    next_run_at: float | None = None
    milestones_before: list[str] = field(default_factory=list)
    lease_path: str | None = None
    adopted_from: str | None = None
    history: policy.History = field(default_factory=policy.History)

    @property
    def wall_time(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.ended_at or time.time()) - self.started_at

    def as_dict(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "task": self.task,
            "title": self.title,
            "state": str(self.state),
            "machine": self.machine,
            "workspace": self.workspace,
            "runs": self.run,
            "pid": self.pid,
            "start_ticks": self.start_ticks,
            "run_dir": self.run_dir,
            "milestones": self.milestones,
            "crashes": self.crashes,
            "last_crash_run": self.last_crash_run,
            "usage_pauses": self.usage_pauses,
            "last_exit": self.last_exit,
            "reason": self.reason,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "run_started_at": self.run_started_at,
            "next_run_at": self.next_run_at,
            "milestones_before": self.milestones_before,
            "lease_path": self.lease_path,
            "adopted_from": self.adopted_from,
            "wall_time": round(self.wall_time, 3),
        }


@dataclass(frozen=True)
class MachineLost:
    """The run's machine stayed unreachable: the run's end is unknown (not a crash)."""

    reason: str


@dataclass(frozen=True)
class Adoption:
    """A run of a dead supervisor that this worker takes over instead of starting one."""

    machine: str
    handle: RunHandle
    run: int
    workspace: str
    offsets: Mapping[Stream, int]
    before: set[str]
    from_fleet: str
    lease_path: str
    milestones: int
    crashes: int


class FleetServices(Protocol):
    """What a worker needs from its fleet (``fleet.Fleet`` provides it)."""

    @property
    def config(self) -> FleetConfig: ...

    @property
    def hosts(self) -> Mapping[str, Host]: ...

    @property
    def pool(self) -> SlotPool: ...

    @property
    def gate(self) -> StartGate: ...

    @property
    def mux(self) -> LogMux: ...

    @property
    def stop(self) -> StopControl: ...

    @property
    def starts(self) -> StartsGate: ...

    async def clone_on(self, machine: str) -> Clone: ...

    async def run_root(self, machine: str) -> str: ...

    async def lease_path(self, machine: str) -> str: ...

    def changed(self) -> None: ...

    def pause_machine(self, machine: str, until: float, reason: str) -> None: ...

    def machine_lost(self, machine: str) -> None: ...


class Worker:
    """Drives one task from ``pending`` to a final state."""

    def __init__(
        self,
        name: str,
        task: TaskConfig,
        fleet: FleetServices,
        adoption: Adoption | None = None,
    ) -> None:
        self.name = name
        self.task = task
        self.fleet = fleet
        self.adoption = adoption
        self.status = WorkerStatus(worker=name, task=task.issue, title=task.title)
        if adoption is not None:
            self.status.adopted_from = adoption.from_fleet
        self._policy = policy.RestartPolicy(**fleet.config.restart.model_dump())
        agent = fleet.config.agent
        defaults = LimitPatterns()
        self._limits = shared_detector(
            LimitPatterns(
                usage=tuple(agent.usage_limit_patterns or defaults.usage),
                rate=tuple(agent.rate_limit_patterns or defaults.rate),
            )
        )
        self._limit_hit: LimitHit | None = None
        self._logger: structlog.typing.FilteringBoundLogger | None = None
        self._logger_tag: Tag | None = None
        self._restart_requested = False
        self._current: RunHandle | None = None

    # helpers -----------------------------------------------------------------------------

    @property
    def current(self) -> RunHandle | None:
        """The run in progress, if any."""
        return self._current

    @property
    def tag(self) -> Tag:
        return Tag(self.name, self.task.issue, self.status.machine or "-", self.status.run)

    def log(self, event: str, message: str, **fields: Any) -> None:
        tag = self.tag
        if self._logger is None or self._logger_tag != tag:
            self._logger, self._logger_tag = self.fleet.mux.logger(tag), tag
        self._logger.info(event, msg=message, **fields)

    def _set(self, state: WorkerState, reason: str = "") -> None:
        self.status.state = advance(self.status.state, state)
        self.status.reason = reason
        if state.final:
            self.status.ended_at = time.time()
        self.fleet.changed()

    async def _unless_stopped(self, wait: Callable[[], Awaitable[object]]) -> bool:
        """Run ``wait``; return False (cancelling it) if the fleet is asked to stop first."""
        with anyio.CancelScope() as scope, self.fleet.stop.on_request(scope.cancel):
            await wait()
            return True
        return False

    # the life ----------------------------------------------------------------------------

    async def run(self) -> WorkerStatus:
        """Run the task to its end; never raises for the task's own failures."""
        if self.status.state.final:  # failed before it began (no usable machine)
            return self.status
        pinned = self.task.machine
        if pinned is not None and not self.fleet.pool.capacity.get(pinned):
            self._fail(f"machine {pinned} cannot run agents in this fleet")
            return self.status
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
        return self.status

    def _fail(self, reason: str, detail: str = "") -> None:
        stopping = self.fleet.stop.requested.is_set() and not detail
        self.log("failed", f"✗ {reason}", error=reason, traceback=detail or None)
        if not self.status.state.final:
            # A helper command cut short by the stop (Ctrl-C reaches git too) is a stop.
            self.status.state = WorkerState.STOPPED if stopping else WorkerState.FAILED
            self.status.reason = reason
            self.status.ended_at = time.time()
            self.fleet.changed()

    async def _live(self) -> None:
        fleet = self.fleet
        slot: str | None = None
        adoption = self.adoption

        async def first_slot() -> None:
            nonlocal slot
            if adoption is not None:  # its run is already running: no gate to pass
                slot = await fleet.pool.acquire(adoption.machine)
            else:
                slot = await self._acquire(self.task.machine)

        if not await self._unless_stopped(first_slot) or slot is None:
            self._set(WorkerState.STOPPED, f"not started: {self._stop_reason()}")
            return
        try:
            self.status.machine = slot
            self.status.started_at = self.status.started_at or time.time()
            host = fleet.hosts[slot]
            decision: policy.Decision | MachineLost | None = None
            if adoption is not None:
                decision = await self._adopt(host, adoption)
            prompt_kind = "first"
            while True:
                if decision is None:
                    try:
                        if self.status.workspace is None:
                            await self._prepare(slot)
                        decision = await self._one_run(host, prompt_kind)
                    except HostUnreachable as exc:
                        # A lost link is the machine's trouble, not the task's: a crash with
                        # backoff (within the intensity limit), never an instant failure; the
                        # machine takes no new runs for a while.
                        fleet.machine_lost(slot)
                        self._limit_hit = None
                        decision = self._decide(ExitStatus(None, lost=True, reason=str(exc)), [])
                if fleet.stop.requested.is_set():
                    self._set(WorkerState.STOPPED, fleet.stop.reason)
                    return
                if isinstance(decision, MachineLost):
                    self.log("lost", f"✗ {decision.reason}", reason=decision.reason)
                    fleet.machine_lost(slot)
                    if not fleet.config.requeue_lost:
                        self._set(WorkerState.LOST, decision.reason)
                        return
                    # Start over on another machine: a fresh worktree there, the first prompt.
                    self._set(WorkerState.LOST, decision.reason)
                    self._set(WorkerState.PENDING)
                    self.status.ended_at = None
                    fleet.pool.release(slot)
                    lost_on, slot = slot, None

                    async def elsewhere() -> None:
                        nonlocal slot
                        slot = await self._acquire(None)

                    if not await self._unless_stopped(elsewhere) or slot is None:
                        self._set(WorkerState.STOPPED, self._stop_reason())
                        return
                    self.log("requeued", f"↪ requeued from {lost_on} to {slot}", machine=slot)
                    self.status.machine, self.status.workspace = slot, None
                    host = fleet.hosts[slot]
                    decision, prompt_kind = None, "first"
                    continue
                if isinstance(decision, policy.Finish):
                    self._set(WorkerState.DONE)
                    self.log("done", f"✓ done after {self.status.run} run(s)")
                    return
                if isinstance(decision, policy.GiveUp):
                    self._set(WorkerState.FAILED, decision.reason)
                    self.log("gave-up", f"✗ giving up: {decision.reason}", reason=decision.reason)
                    return
                if isinstance(decision, policy.Resume):
                    self._set(WorkerState.RESUMING)
                    prompt_kind = "resume"
                    decision = None
                    # Keeps its slot: a milestone hand-off is not a failure.  But no new run
                    # starts while the fleet is paused, nor after the soft deadline.
                    if not await self._unless_stopped(fleet.starts.wait) or fleet.starts.closed:
                        self._set(WorkerState.STOPPED, self._stop_reason())
                        return
                    continue
                # Backoff or pause: give the slot to others meanwhile.
                fleet.pool.release(slot)
                slot_held, slot = slot, None
                until = (
                    time.time() + decision.delay
                    if isinstance(decision, policy.Restart)
                    else decision.until
                )
                decision = None
                self.status.next_run_at = until
                self.fleet.changed()
                prompt_kind = "resume" if self.status.state is WorkerState.PAUSED else "auto"

                # Its worktree ties it to its machine; before it has one, any machine will do.
                pin = slot_held if self.status.workspace is not None else self.task.machine

                async def wait_and_reacquire(machine: str | None = pin, at: float = until) -> None:
                    nonlocal slot
                    while (left := at - time.time()) > 0 and not self._restart_requested:
                        with anyio.move_on_after(min(left, 0.5)):
                            await fleet.stop.requested.wait()
                    slot = await self._acquire(machine)

                if not await self._unless_stopped(wait_and_reacquire) or slot is None:
                    self._set(WorkerState.STOPPED, self._stop_reason())
                    return
                self.status.machine, host = slot, fleet.hosts[slot]
                self.status.next_run_at = None
                self._restart_requested = False
        finally:
            if slot is not None:
                fleet.pool.release(slot)

    async def _prepare(self, machine: str) -> None:
        """The worker clone (once per machine) and this task's worktree (re-used if there)."""
        if self.status.state is not WorkerState.PREPARING:
            self._set(WorkerState.PREPARING)
        clone = await self.fleet.clone_on(machine)
        tree = worktree_name(self.fleet.config.worktree_name, self.task.issue, self.task.title)
        self.status.workspace = await ensure_worktree(clone, tree)
        workspace = self.status.workspace
        self.log("prepared", f"worktree {workspace}", workspace=workspace)

    async def _acquire(self, machine: str | None) -> str | None:
        """A slot for a new run, once new runs are allowed; None once they never will be."""
        fleet = self.fleet
        while await fleet.starts.wait():
            slot = await fleet.pool.acquire(machine)
            if not fleet.starts.paused and not fleet.starts.closed:
                return slot
            fleet.pool.release(slot)  # paused or closed while we queued for the slot
        return None

    def _stop_reason(self) -> str:
        if self.fleet.stop.requested.is_set():
            return self.fleet.stop.reason
        return self.fleet.starts.closed_reason or "stopped"

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

    async def _one_run(self, host: Host, prompt_kind: str) -> policy.Decision | MachineLost:
        fleet = self.fleet
        config = fleet.config
        assert self.status.workspace is not None and self.status.machine is not None
        workspace = self.status.workspace
        kind, prompt = await self._prompt(host, prompt_kind)
        before = await host.glob(workspace, self._globs())
        staggered = fleet.gate.interval > 0  # else no wait, and no watcher task for it
        if staggered and not await self._unless_stopped(fleet.gate.wait_turn):
            return policy.Finish()  # stopped before it started: `_live` sees the stop
        if fleet.stop.requested.is_set():
            return policy.Finish()
        self.status.run += 1
        run = self.status.run
        argv = [render(part, self._values(prompt)) for part in config.agent_command]
        env = {
            **config.agent.env,
            **self.task.env,
            "AGENTIZE_FLEET_ISSUE": str(self.task.issue),
            "AGENTIZE_FLEET_RUN": str(run),
            "AGENTIZE_FLEET_WORKSPACE": workspace,
            "AGENTIZE_FLEET_TITLE": self.task.title,
        }
        run_dir = posixpath.join(
            await fleet.run_root(self.status.machine), self.name, f"run-{run}"
        )
        lease = await fleet.lease_path(self.status.machine)
        spec = RunSpec(
            argv=argv,
            cwd=workspace,
            run_dir=run_dir,
            lease_path=lease,
            lease_timeout=config.lease_timeout,
            env=env,
        )
        self._limit_hit = None
        handle = await host.start(spec)
        self.status.milestones_before = sorted(before)
        self.status.lease_path = lease
        self._running(handle)
        self.log(
            "run-started",
            f"▶ run {run} started (pid {handle.identity.pid}, {kind} prompt: {prompt})",
            pid=handle.identity.pid,
            prompt=prompt,
            prompt_kind=kind,
            run_dir=run_dir,
        )
        return await self._finish_run(host, handle, before, {})

    def _running(self, handle: RunHandle) -> None:
        self._current = handle
        self.status.pid = handle.identity.pid
        self.status.start_ticks = handle.identity.start_ticks
        self.status.run_dir = handle.identity.run_dir
        self.status.run_started_at = time.time()
        self._set(WorkerState.RUNNING)

    async def _finish_run(
        self,
        host: Host,
        handle: RunHandle,
        before: set[str],
        offsets: Mapping[Stream, int],
    ) -> policy.Decision | MachineLost:
        assert self.status.workspace is not None
        status = await self._follow(handle, offsets)
        self._current = None
        self.status.pid = None
        self.status.last_exit = status.code
        if status.lost and await self._machine_unreachable(host):
            return MachineLost(status.reason or f"machine {host.name} unreachable")
        after = await host.glob(self.status.workspace, self._globs())
        return self._decide(status, sorted(after - before))

    async def _machine_unreachable(self, host: Host) -> bool:
        try:
            await host.run(["true"], timeout=30.0)
        except HostUnreachable:
            return True
        except HostError:
            return False
        return False

    async def _adopt(self, host: Host, adoption: Adoption) -> policy.Decision | MachineLost:
        """Take over a run whose supervisor died: keep reading it from where the log stopped."""
        self.status.run = adoption.run
        self.status.workspace = adoption.workspace
        self.status.milestones = adoption.milestones
        self.status.crashes = adoption.crashes
        self.status.milestones_before = sorted(adoption.before)
        self.status.lease_path = adoption.lease_path
        self._set(WorkerState.PREPARING)
        self._running(adoption.handle)
        offsets = ", ".join(f"{k} @{v}" for k, v in adoption.offsets.items()) or "the start"
        self.log(
            "adopted",
            f"⇄ adopted run {adoption.run} (pid {adoption.handle.identity.pid}) of dead fleet "
            f"{adoption.from_fleet}, reading its output from {offsets}",
            pid=adoption.handle.identity.pid,
            from_fleet=adoption.from_fleet,
            offsets=dict(adoption.offsets),
        )
        return await self._finish_run(host, adoption.handle, adoption.before, adoption.offsets)

    async def _follow(self, handle: RunHandle, offsets: Mapping[Stream, int]) -> ExitStatus:
        """Pump the run's output into the log until it ends; stop it if the fleet stops."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pump, handle, offsets)
            with self.fleet.stop.on_request(lambda: tg.start_soon(self._stop_run, handle)):
                status = await handle.wait()
        return status

    async def _pump(self, handle: RunHandle, offsets: Mapping[Stream, int]) -> None:
        tails = {s: OutputTail() for s in STREAMS}
        mux = self.fleet.mux
        await pump_output(
            mux, self.tag, handle.output(offsets), offsets, self.fleet.config.max_line_bytes,
            on_block=lambda stream, block: tails[stream].add(block),
            pause=lambda: self._unless_stopped(mux.writable),
        )
        self._scan(tails.values())

    def _scan(self, tails: Iterable[OutputTail]) -> None:
        """Why did the run end: look for a usage or rate limit in the last output it printed.

        Only the tail of each stream counts (:class:`OutputTail`): an agent stopped by a limit
        says so last, while a limit message far earlier in the output (a test log, a file the
        agent printed) says nothing about this exit -- and scanning every line of an agent
        printing a million lines a second would cost more than logging them.
        """
        found: LimitHit | None = None
        for tail in tails:
            text = tail.text()
            hit = self._limits.feed_batch(text.split("\n"), time.time(), text) if text else None
            if hit is not None and (found is None or hit.kind == "usage"):
                found = hit
        self._limit_hit = found

    async def _stop_run(self, handle: RunHandle) -> None:
        """The fleet stops: this run too, SIGTERM first (its task starts on the request)."""
        stop = self.fleet.stop
        self._set(WorkerState.STOPPING)
        timeout = self.fleet.config.stop_timeout
        self.log("stopping", f"■ stopping: SIGTERM to the run's process group ({timeout:g}s)")
        await handle.stop(
            timeout,
            sooner=stop.forced,
            before_kill=lambda: self.log(
                "killing", "■ SIGKILL to what is left of the run's process tree"
            ),
        )

    def request_restart(self) -> RunHandle | bool:
        """Mark the task for an immediate new run (``agentize-fleet restart``).

        Returns the run to stop (the caller stops it with :meth:`stop_run`), ``True`` when the
        task was waiting (backoff, pause) and will start at once, ``False`` when there is
        nothing to restart.
        """
        if self._current is not None:
            self._restart_requested = True
            return self._current
        if self.status.state in (WorkerState.BACKOFF, WorkerState.PAUSED):
            self._restart_requested = True
            return True
        return False

    async def stop_run(self, handle: RunHandle) -> None:
        """Stop one run (``restart``): the same stop as the fleet's, on this run alone."""
        await handle.stop(self.fleet.config.stop_timeout)

    def _decide(self, status: ExitStatus, new_milestones: list[str]) -> policy.Decision:
        now = time.time()
        hit = self._limit_hit
        if self.fleet.stop.requested.is_set():
            self.log("run-ended", f"■ run {self.status.run} ended with {status.code} (stopped)",
                     exit_code=status.code)
            return policy.Finish()
        if self._restart_requested:
            self.log("restarting", f"↻ run {self.status.run} restarted on request")
            if new_milestones:
                return policy.Resume()
            self._set(WorkerState.BACKOFF, "restart requested")
            return policy.Restart(0.0)
        if new_milestones:
            outcome = policy.Outcome.MILESTONE
        elif hit is not None and hit.kind == "usage":
            outcome = policy.Outcome.USAGE_LIMIT
        elif status.ok:
            outcome = policy.Outcome.DONE
        else:
            outcome = policy.Outcome.CRASH
        decision, self.status.history = policy.decide(
            self._policy,
            self.status.history,
            outcome,
            now=now,
            rand=random.random(),
            reset_at=hit.reset_at if hit is not None else None,
        )
        code = "lost" if status.lost else str(status.code)
        if outcome is policy.Outcome.MILESTONE:
            self.status.milestones += 1
            self.log(
                "milestone",
                f"⚑ run {self.status.run} left milestone {', '.join(new_milestones)}: resuming",
                milestones=new_milestones,
                exit_code=status.code,
            )
        elif outcome is policy.Outcome.USAGE_LIMIT:
            self.status.usage_pauses += 1
            assert hit is not None
            if isinstance(decision, policy.Pause):
                self._set(WorkerState.PAUSED, "usage limit")
                assert self.status.machine is not None
                self.fleet.pause_machine(self.status.machine, decision.until, "usage limit")
            self.log(
                "usage-limit",
                f"⏸ usage limit reached: pausing until {_clock(getattr(decision, 'until', now))}",
                line=hit.line,
                reset_at=hit.reset_at,
                exit_code=status.code,
            )
        elif outcome is policy.Outcome.CRASH:
            self.status.crashes += 1
            self.status.last_crash_run = self.status.run
            detail = status.reason or f"exit {code}"
            if isinstance(decision, policy.Restart):
                self._set(WorkerState.BACKOFF, detail)
                self.log(
                    "crashed",
                    f"✗ run {self.status.run} crashed ({detail}); restarting in "
                    f"{decision.delay:.1f}s",
                    exit_code=status.code,
                    backoff=round(decision.delay, 3),
                )
            else:
                self.log("crashed", f"✗ run {self.status.run} crashed ({detail})",
                         exit_code=status.code)
        else:
            self.log("run-ended", f"■ run {self.status.run} exited 0 with no new milestone",
                     exit_code=status.code)
        return decision


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))
