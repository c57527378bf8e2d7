"""One run of a task's worker: its worktree prepared, the run started (or adopted), its output
pumped into the log and its kind's reader, its end judged and recorded.

:class:`RunDriver` is the part of :class:`supervisor.worker.Worker` that deals with one run at
a time -- the steps every run goes through, in order -- and the helpers both parts share (the
worker's log, its ledger writes, its state changes).  The worker itself (``worker.py``) drives
the task's life between runs: slots, waits, what each decision means.

Every transition goes to the ledger as it happens: the intent of a run before the host is asked
to start it (with the agent session it will be in), its pid right after, the session id the
agent tells as soon as it tells it, its end together with what the agent reported and the
task's new state in one transaction.
"""

from __future__ import annotations

import posixpath
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import anyio
import structlog

from supervisor import agentrun, agents, policy, worktree_trust
from supervisor.agentrun import AgentRun
from supervisor.agents import NEW_SESSION, NextStep, Session
from supervisor.config import FleetConfig, TaskConfig
from supervisor.hosts.base import (
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
from supervisor.limits import LimitDetector
from supervisor.lines import pump_output
from supervisor.logwriter import LogMux, Tag
from supervisor.outcome import Decision, WorkerStatus, judge
from supervisor.recovery import Adoption, Seen, look_settled
from supervisor.runio import render
from supervisor.scheduling import SlotPool, StartGate, StartsGate, StopControl
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

    def close_starts(self, reason: str) -> None: ...


class RunDriver:
    """One run at a time of one task (see the module docstring)."""

    def __init__(self, name: str, task: TaskConfig, fleet: FleetServices, origin: str) -> None:
        self.name = name
        self.task = task
        self.fleet = fleet
        self.origin = origin
        self.status = WorkerStatus(worker=name, task=task.issue, title=task.title)
        self.kind = agents.get_kind(fleet.config.agent.kind)
        self._policy = policy.RestartPolicy(**fleet.config.restart.model_dump())
        self._agent: AgentRun | None = None
        self._stalled = ""
        self._git_dir: str | None = None
        self._cost_from = 0  # the cost limit counts the task's runs after this one
        self._logger: structlog.typing.FilteringBoundLogger | None = None
        self._logger_tag: Tag | None = None
        self._restart_requested = False
        self._current: RunHandle | None = None
        self._run: RunRecord | None = None
        self._prepared = False
        #: The machine this worker waits for (``*``: any), for the fleet to tell when nothing
        #: is left but waiting for machines that cannot be reached.
        self.waiting_for: str | None = None
        self._run_wait: anyio.CancelScope | None = None

    # helpers the worker shares -------------------------------------------------------------

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

    def record(self) -> TaskRecord:
        """The task as the ledger keeps it."""
        return self.status.to_record(self.task.prompt, self.task.machine, self.origin)

    def persist(self) -> None:
        self.fleet.ledger.save_task(
            self.record(),
            shift=self.fleet.shift_id,
            worker=self.name,
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

    # one run -------------------------------------------------------------------------------

    async def _prepare(self, machine: str) -> None:
        """The worker clone (once per machine) and this task's worktree (re-used if there)."""
        if self.status.state is not WorkerState.PREPARING:
            self._set(WorkerState.PREPARING)
        clone = await self.fleet.clone_on(machine)
        tree = worktree_name(self.fleet.config.worktree_name, self.task.issue, self.task.title)
        self.status.workspace = await ensure_worktree(clone, tree)
        self._git_dir = clone.path
        self._prepared = True
        self.persist()
        self.log("prepared", f"worktree {self.status.workspace}", workspace=self.status.workspace)
        if self.kind.name == "claude":
            env = {**self.fleet.config.agent.env, **self.task.env}
            problem = await worktree_trust.ensure_trusted(
                self.fleet.hosts[machine], self.status.workspace, env
            )
            if problem:
                self.log(
                    "trust-failed",
                    f"⚠ could not mark the worktree trusted for Claude "
                    f"Code ({problem}); the run goes on",
                    error=problem,
                )

    async def _prompt(self, host: Host, kind: agents.PromptKind) -> tuple[agents.PromptKind, str]:
        if kind == "auto":  # after a crash: resume if any milestone exists in the worktree
            assert self.status.workspace is not None
            existing = await host.glob(self.status.workspace, self._globs())
            kind = "resume" if existing else "first"
        template = agentrun.prompt_template(self.fleet.config, self.task, kind)
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

    async def _one_run(self, host: Host) -> Decision:
        fleet = self.fleet
        config = fleet.config
        machine, workspace = self.status.machine, self.status.workspace
        assert workspace is not None and machine is not None
        over = self._over_budget()
        if over is not None:
            return over
        s = self.status
        session = Session(resume=s.next_resume) if s.next_resume else NEW_SESSION
        kind, prompt = await self._prompt(host, s.next_prompt)
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
        launch = agentrun.launch(
            self.kind,
            config,
            NextStep(None, session, kind),
            prompt,
            self._values(""),
            git_dir=self._git_dir or posixpath.dirname(posixpath.dirname(workspace)),
        )
        # Written before the host is asked: a supervisor killed during the start leaves the
        # next one an intent to look for, never a run nobody knows of.  No intent, no start.
        run = await self._committed(
            lambda: fleet.ledger.run_intent(
                self.record(),
                shift=fleet.shift_id,
                worker=self.name,
                machine=machine,
                workspace=workspace,
                run_dir_of=lambda n: posixpath.join(root, self.name, f"run-{n}"),
                lease_path=lease,
                prompt_kind=kind,
                milestones_before=sorted(before),
                agent_kind=self.kind.name,
                session_id=launch.session_id,
                resumed_from=session.resume,
            )
        )
        if run is None:
            return policy.Finish()  # stopped while the ledger could not be written
        self._run = run
        self.status.run = run.number
        env = {
            **launch.env,  # the kind's (GEMINI_TRUST_WORKSPACE); the user's env wins over it
            **config.agent.env,
            **self.task.env,
            "AGENTIZE_FLEET_ISSUE": str(self.task.issue),
            "AGENTIZE_FLEET_RUN": str(run.number),
            "AGENTIZE_FLEET_WORKSPACE": workspace,
            "AGENTIZE_FLEET_TITLE": self.task.title,
        }
        # The run directory says whose run it is, for whoever finds it without the ledger.
        meta = {
            "task": str(self.task.issue),
            "run": str(run.number),
            "shift": fleet.shift_id,
            "worker": self.name,
            "machine": machine,
        }
        spec = RunSpec(
            argv=launch.argv,
            cwd=workspace,
            run_dir=run.run_dir,
            lease_path=lease,
            lease_timeout=config.lease_timeout,
            env=env,
            meta=meta,
        )
        self._agent = AgentRun.start(
            self.kind, launch, fleet.limit_detector(machine), self._session_told
        )
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
            fleet.ledger.run_ended(run.id, state="abandoned", reason=f"start failed: {exc.message}")
            self._run = self._agent = None  # nothing ran: no session to go on with
            raise
        fleet.ledger.run_started(run.id, handle.identity.pid, handle.identity.start_ticks)
        self.status.milestones_before = sorted(before)
        self.status.lease_path = lease
        self._running(handle)
        in_session = ""
        if launch.session_id:
            how = "resuming session" if launch.resuming else "session"
            in_session = f", {how} {launch.session_id}"
        self.log(
            "run-started",
            f"▶ run {run.number} started (pid {handle.identity.pid}{in_session}, {kind} prompt: "
            f"{prompt})",
            pid=handle.identity.pid,
            prompt=prompt,
            prompt_kind=kind,
            run_dir=run.run_dir,
            **(
                {"session_id": launch.session_id, "resumed_from": session.resume}
                if self.kind.resumes
                else {}
            ),
        )
        return await self._finish_run(host, handle, before, {})

    def _session_told(self, session_id: str) -> None:
        """The agent told its session id (a first event, a resumed session's new id): into
        the ledger at once, so that a crash right after resumes the right session."""
        if self._run is not None:
            self.fleet.ledger.record_usage(self._run.id, {"session_id": session_id})

    def _over_budget(self) -> Decision | None:
        """``max_cost_usd``: no new run for a task (or anyone, for the fleet) past its cost.
        A run in progress is never cut: the agents report cost at their end."""
        limits, ledger = self.fleet.config.max_cost_usd, self.fleet.ledger
        if limits.task is not None:
            spent = ledger.cost_of(issue=self.task.issue, after_run=self._cost_from)
            if spent >= limits.task:
                reason = f"cost limit reached (${spent:.2f} of max_cost_usd.task ${limits.task:g})"
                self.log("cost-limit", f"✗ {reason}: no new run", cost_usd=spent)
                self._set(WorkerState.FAILED, reason)
                return policy.GiveUp(reason)
        if limits.fleet is not None:
            spent = ledger.cost_of(shift=self.fleet.shift_id)
            if spent >= limits.fleet:
                self.fleet.close_starts(
                    f"cost limit reached (${spent:.2f} of max_cost_usd.fleet ${limits.fleet:g})"
                )
                self._set(WorkerState.STOPPED, self._stop_reason())
                return policy.Finish()
        return None

    async def _unconfirmed(
        self, host: Host, run: RunRecord, error: HostUnreachable
    ) -> RunHandle | Decision:
        """A start whose answer was lost with its machine: once the machine answers again,
        its run directory says whether the run started (its handle, to follow as if the start
        had answered) or not (abandoned: a new run starts, no crash).  While the machine is
        away the run may live: nothing else starts in its slot, and if the fleet gives up on
        the machine the intent stays open for the next ``up`` to look at."""
        machine = run.machine
        self.log(
            "start-unconfirmed",
            f"⋯ run {run.number}: its start could not be confirmed "
            f"({error.message}); looking at its run directory once {machine} answers",
        )
        while await self._unless_stopped(lambda: self.fleet.machine_up(machine), machine):
            try:
                look = (await look_settled(host, [run], local=False))[run.id]
                if look.seen is Seen.STARTED:
                    assert look.pid is not None and look.ticks is not None
                    handle = await host.attach(
                        RunIdentity(machine, run.run_dir, look.pid, look.ticks)
                    )
                    if handle is not None:
                        return handle
            except HostUnreachable:
                continue  # away again: wait for it again
            if look.seen is Seen.NO_AGENT:
                return self._ended(ExitStatus(look.code, reason="the run did not start"), [])
            self.fleet.ledger.run_ended(
                run.id, state="abandoned", reason="never started (its start was not confirmed)"
            )
            self._run = self._agent = None
            return policy.Restart(0.0)
        away = self.fleet.machine_away(machine) or machine
        return self._out_of_reach(f"{away}: run {run.number} may have started there")

    def _out_of_reach(self, why: str) -> Decision:
        """The run cannot be followed in this shift: it stays open in the ledger for the next
        ``up`` to find by its run directory; the task is lost (stopped, if the fleet stops)."""
        self._run = None
        stopping = self.fleet.stop.requested.is_set()
        return self._ended(
            ExitStatus(None, lost=True, reason=why), [], lost="" if stopping else why
        )

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
        self._agent = agentrun.adopted(
            run,
            self.fleet.config.agent.kind,
            self.fleet.limit_detector(run.machine),
            self._session_told,
        )
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
            pid=handle.identity.pid,
            from_fleet=s.adopted_from,
            offsets=dict(adoption.offsets),
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
                if not await self._unless_stopped(
                    lambda: self.fleet.machine_up(host.name), host.name
                ):
                    break
                await anyio.sleep(1.0)  # (a host that does not say it is away: not too often)
        return self._ended(status, sorted(after - before))

    async def _follow_output(
        self, handle: RunHandle, offsets: Mapping[Stream, int]
    ) -> ExitStatus | None:
        """Pump the run's output into the log until it ends; stop it if the fleet stops."""

        async def pump() -> None:
            mux = self.fleet.mux
            await pump_output(
                mux,
                self.tag,
                handle.output(offsets),
                offsets,
                self.fleet.config.max_line_bytes,
                # Every block to the kind's reader too (kind "command": a bounded tail).
                on_block=None if self._agent is None else self._agent.on_block,
                # While the log cannot be written, the output waits in the run's own files.
                pause=lambda: self._unless_stopped(mux.writable),
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
            self.log(
                "stop-unreachable",
                f"■ cannot stop run {self.status.run} now ({exc}): "
                "its watchdog stops it once its lease runs out",
            )
            self._give_up_run()

    # the end of a run ---------------------------------------------------------------------

    def _ended(self, status: ExitStatus, new_milestones: list[str], *, lost: str = "") -> Decision:
        """Decide what follows a run (:func:`supervisor.outcome.judge`, from what its kind
        made of it), and record its end -- what its agent reported, the task's new state and
        how its next run starts -- in one transaction (a crash leaves all or none)."""
        s = self.status
        stop = self.fleet.stop
        agent, self._agent = self._agent, None
        now = time.time()
        said = agent.verdict(status.code, now) if agent is not None else None
        verdict = judge(
            s,
            self._policy,
            status,
            new_milestones,
            said,
            kind=self.kind,
            session_id=agent.session_id if agent is not None else None,
            stalled=self._stalled,
            lost=lost,
            stopping=stop.reason if stop.requested.is_set() else None,
            restart_requested=self._restart_requested,
            run_fields=agent.fields() if agent is not None else None,
            now=now,
            rand=random.random(),
        )
        self._restart_requested, self._stalled = False, ""
        if verdict.state is WorkerState.STOPPED and s.state is not WorkerState.STOPPING:
            s.state = advance(s.state, WorkerState.STOPPING)  # it ended as the stop came
        s.state = advance(s.state, verdict.state)
        s.reason = verdict.reason
        s.outcome = verdict.outcome
        usage = agent.usage() if agent is not None else {}
        if usage.get("result_text"):
            s.result_text = usage["result_text"]
        if said is not None and said.line and verdict.outcome == "usage-limited":
            usage["limit_line"] = said.line
        if verdict.state.final:
            s.ended_at = now
        if self._run is not None:
            self.fleet.ledger.run_ended(
                self._run.id,
                exit_code=status.code,
                lost=status.lost,
                outcome=verdict.outcome,
                reason=status.reason or (said.reason if said is not None else ""),
                task=self.record(),
                shift=self.fleet.shift_id,
                worker=self.name,
                usage=usage,
            )
            self._run = None
            if usage:
                s.usage = self.fleet.ledger.task_usage(self.task.issue)
        else:
            self.persist()
        for event, message, fields in verdict.lines:
            self.log(event, message, **fields)
        if isinstance(verdict.decision, policy.Pause) and verdict.outcome == "usage-limited":
            assert s.machine is not None
            line = said.line if said is not None and said.line else verdict.reason
            why = "usage limit" + (f" ({said.window})" if said is not None and said.window else "")
            self.fleet.pause_machine(s.machine, verdict.decision.until, why, line)
        return verdict.decision
