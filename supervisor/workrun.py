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
from typing import Any, Protocol

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
    Reach,
    RunHandle,
    RunSpec,
    Stream,
    wait_while_reachable,
)
from supervisor.ledger import Ledger, RunRecord, TaskRecord
from supervisor.lifecycle import WorkerState, advance
from supervisor.limits import LimitDetector
from supervisor.lines import pump_output
from supervisor.logs import LogMux, Tag
from supervisor.outcome import Decision, WorkerStatus, judge
from supervisor.recovery import Adoption
from supervisor.runio import render
from supervisor.scheduling import SlotPool, StartGate, StartsGate, StopControl
from supervisor.workspace import Clone, ensure_worktree, worktree_name


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

    def machine_lost(self, machine: str) -> None: ...

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

    async def _unless_stopped(self, wait: Callable[[], Awaitable[object]]) -> bool:
        """Run ``wait``; return False (cancelling it) if the fleet is asked to stop first."""
        with anyio.CancelScope() as scope, self.fleet.stop.on_request(scope.cancel):
            await wait()
            return True
        return False

    def _stop_reason(self) -> str:
        if self.fleet.stop.requested.is_set():
            return self.fleet.stop.reason
        return self.fleet.starts.closed_reason or "stopped"

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
        self.log("prepared", f"worktree {self.status.workspace}",
                 workspace=self.status.workspace)
        if self.kind.name == "claude":
            env = {**self.fleet.config.agent.env, **self.task.env}
            problem = await worktree_trust.ensure_trusted(
                self.fleet.hosts[machine], self.status.workspace, env
            )
            if problem:
                self.log("trust-failed", f"⚠ could not mark the worktree trusted for Claude "
                         f"Code ({problem}); the run goes on", error=problem)

    async def _prompt(
        self, host: Host, kind: agents.PromptKind
    ) -> tuple[agents.PromptKind, str]:
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
        if fleet.stop.requested.is_set():
            return policy.Finish()
        root = await fleet.run_root(machine)
        lease = await fleet.lease_path(machine)
        launch = agentrun.launch(
            self.kind, config, NextStep(None, session, kind), prompt, self._values(""),
            git_dir=self._git_dir or posixpath.dirname(posixpath.dirname(workspace)),
        )
        # Written before the host is asked: a supervisor killed during the start leaves the
        # next one an intent to look for, never a run nobody knows of.
        run = fleet.ledger.run_intent(
            self.record(), shift=fleet.shift_id, worker=self.name, machine=machine,
            workspace=workspace, run_dir_of=lambda n: posixpath.join(root, self.name, f"run-{n}"),
            lease_path=lease, prompt_kind=kind, milestones_before=sorted(before),
            agent_kind=self.kind.name, session_id=launch.session_id,
            resumed_from=session.resume,
        )
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
        meta = {"task": str(self.task.issue), "run": str(run.number), "shift": fleet.shift_id,
                "worker": self.name, "machine": machine}
        spec = RunSpec(argv=launch.argv, cwd=workspace, run_dir=run.run_dir, lease_path=lease,
                       lease_timeout=config.lease_timeout, env=env, meta=meta)
        self._agent = AgentRun.start(self.kind, launch, fleet.limit_detector(machine),
                                     self._session_told)
        try:
            handle = await host.start(spec)
        except HostError as exc:
            unsure = isinstance(exc, HostUnreachable)
            fleet.ledger.run_ended(
                run.id, state="ended" if unsure else "abandoned", lost=unsure,
                reason=f"start {'not confirmed' if unsure else 'failed'}: {exc.message}",
            )
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
            pid=handle.identity.pid, prompt=prompt, prompt_kind=kind, run_dir=run.run_dir,
            **({"session_id": launch.session_id, "resumed_from": session.resume}
               if self.kind.resumes else {}),
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
        self._agent = agentrun.adopted(run, self.fleet.config.agent.kind,
                                       self.fleet.limit_detector(run.machine), self._session_told)
        self._set(WorkerState.PREPARING)
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
        assert self.status.workspace is not None
        status = await self._follow_output(handle, offsets)
        self._current = None
        self.status.pid = None
        self.status.last_exit = status.code
        if status.lost and await self._machine_unreachable(host):
            return self._ended(status, [], lost=status.reason or f"{host.name} unreachable")
        after = await host.glob(self.status.workspace, self._globs())
        return self._ended(status, sorted(after - before))

    async def _machine_unreachable(self, host: Host) -> bool:
        try:
            await host.run(["true"], timeout=30.0)
        except HostUnreachable:
            return True
        except HostError:
            return False
        return False

    async def _follow_output(self, handle: RunHandle, offsets: Mapping[Stream, int]) -> ExitStatus:
        """Pump the run's output into the log until it ends; stop it if the fleet stops."""

        async def pump() -> None:
            mux = self.fleet.mux
            await pump_output(
                mux, self.tag, handle.output(offsets), offsets, self.fleet.config.max_line_bytes,
                # Every block to the kind's reader too (kind "command": a bounded tail).
                on_block=None if self._agent is None else self._agent.on_block,
                # While the log cannot be written, the output waits in the run's own files.
                pause=lambda: self._unless_stopped(mux.writable),
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            with self.fleet.stop.on_request(lambda: tg.start_soon(self._stop_run, handle)):
                # The host no longer gives a run up while its machine is away; until the fleet
                # decides that for itself (issue 16's fleet side), it stops waiting once the
                # machine is unreachable, as before -- never for a slow one.
                status = await wait_while_reachable(handle)
                reach = handle.reachability
                if reach is not None and reach.state is Reach.UNREACHABLE:
                    tg.cancel_scope.cancel()  # its output cannot be read on from here now
        return status

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
            s, self._policy, status, new_milestones, said, kind=self.kind,
            session_id=agent.session_id if agent is not None else None,
            stalled=self._stalled, lost=lost,
            stopping=stop.reason if stop.requested.is_set() else None,
            restart_requested=self._restart_requested,
            run_fields=agent.fields() if agent is not None else None, now=now,
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
                self._run.id, exit_code=status.code, lost=status.lost, outcome=verdict.outcome,
                reason=status.reason or (said.reason if said is not None else ""),
                task=self.record(), shift=self.fleet.shift_id, worker=self.name, usage=usage,
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

