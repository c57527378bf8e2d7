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
parameter sets: a table of event handlers, patterns for limit texts and resume refusals, and a
few exit codes with a fixed meaning.  :class:`StreamReader` and :func:`judge` are that
mechanism; a kind module only says what its events mean.
"""

from __future__ import annotations

import enum
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any, ClassVar, Literal

from supervisor.limits import (
    LimitDetector,
    LimitHit,
    LimitPatterns,
    OutputTail,
    parse_reset_time,
    shared_detector,
)

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
    "StreamKind",
    "StreamReader",
    "Tokens",
    "UnknownKindError",
    "Verdict",
    "judge",
    "reset_time",
]

Stream = Literal["stdout", "stderr"]
Event = dict[str, Any]

#: At most this many error messages and rate-limit rejections are kept per run: a run that
#: loops on an error must not grow the supervisor's memory.
KEEP_ERRORS = 20
#: A line that does not parse is joined with the lines after it while the whole stays below
#: this size: the worker's line splitter cuts lines longer than ``max_line_bytes`` into pieces,
#: and a cut ``result`` event is still the run's result.
MAX_JOINED_LINE = 8 * 1024 * 1024
#: Texts longer than this are cut when kept as facts (a result text can be a whole essay).
KEEP_TEXT = 4000


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
        super().__init__(
            f"command contains {flag!r}, {what}; remove it from agent.command"
        )
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

    @abstractmethod
    def reader(
        self,
        launch: Launch,
        detector: LimitDetector | None = None,
        tz: tzinfo | None = None,
    ) -> RunReader:
        """A fresh reader for the run started from ``launch``.  ``detector`` carries the
        configured limit patterns (default: the built-in ones); ``tz`` is the zone of the
        machine the agent runs on (``None``: this machine's)."""


# -- the stream kinds' shared machinery --------------------------------------------------------

Handler = Callable[[RunFacts, Event, str], None]


@dataclass(frozen=True)
class StreamRules:
    """What one stream-JSON protocol's lines mean: the parameters of :class:`StreamReader`.

    ``handlers`` maps an event's ``type`` to a function that records its facts (called with
    the facts, the event and the raw line).  ``salvage`` lists byte strings that start a
    complete event inside a malformed line (Claude splices ``rate_limit_event`` into other
    lines, anthropics/claude-code#49640).  ``resume_refused`` matches the CLI's "no such
    session" wording; ``usage``/``rate`` add limit wordings of this CLI to the configured
    ones.  ``exit_codes`` are exit statuses with a documented meaning of their own.
    """

    handlers: Mapping[str, Handler]
    resume_refused: re.Pattern[str]
    usage: tuple[str, ...] = ()
    rate: tuple[str, ...] = ()
    salvage: tuple[bytes, ...] = ()
    exit_codes: Mapping[int, tuple[Outcome, str]] = field(default_factory=dict)


class StreamReader(RunReader):
    """Reads a stream-JSON run: every stdout line that is a JSON object goes to the kind's
    handler for its ``type``; everything else (and all of stderr) is raw output, of which the
    last 64 KiB per stream are kept for the limit texts and the resume refusal a CLI prints
    as plain text."""

    def __init__(
        self,
        rules: StreamRules,
        launch: Launch,
        detector: LimitDetector | None = None,
        tz: tzinfo | None = None,
    ) -> None:
        self.rules = rules
        self.launch = launch
        self.facts = RunFacts(session_id=launch.session_id)
        self._detector = detector or shared_detector(LimitPatterns())
        self._own = (
            shared_detector(LimitPatterns(usage=rules.usage, rate=rules.rate))
            if rules.usage or rules.rate
            else None
        )
        self._tz = tz
        self._raw = OutputTail()
        self._stderr = OutputTail()
        self._pending: list[bytes] = []  # pieces of a line that does not parse (yet)
        self._pending_size = 0

    # feeding ---------------------------------------------------------------------------------

    def feed(self, stream: Stream, block: bytes) -> None:
        if stream == "stderr":
            self._stderr.add(block)
            self._check_refusal(block)
            return
        for line in block.split(b"\n"):
            self._line(line)

    def _line(self, line: bytes) -> None:
        if self._pending:
            if line.endswith(b"}"):
                joined = b"".join(self._pending) + line
                event = _parse(joined)
                if event is not None:
                    self._pending, self._pending_size = [], 0
                    self._dispatch(event, joined)
                    return
            if line.startswith(b'{"') or self._pending_size + len(line) > MAX_JOINED_LINE:
                self._give_up_pending()
            else:
                self._pending.append(line)
                self._pending_size += len(line)
                return
        if not line.startswith(b"{"):
            if line.strip():
                self._raw.add(line)
                self._check_refusal(line)
            return
        event = _parse(line)
        if event is None:
            self._pending, self._pending_size = [line], len(line)
            return
        self._dispatch(event, line)

    def _give_up_pending(self) -> None:
        """Lines that never became JSON are raw output -- but an event spliced into them
        still counts (anthropics/claude-code#49640)."""
        pieces, self._pending, self._pending_size = self._pending, [], 0
        self.facts.malformed += 1
        text = b"\n".join(pieces)
        self._raw.add(text)
        self._check_refusal(text)
        joined = b"".join(pieces)
        for marker in self.rules.salvage:
            at = joined.find(marker)
            while at >= 0:
                event = _decode_prefix(joined[at:])
                if event is not None:
                    self._dispatch(event, joined[at : at + KEEP_TEXT])
                at = joined.find(marker, at + 1)

    def _dispatch(self, event: Any, raw: bytes) -> None:
        if not isinstance(event, dict):
            self._raw.add(raw)
            return
        self.facts.events += 1
        handler = self.rules.handlers.get(str(event.get("type")))
        if handler is None:
            return
        try:
            handler(self.facts, event, raw.decode("utf-8", "replace"))
        except (TypeError, ValueError, AttributeError, KeyError, IndexError):
            # An event of an unexpected shape is the CLI's business, never the fleet's crash.
            self.facts.malformed += 1

    def _check_refusal(self, data: bytes) -> None:
        if self.facts.resume_refused is not None or not self.launch.resuming:
            return
        text = data.decode("utf-8", "replace")
        found = self.rules.resume_refused.search(text)
        if found:
            start = text.rfind("\n", 0, found.start()) + 1
            end = text.find("\n", found.end())
            self.facts.resume_refused = text[start : end if end >= 0 else len(text)].strip()

    # judging ---------------------------------------------------------------------------------

    def verdict(self, exit_code: int | None, now: float) -> Verdict:
        if self._pending:
            self._give_up_pending()
        texts = list(self.facts.errors)
        result = self.facts.result
        if result is not None and not result.ok and result.text not in texts:
            texts.append(result.text)
        for text in texts:
            self._check_refusal(text.encode())
        return judge(self.rules, self.facts, exit_code, now, self._limit_hits(texts, now))

    def _limit_hits(self, texts: Sequence[str], now: float) -> list[LimitHit]:
        """Usage and rate hits in the texts a limit can come as: error events, the error
        result, and the last lines of stderr and of raw stdout.  The agent's own messages and
        tool output are never searched (an agent editing limits.py would pause the fleet)."""
        hits: list[LimitHit] = []
        detectors = [d for d in (self._detector, self._own) if d is not None]
        for text in (*texts, self._stderr.text(), self._raw.text()):
            if not text:
                continue
            lines = text.split("\n")
            for detector in detectors:
                hit = detector.feed_batch(lines, now, text)
                if hit is not None:
                    if hit.kind == "usage":  # with the wordings limits.py does not read
                        reset = reset_time(hit.line, now, self._tz)
                        hit = LimitHit("usage", reset or hit.reset_at, hit.line)
                    hits.append(hit)
        return hits


def judge(
    rules: StreamRules,
    facts: RunFacts,
    exit_code: int | None,
    now: float,
    hits: Sequence[LimitHit] = (),
) -> Verdict:
    """The honest verdict of a stream-JSON run, in this order:

    1. the CLI refused to resume the session (``No conversation found``): start fresh;
    2. a usage limit (a ``rejected`` rate-limit event, or a usage text in an error) -- unless
       the run ended with a clean success anyway: hold until the reset;
    3. an exit status the CLI documents (Gemini's 53 = turn limit, 41/42/52): as documented;
    4. the final event: a turn/budget limit fails the task; success counts only with exit 0
       (``subtype: "success"`` beside ``is_error: true`` was already made not-ok by the kind:
       anthropics/claude-code#79500); an error that is a rate limit or overload is transient;
    5. no final event at all: crashed (a usage limit can end that way too, caught in 2).
    """
    if facts.resume_refused is not None:
        return Verdict(Outcome.RESUME_REFUSED, facts.resume_refused, line=facts.resume_refused)
    result = facts.result
    clean = result is not None and result.ok and exit_code == 0
    usage = _usage(facts, hits)
    if usage is not None and not clean:
        return usage
    if exit_code is not None and exit_code in rules.exit_codes and not clean:
        outcome, reason = rules.exit_codes[exit_code]
        detail = f": {result.text}" if result is not None and result.text else ""
        return Verdict(outcome, f"{reason} (exit {exit_code}){detail}")
    rate = next((h for h in hits if h.kind == "rate"), None)
    if result is not None:
        if result.limit is not None:
            return Verdict(Outcome.FAILED, result.limit)
        if result.ok:
            if exit_code == 0:
                return Verdict(Outcome.DONE, result.text or "done")
            return Verdict(Outcome.CRASHED, f"{_exit(exit_code)} after a successful result")
        if rate is not None or result.api_status in (429, 529):
            why = rate.line if rate is not None else result.text
            return Verdict(Outcome.RATE_LIMITED, why or f"API error {result.api_status}",
                           line=why)
        return Verdict(Outcome.CRASHED, result.text or result.subtype)
    if rate is not None:
        return Verdict(Outcome.RATE_LIMITED, rate.line, line=rate.line)
    return Verdict(Outcome.CRASHED, f"no result event ({_exit(exit_code)})")


def _usage(facts: RunFacts, hits: Sequence[LimitHit]) -> Verdict | None:
    # A rejection counts while it is its window's latest report (not superseded by "allowed").
    current = [r for r in facts.rejections if facts.rate_limits.get(r.window or "?") is r]
    if current:
        last = current[-1]
        window = f" ({last.window})" if last.window else ""
        return Verdict(
            Outcome.USAGE_LIMITED,
            f"usage limit reached{window}",
            reset_at=last.resets_at,
            window=last.window,
            line=last.line,
        )
    hit = next((h for h in hits if h.kind == "usage"), None)
    if hit is None:
        return None
    return Verdict(Outcome.USAGE_LIMITED, hit.line, reset_at=hit.reset_at, line=hit.line)


def _exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code > 128:
        return f"exit {code}, killed by signal {code - 128}"
    return f"exit {code}"


def _parse(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None


_DECODER = json.JSONDecoder()


def _decode_prefix(data: bytes) -> Any:
    """The JSON object at the start of ``data`` (ignoring what follows it), or ``None``."""
    try:
        event, _ = _DECODER.raw_decode(data.decode("utf-8", "replace"))
    except ValueError:
        return None
    return event


def _cut(text: str) -> str:
    return text if len(text) <= KEEP_TEXT else text[: KEEP_TEXT - 1] + "…"


# -- helpers the kind modules share -------------------------------------------------------------


def text_of(value: object) -> str:
    """A string field's value, or "" for anything else (events are untrusted input)."""
    return value if isinstance(value, str) else ""


def int_of(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def number_of(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class StreamKind(AgentKind):
    """A kind that speaks stream-JSON: its reader is a :class:`StreamReader` with its rules."""

    rules: ClassVar[StreamRules]
    resumes: ClassVar[bool] = True

    def reader(
        self,
        launch: Launch,
        detector: LimitDetector | None = None,
        tz: tzinfo | None = None,
    ) -> RunReader:
        return StreamReader(self.rules, launch, detector, tz)
