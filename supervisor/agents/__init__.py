"""Agent kinds: the CLIs the fleet runs, as far as starting, reading and judging them goes.

``[agent] kind`` picks one of :data:`KINDS`: ``command`` (any program; today's rules),
``claude`` (Claude Code ``-p``), ``codex`` (``codex exec``), ``gemini`` (Gemini CLI headless).
See :mod:`supervisor.agents.base` for the interface and why it exists, one module per kind for
what each CLI's documentation and issue threads say, :mod:`.render` for the readable live
view and :mod:`.trust` for worktree trust.

:func:`plan_next` is the seam to the restart policy: it combines a run's :class:`Verdict`
with what the worker found in the worktree (a new milestone file) into what the policy is
told and how the next run starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from supervisor import policy
from supervisor.agents.base import (
    NEW_SESSION,
    AgentKind,
    AgentKindError,
    Launch,
    ManagedFlagError,
    Outcome,
    RunFacts,
    RunReader,
    Session,
    UnknownKindError,
    Verdict,
)
from supervisor.agents.claude import ClaudeKind
from supervisor.agents.codex import CodexKind
from supervisor.agents.command import CommandKind
from supervisor.agents.gemini import GeminiKind

__all__ = [
    "KINDS",
    "NEW_SESSION",
    "AgentKind",
    "AgentKindError",
    "Launch",
    "ManagedFlagError",
    "NextStep",
    "Outcome",
    "PromptKind",
    "RunFacts",
    "RunReader",
    "Session",
    "UnknownKindError",
    "Verdict",
    "get_kind",
    "plan_next",
    "prompt_kind",
]

KINDS: Mapping[str, AgentKind] = {
    kind.name: kind for kind in (CommandKind(), ClaudeKind(), CodexKind(), GeminiKind())
}


def get_kind(name: str) -> AgentKind:
    """The kind called ``name``; :class:`UnknownKindError` names the known ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise UnknownKindError(name, list(KINDS)) from None


PromptKind = Literal["first", "resume", "continue", "auto"]
_PROMPT_KINDS: tuple[PromptKind, ...] = ("first", "resume", "continue", "auto")


def prompt_kind(text: str | None) -> PromptKind:
    """A prompt kind as stored (the ledger); anything else -- nothing stored, an older
    ledger -- is ``auto``: the resume prompt if the worktree has a milestone, else the first."""
    return next((kind for kind in _PROMPT_KINDS if kind == text), "auto")


@dataclass(frozen=True)
class NextStep:
    """What follows a run, before the restart policy decides *when*.

    ``outcome`` is what :func:`supervisor.policy.decide` is told (``None``: do not ask it).
    ``give_up`` fails the task with that reason (a turn or budget limit).  ``restart_now``
    starts the next run at once without counting a crash (a refused resume: the fallback is a
    fresh session, which cannot be refused again).  ``session`` and ``prompt`` say how the
    next run starts: ``resume`` is ``agent.resume_prompt`` (Agentize's milestone hand-off),
    ``continue`` the prompt that tells a resumed or fresh session to go on with interrupted
    work, ``auto`` today's rule (the resume prompt if the worktree has a milestone, else the
    first prompt).
    """

    outcome: policy.Outcome | None
    session: Session = NEW_SESSION
    prompt: PromptKind = "auto"
    reset_at: float | None = None
    give_up: str | None = None
    restart_now: bool = False


def plan_next(
    kind: AgentKind,
    verdict: Verdict,
    *,
    new_milestones: bool,
    session_id: str | None,
) -> NextStep:
    """Combine a run's verdict with the milestones the worker found.

    A new milestone wins, as it always did: Agentize means by it "start a fresh session with
    the resume prompt", so the context is new -- whatever the verdict said, except a usage
    limit, which still holds the machine first (the hand-off happens after the hold).  A
    crash, a transient rate limit and a usage limit continue the same session where the kind
    can (``--resume``), so no work done is lost.
    """
    fresh = NEW_SESSION
    resume = Session(resume=session_id) if kind.resumes and session_id is not None else None
    outcome = verdict.outcome
    if new_milestones:
        if outcome is Outcome.USAGE_LIMITED:
            return NextStep(policy.Outcome.USAGE_LIMIT, fresh, "resume", verdict.reset_at)
        return NextStep(policy.Outcome.MILESTONE, fresh, "resume")
    if outcome is Outcome.DONE:
        return NextStep(policy.Outcome.DONE)
    if outcome is Outcome.FAILED:
        return NextStep(None, give_up=verdict.reason)
    if outcome is Outcome.RESUME_REFUSED:
        return NextStep(None, fresh, "continue", restart_now=True)
    policy_outcome = (
        policy.Outcome.USAGE_LIMIT if outcome is Outcome.USAGE_LIMITED else policy.Outcome.CRASH
    )
    if resume is not None:
        return NextStep(policy_outcome, resume, "continue", verdict.reset_at)
    # No session to go on with (kind ``command``, or a run that died before telling its id):
    # the fleet's rules before sessions -- after a crash the resume prompt if the worktree
    # has a milestone, else the first; after a usage pause the resume prompt.
    usage = policy_outcome is policy.Outcome.USAGE_LIMIT and not kind.resumes
    return NextStep(policy_outcome, fresh, "resume" if usage else "auto", verdict.reset_at)
