"""What to do when a run ends: the restart policy, as a pure function of the run history.

Nothing here does I/O or reads a clock: the caller passes ``now`` and a random number, so every
decision can be tested exactly.  The rules, after Erlang/OTP supervisors and systemd:

* a run that leaves a **new milestone** is a hand-off, not a failure: resume at once with the
  resume prompt, up to ``max_milestones`` resumes per task;
* a run that exits 0 without a new milestone means the task is **done**;
* a run that hit its provider's **usage limit** pauses until the reset time it announced (or a
  default), up to ``max_usage_pauses`` times; it is not a crash;
* anything else is a **crash**: restart after an exponential backoff with full jitter
  (``random * min(backoff_max, backoff_base * 2**(k-1))`` for the k-th consecutive crash), unless
  more than ``max_crashes`` crashes fell within the last ``crash_window`` seconds, in which case
  the task is given up on (``failed``) and the fleet goes on without it.

Which decisions **keep the run's slot** (:func:`keeps_slot`), so that what the console says
("restarting in 0.7s") is what happens, rather than the task queueing behind every pending one:
a milestone resume keeps it; a crash restart keeps it through a backoff of up to
:data:`SLOT_KEPT_FOR` seconds (a longer one gives it to others meanwhile, and the restart waits
for a slot again); a restart on request is a restart after no delay, so it starts at once in the
slot its run had; a usage-limit pause gives it back (the machine takes no new runs anyway).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, replace
from typing import Any


class Outcome(enum.Enum):
    """How one run ended, as far as the policy cares."""

    DONE = "done"
    MILESTONE = "milestone"
    CRASH = "crash"
    USAGE_LIMIT = "usage-limit"


@dataclass(frozen=True)
class RestartPolicy:
    """Limits of the restart policy (see the module docstring)."""

    backoff_base: float = 2.0
    backoff_max: float = 300.0
    max_crashes: int = 3
    crash_window: float = 600.0
    max_milestones: int = 20
    max_usage_pauses: int = 5
    usage_pause_default: float = 900.0


@dataclass(frozen=True)
class History:
    """What the policy remembers of a task's runs."""

    crash_times: tuple[float, ...] = ()
    consecutive_crashes: int = 0
    milestones: int = 0
    usage_pauses: int = 0


def history_to_dict(history: History) -> dict[str, Any]:
    """The history as the ledger stores it (JSON)."""
    return asdict(history)


def history_from_dict(data: dict[str, Any]) -> History:
    """The history back from the ledger; unknown or missing keys fall back to the defaults."""
    return History(
        crash_times=tuple(float(t) for t in data.get("crash_times", ())),
        consecutive_crashes=int(data.get("consecutive_crashes", 0)),
        milestones=int(data.get("milestones", 0)),
        usage_pauses=int(data.get("usage_pauses", 0)),
    )


@dataclass(frozen=True)
class Finish:
    """The task is done."""


@dataclass(frozen=True)
class Resume:
    """Start the next run now, in the same workspace, with the resume prompt."""


@dataclass(frozen=True)
class Restart:
    """Start the next run after ``delay`` seconds (a crash restart)."""

    delay: float


@dataclass(frozen=True)
class Pause:
    """Wait until ``until`` (epoch seconds), then resume the task with the resume prompt."""

    until: float


@dataclass(frozen=True)
class GiveUp:
    """Stop trying: the task is ``failed``; ``reason`` says which limit was reached."""

    reason: str = field(default="")


Decision = Finish | Resume | Restart | Pause | GiveUp

#: A crash backoff up to this long keeps the task's slot (see the module docstring).
SLOT_KEPT_FOR = 30.0


def keeps_slot(decision: Decision) -> bool:
    """Whether the task keeps its slot while it waits for its next run."""
    if isinstance(decision, Resume):
        return True
    if isinstance(decision, Restart):
        return decision.delay <= SLOT_KEPT_FOR
    return False


def backoff_delay(policy: RestartPolicy, consecutive_crashes: int, rand: float) -> float:
    """Full-jitter exponential backoff for the ``consecutive_crashes``-th crash in a row."""
    exponent = max(0, consecutive_crashes - 1)
    ceiling = policy.backoff_max if exponent >= 64 else policy.backoff_base * (2.0**exponent)
    return max(0.0, min(1.0, rand)) * min(policy.backoff_max, ceiling)


def decide(
    policy: RestartPolicy,
    history: History,
    outcome: Outcome,
    *,
    now: float,
    rand: float,
    reset_at: float | None = None,
) -> tuple[Decision, History]:
    """Decide what follows a run that ended with ``outcome``; return the decision and new history.

    ``rand`` is a number in [0, 1) for the backoff jitter; ``reset_at`` is the reset time a
    usage-limit message announced, if any.
    """
    if outcome is Outcome.DONE:
        return Finish(), replace(history, consecutive_crashes=0)

    if outcome is Outcome.MILESTONE:
        milestones = history.milestones + 1
        after = replace(history, milestones=milestones, consecutive_crashes=0)
        if milestones > policy.max_milestones:
            return GiveUp(f"more than {policy.max_milestones} milestone resumes"), after
        return Resume(), after

    if outcome is Outcome.USAGE_LIMIT:
        pauses = history.usage_pauses + 1
        after = replace(history, usage_pauses=pauses)
        if pauses > policy.max_usage_pauses:
            return GiveUp(f"usage limit hit more than {policy.max_usage_pauses} times"), after
        until = (
            reset_at
            if reset_at is not None and reset_at > now
            else now + (policy.usage_pause_default)
        )
        return Pause(until), after

    recent = (*(t for t in history.crash_times if now - t <= policy.crash_window), now)
    consecutive = history.consecutive_crashes + 1
    after = replace(history, crash_times=recent, consecutive_crashes=consecutive)
    if len(recent) > policy.max_crashes:
        return (
            GiveUp(
                f"{len(recent)} crashes within {policy.crash_window:g}s "
                f"(limit {policy.max_crashes})"
            ),
            after,
        )
    return Restart(backoff_delay(policy, consecutive, rand)), after
