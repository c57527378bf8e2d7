"""What follows a run: how it ended, what the restart policy decides, the task's next state and
the lines that say so -- pure (the caller passes the clock and the random number), so the rules
and their wording are tested without a process.

The wording is part of the rule: a message says what the fleet will do ("restarting in 0.7s"
only when the task keeps its slot through the backoff; otherwise that its slot goes to others
meanwhile), as :func:`supervisor.policy.keeps_slot` decides.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from supervisor import agents, policy
from supervisor.agents import NEW_SESSION, NextStep, PromptKind, prompt_kind
from supervisor.hosts.base import ExitStatus
from supervisor.ledger import TaskRecord, TaskUsage
from supervisor.lifecycle import WorkerState

COMMAND = agents.get_kind("command")


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
    #: The last run's honest outcome and its last result text (what status and the report say).
    outcome: str | None = None
    result_text: str | None = None
    #: How the next run starts: the agent session to resume (None: a fresh one), the prompt.
    next_resume: str | None = None
    next_prompt: PromptKind = "first"
    #: What its runs cost, as the agents reported it (the ledger's sums over the runs).
    usage: TaskUsage = field(default_factory=TaskUsage)

    @property
    def wall_time(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.ended_at or time.time()) - self.started_at

    def as_dict(self) -> dict[str, Any]:
        names = (
            "worker",
            "task",
            "title",
            "machine",
            "workspace",
            "pid",
            "start_ticks",
            "run_dir",
            "milestones",
            "crashes",
            "last_crash_run",
            "usage_pauses",
            "last_exit",
            "reason",
            "started_at",
            "ended_at",
            "run_started_at",
            "next_run_at",
            "milestones_before",
            "lease_path",
            "adopted_from",
            "outcome",
            "result_text",
        )
        row: dict[str, Any] = {name: getattr(self, name) for name in names}
        row.update(
            state=str(self.state),
            runs=self.run,
            wall_time=round(self.wall_time, 3),
            **asdict(self.usage),
        )
        return row

    def to_record(self, prompt: str | None, pin: str | None, origin: str) -> TaskRecord:
        """The task as the ledger keeps it (``add``-ed ones are not listed by the config)."""
        return TaskRecord(
            issue=self.task,
            state=str(self.state),
            title=self.title,
            prompt=prompt,
            pin=pin,
            origin=origin,
            reason=self.reason,
            machine=self.machine,
            workspace=self.workspace,
            runs=self.run,
            milestones=self.milestones,
            crashes=self.crashes,
            last_crash_run=self.last_crash_run,
            usage_pauses=self.usage_pauses,
            last_exit=self.last_exit,
            history=policy.history_to_dict(self.history),
            listed=origin != "add",
            started_at=self.started_at,
            ended_at=self.ended_at,
            outcome=self.outcome,
            result_text=self.result_text,
            next_resume=self.next_resume,
            next_prompt=self.next_prompt,
        )

    def restore(
        self, record: TaskRecord, usage: TaskUsage, *, again: bool, anew: bool = False
    ) -> None:
        """Carry the task's account over from the ledger: its run counter, counts and cost
        always, its worktree (used while its machine is in the fleet), its policy memory only
        if it goes on.  How its first run in this shift starts (``next_resume``,
        ``next_prompt``): as its last shift planned when the task goes on -- it was
        interrupted (its supervisor died, the fleet was stopped, its machine was lost): its
        agent session is resumed where the kind can --, else fresh with the first prompt
        (done or failed and run again, ``--rerun``, ``--fresh``: ``anew``)."""
        self.run, self.milestones, self.crashes = record.runs, record.milestones, record.crashes
        self.last_crash_run, self.usage_pauses = record.last_crash_run, record.usage_pauses
        self.last_exit = record.last_exit
        self.machine, self.workspace = record.machine, record.workspace
        self.outcome, self.result_text, self.usage = record.outcome, record.result_text, usage
        self.next_resume, self.next_prompt = None, "first"
        if record.state == WorkerState.DONE and not again:
            self.state, self.reason = WorkerState.DONE, f"done in shift {record.last_shift}"
            return
        interrupted = record.state in (WorkerState.STOPPED, WorkerState.LOST)
        if anew or (again and not interrupted):
            return
        if not again:
            self.history = policy.history_from_dict(record.history)
        # A ledger of version 1 planned nothing: resume from a milestone if one exists.
        self.next_resume, self.next_prompt = record.next_resume, prompt_kind(record.next_prompt)


#: A task's first run, or one started anew: a fresh session with the first prompt.
FIRST = NextStep(None, NEW_SESSION, "first")


@dataclass(frozen=True)
class MachineLost:
    """The task's machine cannot be reached (never a crash): no run of it lives there, and it
    waits for the machine or moves; or its run there is out of reach for this shift."""

    reason: str


#: How a run's ``note`` starts when its machine's lease watchdog stopped it (``sh/runner.sh``):
#: its supervisor stopped renewing its lease -- a machine away, a supervisor killed.
WATCHDOG_NOTE = "stopped by the watchdog"


def stopped_by_watchdog(ended: ExitStatus) -> bool:
    """Whether the run's own watchdog stopped it (its note says so), rather than the agent
    ending or crashing: not the task's failure, so never counted as a crash."""
    return any(line.startswith(WATCHDOG_NOTE) for line in ended.reason.splitlines())


Decision = policy.Decision | MachineLost
Line = tuple[str, str, dict[str, Any]]  # (event, message, fields) for the worker's log


@dataclass(frozen=True)
class Verdict:
    """What follows one run: ``outcome`` is the run's honest outcome as the ledger keeps it
    (:class:`supervisor.agents.Outcome`'s value, or milestone, stalled, lost, stopped,
    restarted), ``step`` how the next run starts."""

    outcome: str
    decision: Decision
    state: WorkerState
    reason: str
    lines: list[Line]
    step: NextStep = FIRST


#: A usage hold's jitter: up to this share of the wait, at most :data:`MAX_JITTER` seconds, so
#: that a fleet does not start every held session in the same second of the reset.
JITTER_SHARE = 0.05
MAX_JITTER = 300.0


_STATE_OF = {
    policy.Finish: WorkerState.DONE,
    policy.Resume: WorkerState.RESUMING,
    policy.Restart: WorkerState.BACKOFF,
    policy.Pause: WorkerState.PAUSED,
    policy.GiveUp: WorkerState.FAILED,
}


def _said(ended: ExitStatus) -> agents.Verdict:
    """Kind ``command``'s rule on an exit status alone (its output was scanned elsewhere)."""
    if ended.ok:
        return agents.Verdict(agents.Outcome.DONE, "exit 0")
    return agents.Verdict(agents.Outcome.CRASHED, f"exit {'lost' if ended.lost else ended.code}")


def judge(
    status: WorkerStatus,
    rules: policy.RestartPolicy,
    ended: ExitStatus,
    new_milestones: list[str],
    said: agents.Verdict | None = None,
    *,
    kind: agents.AgentKind = COMMAND,
    session_id: str | None = None,
    stalled: str = "",
    lost: str = "",
    stopping: str | None = None,
    restart_requested: bool = False,
    run_fields: dict[str, Any] | None = None,
    now: float,
    rand: float,
) -> Verdict:
    """The verdict on run ``status.run``; the task's counters, policy memory and next step in
    ``status`` move with it.

    ``said`` is what the agent's kind made of the run (:meth:`RunReader.verdict`; ``None``:
    judge the exit status alone); ``session_id`` the agent session the run was in (a crash
    resumes it where the kind can).  ``stalled``: the stall watchdog stopped the run (why);
    ``lost``: its machine stayed unreachable; ``stopping``: the fleet's stop reason;
    ``restart_requested``: ``agentize-fleet restart`` ended it.  ``run_fields`` (session,
    cost, turns) go on the record of the run's end.
    """
    run = status.run
    fields = dict(run_fields or {})
    said = said or _said(ended)
    going_on = agents.plan_next(
        kind,
        agents.Verdict(agents.Outcome.CRASHED, "interrupted"),
        new_milestones=False,
        session_id=session_id,
    )
    if lost:
        _next(status, going_on)
        return Verdict(
            "lost",
            MachineLost(lost),
            WorkerState.LOST,
            lost,
            [("lost", f"✗ {lost}", {"reason": lost, **fields})],
            going_on,
        )
    if stopping is not None:
        _next(status, going_on)
        return Verdict(
            "stopped",
            policy.Finish(),
            WorkerState.STOPPED,
            stopping,
            [
                (
                    "run-ended",
                    f"■ run {run} ended with {ended.code} (stopped)",
                    {"exit_code": ended.code, "outcome": "stopped", **fields},
                )
            ],
            going_on,
        )
    if stopped_by_watchdog(ended) and not restart_requested:
        # Its lease was not renewed (its machine was away, its supervisor killed): not the
        # task's failure; the next run goes on as after an interruption, not counted.
        step = agents.plan_next(
            kind,
            agents.Verdict(agents.Outcome.CRASHED, "interrupted"),
            new_milestones=bool(new_milestones),
            session_id=session_id,
        )
        _next(status, step)
        decision: Decision = policy.Resume() if new_milestones else policy.Restart(0.0)
        state = WorkerState.RESUMING if new_milestones else WorkerState.BACKOFF
        return Verdict(
            "watchdog",
            decision,
            state,
            "stopped by its watchdog",
            [
                (
                    "restarting",
                    f"↻ run {run} was stopped by its watchdog ({ended.reason}): the next "
                    "run starts at once, not counted as a crash",
                    {"exit_code": ended.code, "outcome": "watchdog", **fields},
                )
            ],
            step,
        )
    if restart_requested:
        decision = policy.Resume() if new_milestones else policy.Restart(0.0)
        state = WorkerState.RESUMING if new_milestones else WorkerState.BACKOFF
        step = NextStep(None, NEW_SESSION, "resume" if new_milestones else "auto")
        _next(status, step)
        return Verdict(
            "restarted",
            decision,
            state,
            "restart requested",
            [
                (
                    "restarting",
                    f"↻ run {run} restarted on request: the next run starts at once in its slot",
                    {"outcome": "restarted", **fields},
                )
            ],
            step,
        )
    if stalled:
        said = agents.Verdict(agents.Outcome.CRASHED, stalled)
    step = agents.plan_next(kind, said, new_milestones=bool(new_milestones), session_id=session_id)
    _next(status, step)
    outcome = "stalled" if stalled else said.outcome.value
    if new_milestones and said.outcome is not agents.Outcome.USAGE_LIMITED:
        outcome = "milestone"
    fields.update(exit_code=ended.code, outcome=outcome)
    if step.give_up is not None:
        reason = step.give_up
        return Verdict(
            outcome,
            policy.GiveUp(reason),
            WorkerState.FAILED,
            reason,
            [
                ("run-ended", f"✗ run {run} ended: {reason}", {**fields, "reason": reason}),
                ("gave-up", f"✗ giving up: {reason}", {"reason": reason}),
            ],
            step,
        )
    if step.restart_now:
        line = said.line or said.reason
        return Verdict(
            outcome,
            policy.Restart(0.0),
            WorkerState.BACKOFF,
            line,
            [
                (
                    "resume-refused",
                    f"↻ run {run}: the agent refused to resume its session "
                    f"({line}); starting a fresh session with the continue prompt",
                    {**fields, "agent_line": line},
                )
            ],
            step,
        )
    assert step.outcome is not None
    decided, status.history = policy.decide(
        rules,
        status.history,
        step.outcome,
        now=now,
        rand=rand,
        reset_at=step.reset_at,
    )
    reason = decided.reason if isinstance(decided, policy.GiveUp) else ""
    lines: list[Line] = []
    if step.outcome is policy.Outcome.MILESTONE:
        status.milestones += 1
        lines.append(
            (
                "milestone",
                f"⚑ run {run} left milestone {', '.join(new_milestones)}: resuming in its slot",
                {"milestones": new_milestones, **fields},
            )
        )
    elif step.outcome is policy.Outcome.USAGE_LIMIT:
        status.usage_pauses += 1
        window = f" ({said.window})" if said.window else ""
        reason = reason or f"usage limit{window}"
        if isinstance(decided, policy.Pause):
            wait = max(0.0, decided.until - now)
            decided = policy.Pause(decided.until + min(MAX_JITTER, JITTER_SHARE * wait) * rand)
            reason = f"{reason} until {clock(decided.until)}"
        until = decided.until if isinstance(decided, policy.Pause) else now
        lines.append(
            (
                "usage-limit",
                f"⏸ usage limit reached{window}: pausing until "
                f"{clock(until)} (its slot goes to others meanwhile)",
                {
                    "agent_line": said.line,
                    "reset_at": said.reset_at,
                    "until": until,
                    "window": said.window,
                    **fields,
                },
            )
        )
    elif step.outcome is policy.Outcome.CRASH:
        status.crashes += 1
        status.last_crash_run = run
        detail = ended.reason or said.reason
        reason = reason or detail
        what = {"stalled": "stalled", "rate-limited": "hit a rate limit"}.get(outcome, "crashed")
        message = f"✗ run {run} {what} ({detail})"
        if isinstance(decided, policy.Restart):
            how = "resuming its session" if step.session.resume else "restarting"
            message += f"; {how} in {decided.delay:.1f}s"
            if not policy.keeps_slot(decided):
                message += " (its slot goes to others meanwhile)"
            fields["backoff"] = round(decided.delay, 3)
        lines.append(("crashed", message, fields))
    elif kind.resumes:
        lines.append(("run-ended", f"■ run {run} finished: {_short(said.reason)}", fields))
    else:
        lines.append(("run-ended", f"■ run {run} exited 0 with no new milestone", fields))
    if isinstance(decided, policy.GiveUp):
        lines.append(("gave-up", f"✗ giving up: {decided.reason}", {"reason": decided.reason}))
    elif isinstance(decided, policy.Finish):
        lines.append(("done", f"✓ done after {run} run(s)", {}))
    return Verdict(outcome, decided, _STATE_OF[type(decided)], reason, lines, step)


def _next(status: WorkerStatus, step: NextStep) -> None:
    """Remember how the task's next run starts (the ledger keeps it: a later ``up`` too)."""
    status.next_resume, status.next_prompt = step.session.resume, step.prompt


def _short(text: str, width: int = 100) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def when(epoch: float) -> str:
    """A reset time as people read it: the time, and the date when it is not today."""
    if time.strftime("%Y-%m-%d", time.localtime(epoch)) == time.strftime("%Y-%m-%d"):
        return clock(epoch)
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def usage_wait_too_long(machine: str, until: float, limit: float) -> str:
    """Why new runs close when a usage hold outlasts ``max_usage_wait`` (a seven-day window,
    monthly credit): the fleet ends (exit 5) instead of sleeping for days, and says when it
    could go on."""
    return (
        f"usage limit on {machine} until {when(until)}, longer than max_usage_wait "
        f"({limit:g}s): the fleet can go on after {when(until)}"
    )


def clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))
