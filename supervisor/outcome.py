"""What follows a run: how it ended, what the restart policy decides, the task's next state and
the lines that say so -- pure (the caller passes the clock and the random number), so the rules
and their wording are tested without a process.

The wording is part of the rule: a message says what the fleet will do ("restarting in 0.7s"
only when the task keeps its slot through the backoff; otherwise that its slot goes to others
meanwhile), as :func:`supervisor.policy.keeps_slot` decides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from supervisor import policy
from supervisor.hosts.base import ExitStatus
from supervisor.ledger import TaskRecord
from supervisor.lifecycle import WorkerState
from supervisor.limits import LimitHit


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
        names = (
            "worker", "task", "title", "machine", "workspace", "pid", "start_ticks", "run_dir",
            "milestones", "crashes", "last_crash_run", "usage_pauses", "last_exit", "reason",
            "started_at", "ended_at", "run_started_at", "next_run_at", "milestones_before",
            "lease_path", "adopted_from",
        )
        row: dict[str, Any] = {name: getattr(self, name) for name in names}
        row.update(state=str(self.state), runs=self.run, wall_time=round(self.wall_time, 3))
        return row

    def to_record(self, prompt: str | None, pin: str | None, origin: str) -> TaskRecord:
        """The task as the ledger keeps it (``add``-ed ones are not listed by the config)."""
        return TaskRecord(
            issue=self.task, state=str(self.state), title=self.title, prompt=prompt, pin=pin,
            origin=origin, reason=self.reason, machine=self.machine, workspace=self.workspace,
            runs=self.run, milestones=self.milestones, crashes=self.crashes,
            last_crash_run=self.last_crash_run, usage_pauses=self.usage_pauses,
            last_exit=self.last_exit, history=policy.history_to_dict(self.history),
            listed=origin != "add", started_at=self.started_at, ended_at=self.ended_at,
        )

    def restore(self, record: TaskRecord, again: bool) -> str:
        """Carry the task's account over from the ledger: its run counter and counts always,
        its worktree (used while its machine is in the fleet), its policy memory only if it
        goes on.  Returns the prompt kind of its first run in this shift."""
        self.run, self.milestones, self.crashes = record.runs, record.milestones, record.crashes
        self.last_crash_run, self.usage_pauses = record.last_crash_run, record.usage_pauses
        self.last_exit = record.last_exit
        self.machine, self.workspace = record.machine, record.workspace
        if record.state == WorkerState.DONE and not again:
            self.state, self.reason = WorkerState.DONE, f"done in shift {record.last_shift}"
            return "first"
        if not again and not WorkerState(record.state).final:
            self.history = policy.history_from_dict(record.history)
            return "auto"  # resume from a milestone if its worktree has one
        return "first"


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
    """What follows one run."""

    outcome: str
    decision: Decision
    state: WorkerState
    reason: str
    lines: list[Line]


_STATE_OF = {
    policy.Finish: WorkerState.DONE,
    policy.Resume: WorkerState.RESUMING,
    policy.Restart: WorkerState.BACKOFF,
    policy.Pause: WorkerState.PAUSED,
    policy.GiveUp: WorkerState.FAILED,
}


def judge(
    status: WorkerStatus,
    rules: policy.RestartPolicy,
    ended: ExitStatus,
    new_milestones: list[str],
    hit: LimitHit | None,
    *,
    lost: str = "",
    stopping: str | None = None,
    restart_requested: bool = False,
    now: float,
    rand: float,
) -> Verdict:
    """The verdict on run ``status.run``; the task's counters and policy memory in ``status``
    move with it.  ``lost``: its machine stayed unreachable; ``stopping``: the fleet's stop
    reason; ``restart_requested``: ``agentize-fleet restart`` ended it."""
    run = status.run
    if lost:
        return Verdict("lost", MachineLost(lost), WorkerState.LOST, lost,
                       [("lost", f"✗ {lost}", {"reason": lost})])
    if stopping is not None:
        return Verdict("stopped", policy.Finish(), WorkerState.STOPPED, stopping, [(
            "run-ended", f"■ run {run} ended with {ended.code} (stopped)",
            {"exit_code": ended.code},
        )])
    watchdog = stopped_by_watchdog(ended)
    if restart_requested or watchdog:
        decision: Decision = policy.Resume() if new_milestones else policy.Restart(0.0)
        state = WorkerState.RESUMING if new_milestones else WorkerState.BACKOFF
        if watchdog:
            return Verdict("watchdog", decision, state, "stopped by its watchdog", [(
                "restarting", f"↻ run {run} was stopped by its watchdog ({ended.reason}): the "
                "next run starts at once, not counted as a crash", {"exit_code": ended.code},
            )])
        return Verdict("restarted", decision, state, "restart requested", [(
            "restarting", f"↻ run {run} restarted on request: the next run starts at once in "
            "its slot", {},
        )])
    if new_milestones:
        outcome = policy.Outcome.MILESTONE
    elif hit is not None and hit.kind == "usage":
        outcome = policy.Outcome.USAGE_LIMIT
    elif ended.ok:
        outcome = policy.Outcome.DONE
    else:
        outcome = policy.Outcome.CRASH
    decided, status.history = policy.decide(
        rules, status.history, outcome, now=now, rand=rand,
        reset_at=hit.reset_at if hit is not None else None,
    )
    reason = decided.reason if isinstance(decided, policy.GiveUp) else ""
    lines: list[Line] = []
    if outcome is policy.Outcome.MILESTONE:
        status.milestones += 1
        lines.append(("milestone", f"⚑ run {run} left milestone {', '.join(new_milestones)}: "
                      "resuming in its slot",
                      {"milestones": new_milestones, "exit_code": ended.code}))
    elif outcome is policy.Outcome.USAGE_LIMIT:
        assert hit is not None
        status.usage_pauses += 1
        reason = reason or "usage limit"
        until = decided.until if isinstance(decided, policy.Pause) else now
        lines.append(("usage-limit", f"⏸ usage limit reached: pausing until {clock(until)} "
                      "(its slot goes to others meanwhile)",
                      {"line": hit.line, "reset_at": hit.reset_at, "exit_code": ended.code}))
    elif outcome is policy.Outcome.CRASH:
        status.crashes += 1
        status.last_crash_run = run
        detail = ended.reason or f"exit {'lost' if ended.lost else ended.code}"
        reason = reason or detail
        message = f"✗ run {run} crashed ({detail})"
        fields: dict[str, Any] = {"exit_code": ended.code}
        if isinstance(decided, policy.Restart):
            message += f"; restarting in {decided.delay:.1f}s"
            if not policy.keeps_slot(decided):
                message += " (its slot goes to others meanwhile)"
            fields["backoff"] = round(decided.delay, 3)
        lines.append(("crashed", message, fields))
    else:
        lines.append(("run-ended", f"■ run {run} exited 0 with no new milestone",
                      {"exit_code": ended.code}))
    if isinstance(decided, policy.GiveUp):
        lines.append(("gave-up", f"✗ giving up: {decided.reason}", {"reason": decided.reason}))
    elif isinstance(decided, policy.Finish):
        lines.append(("done", f"✓ done after {run} run(s)", {}))
    return Verdict(outcome.value, decided, _STATE_OF[type(decided)], reason, lines)


def clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))
