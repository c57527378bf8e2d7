"""The one interface every agent kind implements, and the machinery the stream kinds share.

Why this exists: the fleet used to treat an agent as an opaque process that prints text and
exits.  The CLIs our users run have a documented machine interface instead -- a session id to
resume, a final ``result`` event, typed rate-limit events, cost and tokens -- and reading it is
what lets the fleet resume a crashed session instead of starting over, wait out a usage limit,
tell an API error reported with exit 0 from a finished task, and say what a task cost.

A *kind* (``command``, ``claude``, ``codex``, ``gemini``) knows three things about its CLI:

* how to start it: :meth:`AgentKind.launch` turns the user's ``command`` (program path and
  their own flags) plus a prompt and a session plan into an argument list, adding exactly the
  flags its protocol needs -- and :meth:`AgentKind.check_command` refuses a ``command`` that
  already holds one of those flags, naming it (:class:`ManagedFlagError`);
* how to read it: a :class:`RunReader` is fed the run's output in blocks of complete lines (as
  the worker's pump gets them) and collects the run's :class:`RunFacts`; a malformed line never
  raises -- it stays raw output;
* how to judge it: :meth:`RunReader.verdict` gives the honest :class:`Verdict` of the run from
  its facts and its exit status alone.  Milestones are *not* part of the verdict: the worker
  finds them in the worktree and :func:`supervisor.agents.plan_next` combines the two.

Everything in this package is pure: no I/O and no clock.  Times (``now``) are passed in.

The stream kinds (:mod:`.claude`, :mod:`.codex`, :mod:`.gemini`) are one mechanism with three
parameter sets (:mod:`.stream`); a kind module only says what its events mean.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any, ClassVar, Literal

from supervisor.limits import LimitDetector, parse_reset_time

__all__ = [
    "NEW_SESSION",
    "AgentKind",
    "AgentKindError",
    "Event",
    "Launch",
    "ManagedFlagError",
    "Outcome",
    "RateLimitInfo",
    "ResultInfo",
    "RunFacts",
    "RunReader",
    "Session",
    "Stream",
    "Tokens",
    "UnknownKindError",
    "Verdict",
    "reset_time",
]

Stream = Literal["stdout", "stderr"]
Event = dict[str, Any]

#: At most this many error messages and rate-limit rejections are kept per run: a run that
#: loops on an error must not grow the supervisor's memory.
KEEP_ERRORS = 20
#: Texts longer than this are cut when kept as facts (a result text can be a whole essay).
KEEP_TEXT = 4000


def _cut(text: str) -> str:
    return text if len(text) <= KEEP_TEXT else text[: KEEP_TEXT - 1] + "…"


# -- errors ------------------------------------------------------------------------------------


class AgentKindError(ValueError):
    """A kind cannot be used as configured; the message says what to change."""


class UnknownKindError(AgentKindError):
    """``[agent] kind`` names no kind this version knows."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown agent kind {name!r}; known: {', '.join(known)}")
        self.name = name


class ManagedFlagError(AgentKindError):
    """The user's ``command`` holds a flag the kind adds itself (twice would conflict)."""

    def __init__(self, kind: str, flag: str, why: str = "") -> None:
        if flag == "{prompt}":
            what = f"kind {kind!r} passes the prompt itself (first_prompt, resume_prompt)"
        else:
            what = f"which kind {kind!r} adds itself" + (f" ({why})" if why else "")
        super().__init__(f"command contains {flag!r}, {what}; remove it from agent.command")
        self.kind = kind
        self.flag = flag


# -- what a run is asked to do, and how it is started --------------------------------------------


@dataclass(frozen=True)
class Session:
    """How a run relates to the agent's sessions.

    ``resume``: continue that session (same machine, same worktree: the CLIs look sessions up
    by working directory).  ``new_id``: pin a new session's id where the CLI allows it (Claude
    Code's ``--session-id``), so the id is known before the first byte of output and a run
    killed before its ``init`` event can still be resumed.  Neither: a new session whose id
    the run's output will tell.
    """

    resume: str | None = None
    new_id: str | None = None


#: A run that starts a new session whose id the run will tell.
NEW_SESSION = Session()


@dataclass(frozen=True)
class Launch:
    """What the worker starts: the argument list, extra environment, what it expects."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    session_id: str | None = None  # known before the start: pinned or resumed
    resuming: bool = False


# -- what a run said ---------------------------------------------------------------------------


@dataclass
class Tokens:
    """Token counts as the CLI reports them (``None``: it did not say)."""

    input: int | None = None
    output: int | None = None
    cache_read: int | None = None
    cache_creation: int | None = None

    def add(self, **counts: object) -> None:
        """Add the integer counts among ``counts`` (other values are ignored, never raised)."""
        for name, value in counts.items():
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                current = getattr(self, name)
                setattr(self, name, value + (current or 0))

    def as_dict(self) -> dict[str, int | None]:
        return {
            "input": self.input,
            "output": self.output,
            "cache_read": self.cache_read,
            "cache_creation": self.cache_creation,
        }


@dataclass(frozen=True)
class ResultInfo:
    """The run's final event (Claude ``result``, Codex last turn, Gemini ``result``).

    ``ok`` is the CLI's claim of success *after* the kind has looked at every field that can
    contradict it (``is_error`` beside ``subtype: "success"``).  ``limit`` names a turn or
    budget limit that ended the run (not retryable as is).  ``api_status`` is the HTTP status
    of an API error when the event gives one.
    """

    ok: bool
    subtype: str
    text: str = ""
    limit: str | None = None
    api_status: int | None = None


@dataclass(frozen=True)
class RateLimitInfo:
    """One rate-limit report: Claude's ``rate_limit_event`` (``status`` allowed |
    allowed_warning | rejected, ``resetsAt`` epoch seconds, ``rateLimitType`` five_hour |
    seven_day | overage | ...)."""

    status: str
    resets_at: float | None
    window: str | None
    line: str


@dataclass
class RunFacts:
    """Everything a run told about itself, as far as the fleet cares.

    Filled by a :class:`RunReader` while the run prints; read by the verdict, the ledger (one
    row per run: :meth:`summary`) and the report.
    """

    session_id: str | None = None
    model: str | None = None
    result: ResultInfo | None = None
    cost_usd: float | None = None
    tokens: Tokens = field(default_factory=Tokens)
    turns: int | None = None
    duration_ms: int | None = None
    rate_limits: dict[str, RateLimitInfo] = field(default_factory=dict)  # latest per window
    rejections: list[RateLimitInfo] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    resume_refused: str | None = None  # the line that refused the resume
    last_text: str | None = None  # the agent's last words (assistant text)
    text_open: bool = False  # last_text is a message still arriving in chunks (Gemini deltas)
    compactions: int = 0
    events: int = 0
    malformed: int = 0

    def note_error(self, message: str) -> None:
        if message and len(self.errors) < KEEP_ERRORS:
            self.errors.append(_cut(message))

    def note_rate_limit(self, info: RateLimitInfo) -> None:
        self.rate_limits[info.window or "?"] = info
        if info.status == "rejected" and len(self.rejections) < KEEP_ERRORS:
            self.rejections.append(info)

    def summary(self) -> dict[str, Any]:
        """The facts a ledger row and the report keep of a run (JSON-ready)."""
        result = self.result
        return {
            "session_id": self.session_id,
            "model": self.model,
            "cost_usd": self.cost_usd,
            "tokens": self.tokens.as_dict(),
            "turns": self.turns,
            "duration_ms": self.duration_ms,
            "result": None
            if result is None
            else {"ok": result.ok, "subtype": result.subtype, "text": result.text},
            "last_text": self.last_text,
            "errors": list(self.errors),
            "compactions": self.compactions,
            "malformed": self.malformed,
        }


# -- the verdict -------------------------------------------------------------------------------


class Outcome(enum.Enum):
    """How a run ended, honestly: from its events and its exit status, never one signal alone."""

    DONE = "done"  # the agent says it finished, and nothing contradicts it
    CRASHED = "crashed"  # ended early: resume the session after a backoff
    USAGE_LIMITED = "usage-limited"  # the account's quota: hold until the reset, then resume
    RATE_LIMITED = "rate-limited"  # transient (429, 529, overloaded): resume after a backoff
    FAILED = "failed"  # a turn/budget limit or a refusal retrying cannot fix: give up
    RESUME_REFUSED = "resume-refused"  # the CLI has no such session here: start fresh


@dataclass(frozen=True)
class Verdict:
    """A run's outcome with its reason; for limits, when they reset and which window."""

    outcome: Outcome
    reason: str
    reset_at: float | None = None
    window: str | None = None
    line: str | None = None  # the agent line that decided it (kept in the log record)


# -- reset times -------------------------------------------------------------------------------

_IN_RE = re.compile(
    r"\btry again in\s+"
    r"((?:\d+\s*(?:days?|hours?|hrs?|minutes?|mins?|seconds?|secs?)[\s,]*(?:and\s+)?)+)",
    re.IGNORECASE,
)
_IN_PART_RE = re.compile(r"(\d+)\s*(d|h|m|s)", re.IGNORECASE)
_IN_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_AGAIN_RE = re.compile(r"\b(?:try again|access resets)\s+(?:at|after|on)\s+", re.IGNORECASE)
_YEAR_RE = re.compile(r"(\b\d{1,2}(?:st|nd|rd|th)?),?\s+\d{4}\b", re.IGNORECASE)
_GMT_RE = re.compile(r"\s*\b(?:GMT|UTC)\s*([+-])\s*(\d{1,2})\b")
_UTC_RE = re.compile(r"(\d\s*[ap]\.?\s?m\.?)\s+(?:UTC|GMT)\b", re.IGNORECASE)


def reset_time(text: str, now: float, tz: tzinfo | None = None) -> float | None:
    """When a limit message says the limit resets, as epoch seconds; ``None`` if it does not.

    On top of :func:`supervisor.limits.parse_reset_time` (Claude Code's wordings) this reads
    Codex's ``try again in 2 days 3 hours 5 minutes`` / ``try again at 12:16 PM`` / ``try again
    at Jul 5th, 2026 8:19 PM`` / ``try again after July 3, 2026 at 2:45 PM``
    (openai/codex#3899, #26668, #30206) and Gemini's ``Access resets at 10:57 PM GMT-3``
    (google-gemini/gemini-cli#22643).
    """
    relative = _IN_RE.search(text)
    if relative:
        seconds = sum(
            int(n) * _IN_UNITS[unit.lower()] for n, unit in _IN_PART_RE.findall(relative.group(1))
        )
        return now + seconds
    # "GMT-3" is the zone Etc/GMT+3 (POSIX signs are inverted); "10:57 PM UTC" -> "(UTC)".
    text = _GMT_RE.sub(
        lambda m: f" (Etc/GMT{'+' if m.group(1) == '-' else '-'}{int(m.group(2))})", text
    )
    text = _UTC_RE.sub(r"\1 (UTC)", text)
    found = parse_reset_time(text, now, tz)
    if found is not None or not _AGAIN_RE.search(text):
        return found
    return parse_reset_time(_YEAR_RE.sub(r"\1", _AGAIN_RE.sub("resets ", text)), now, tz)


# -- the interface -----------------------------------------------------------------------------


class RunReader(ABC):
    """Reads one run's output and judges the run.  Never raises for what the agent printed."""

    facts: RunFacts

    @abstractmethod
    def feed(self, stream: Stream, block: bytes) -> None:
        """Take a block of complete lines of ``stream`` (joined by ``b"\\n"``, without the
        last newline), exactly as the worker's pump hands them to the log."""

    @abstractmethod
    def verdict(self, exit_code: int | None, now: float) -> Verdict:
        """The run's outcome from what was fed and its exit status (``None``: unknown, the
        run was lost).  ``now`` anchors relative reset times."""


class AgentKind(ABC):
    """One agent CLI: how to start it, read it and judge it (see the module docstring)."""

    name: ClassVar[str]
    #: ``agent.command`` when the config gives none.
    default_command: ClassVar[tuple[str, ...]]
    #: Flags (and subcommands) the kind adds; the user's ``command`` must not hold them.
    managed_flags: ClassVar[Mapping[str, str]] = {}
    #: Whether a crashed run can be continued in the same session.
    resumes: ClassVar[bool] = False
    #: Whether a new session's id can be chosen by the fleet (``Session.new_id``).
    pins_session_ids: ClassVar[bool] = False
    #: Environment the kind adds to every run (the config's ``agent.env`` wins over it).
    env: ClassVar[Mapping[str, str]] = {}

    def check_command(self, command: Sequence[str]) -> None:
        """Raise :class:`ManagedFlagError` naming the first flag of ``command`` (the program
        excluded) that this kind adds itself."""
        for arg in command[1:]:
            name = arg.split("=", 1)[0] if arg.startswith("--") else arg
            if name in self.managed_flags:
                raise ManagedFlagError(self.name, name, self.managed_flags[name])
            if self.managed_flags and "{prompt}" in arg:
                raise ManagedFlagError(self.name, "{prompt}")

    def launch(
        self,
        command: Sequence[str],
        prompt: str,
        session: Session = NEW_SESSION,
        *,
        git_dir: str | None = None,
    ) -> Launch:
        """How to start one run.  ``command`` is the user's list with its placeholders
        already filled; ``git_dir`` is the worktree's git common directory (the bare clone),
        which a sandboxed agent must be able to write to commit."""
        resuming = session.resume is not None and self.resumes
        pinned = session.new_id if self.pins_session_ids else None
        return Launch(
            argv=self.argv(command, prompt, session, git_dir),
            env=dict(self.env),
            session_id=session.resume if resuming else pinned,
            resuming=resuming,
        )

    @abstractmethod
    def argv(
        self, command: Sequence[str], prompt: str, session: Session, git_dir: str | None
    ) -> list[str]:
        """The argument list: the user's ``command`` plus what the protocol needs."""

    def reader(
        self,
        launch: Launch,
        detector: LimitDetector | None = None,
        tz: tzinfo | None = None,
    ) -> RunReader:
        """A fresh reader for the run started from ``launch``.  ``detector`` carries the
        configured limit patterns (default: the built-in ones); ``tz`` is the zone of the
        machine the agent runs on (``None``: this machine's).  Each kind makes its own
        (:meth:`_reader`)."""
        return self._reader(launch, detector, tz)

    @abstractmethod
    def _reader(
        self, launch: Launch, detector: LimitDetector | None, tz: tzinfo | None
    ) -> RunReader:
        """This kind's reader (see :meth:`reader`)."""
