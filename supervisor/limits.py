"""Tell a provider's usage limit apart from a transient rate limit in an agent's output.

Why this exists: when a subscription's usage limit is reached, every run fails at once and
keeps failing until the limit resets, hours later.  Counting those runs as crashes would burn
the retry budget of every task and mark good tasks failed.  So the supervisor watches each
output line: a *usage* hit pauses new runs until the reset time (or a backoff when no reset time
is given) and the task is resumed afterwards, not charged a crash.  A *rate* hit (HTTP 429 from
the API, 529 overloaded, "server is temporarily limiting requests") is transient: the run is an
ordinary crash, retried with backoff.  When a run shows both, the usage hit should win.

Everything here is pure: no I/O, no clock.  ``now`` is passed in, so tests fix it.

Real wordings this module matches (quoted from public reports; check them when Claude Code
changes its messages, and add patterns through config rather than editing the defaults):

Usage limit (kind ``"usage"``)

* ``Claude AI usage limit reached|1762952400`` -- the machine-readable form, a Unix epoch after
  ``|``; issue titles of anthropics/claude-code#11429, #9046, #6119, #2087, #1328 and
  ``Claude AI usage limit reached|1760004000`` in the log of #8835
  (https://github.com/anthropics/claude-code/issues/8835).
* ``Claude usage limit reached. Your limit will reset at 5pm (Europe/Warsaw).``
  (https://github.com/anthropics/claude-code/issues/6119); ``... reset at 1pm (Etc/GMT+5).``
  (#2087); ``⎿  Claude usage limit reached. Your limit will reset at 9am (America/Chicago).``
  (#15064); ``Claude usage limit reached. Your limit will reset at 12am.``
  (https://github.com/aniketkarne/CCAutoRenew/issues/3).
* ``5-hour limit reached ∙ resets 1am`` (https://github.com/benbasha/Claude-Autopilot/issues/25);
  ``5-hour limit reached ∙ resets 5am`` (anthropics/claude-code#6392); ``... resets 9pm`` (#7892).
* ``Weekly limit reached · resets 10am (Asia/Seoul) · /upgrade to Max or turn on /extra-usage``
  (https://github.com/anthropics/claude-code/issues/12789).
* ``Limit reached · resets 11:30am (Asia/Calcutta) · /upgrade to Max or turn on /extra-usage``
  (https://github.com/anthropics/claude-code/issues/13632).
* ``You've hit your limit · resets 8pm (Africa/Cairo)`` (#43551);
  ``You've hit your limit · resets Jan 30, 11:30am (Asia/Calcutta)`` (#21562);
  ``You've hit your limit · resets Apr 23 at 4pm (America/Recife)`` (#51981);
  ``You've hit your session limit · resets 12:50am (America/Los_Angeles)`` (#74079);
  ``You've hit your session limit · resets 5:40pm (Europe/Berlin)`` followed by
  ``/login to switch to an API usage-billed account.`` (#79136);
  ``You've hit your weekly limit · resets Sep 15 at 7pm`` (#92834);
  ``You've hit your weekly limit · resets Jul 31, 2am (UTC)`` (#81647).
  Headless ``claude -p hello`` prints ``You've hit your limit · resets 1pm (Europe/Lisbon)`` and
  exits 1 (https://github.com/slopus/happy/issues/465).
* ``You’ve hit your limit for Claude messages. Limits will reset at 9:30 AM.`` (typographic
  apostrophe; claude.ai wording, reported in anthropics/claude-code#80062).
* ``You're out of extra usage · resets Feb 4, 8pm (Europe/Budapest)`` (#22603);
  ``You're out of extra usage · resets 9pm`` (https://github.com/frankbria/ralph-claude-code/issues/100).
* API-key spend limit: ``API Error: 400 {... "invalid_request_error","message":"You have reached
  your specified API usage limits. You will regain access on 2026-04-01 at 00:00 UTC."}``
  (https://github.com/anthropics/claude-code/issues/38035).
* Not a hit: ``Approaching usage limit resets at 2am`` is a warning
  (https://github.com/github/spec-kit/issues/693) and must not pause anything.

Rate limit / overload (kind ``"rate"``)

* ``API Error: 529 {"type":"error","error":{"type":"overloaded_error","message":"Overloaded.``
  (https://github.com/anthropics/claude-code/issues/39745);
  ``API Error: 529 Overloaded. This is a server-side issue, usually temporary — try again in a
  moment. If it persists, check https://status.claude.com/.`` (#87317, #72390).
* ``API Error (529 {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}})
  · Retrying in 4 seconds… (attempt 4/10)`` (#7218, #4064): Claude Code is retrying by itself;
  such ``Retrying in`` lines are *not* reported, only the final error is.
* ``API Error: Request rejected (429) · Rate limited`` (#48191);
  ``API Error: Request rejected (429) · Rate limited. Please try again later.`` (#69023);
  ``API Error: Request rejected (429) · This request would exceed your organization's rate limit
  of 10,000 input tokens per minute`` (anthropics/claude-code-security-review#96).
  (``Request rejected (429) · Usage credits are required for long context requests.``, #69520,
  also lands here although retrying will not help; the retry budget ends it.)
* ``API Error: Server is temporarily limiting requests (not your usage limit) · Rate limited``
  (#64905, #53531) -- says "usage limit" but is transient.
* ``API Error: Rate limit reached`` (#30723, #34413; in a ``-p`` result: #79500).
* ``Error: 429 {"type":"error","error":{"type":"rate_limit_error","message":"This request would
  exceed your account's rate limit. Please try again later."}}`` (error logs of #11429 and many
  others).

``--output-format stream-json`` (JSON lines)

* The final event of a failed run keeps ``subtype`` ``"success"``; only ``is_error`` tells:
  ``{"type":"result","subtype":"success","is_error":true,"api_error_status":429,
  "result":"You've hit your weekly limit · resets Jul 18, 12pm (UTC)", ...}``
  (https://github.com/vectorize-io/hindsight/issues/2702; also anthropics/claude-code#79500,
  where ``result`` is ``"API Error: Rate limit reached"``).
* Before it, a synthetic assistant event carries the same text with
  ``"is_api_error_message": true`` (comment on anthropics/claude-code#79500).
* Every turn emits ``{"type":"rate_limit_event","rate_limit_info":{"status":"allowed",
  "resetsAt":1784283600,"rateLimitType":"five_hour",...}}`` (#78476); when the limit is hit,
  ``"status":"rejected"`` with ``resetsAt`` in epoch seconds
  (https://github.com/paperclipai/paperclip/pull/5776).  ``"overageStatus":"rejected"`` with
  ``"status":"allowed"`` is informational only (#38673,
  https://github.com/alpha-omega-security/scrutineer/pull/551) and is not a hit.

JSON lines are read structurally and never searched as text: an agent's tool calls and file
contents travel in the same stream, and an agent editing this very module would otherwise pause
the fleet by printing the patterns above.
"""

from __future__ import annotations

import functools
import json
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "DEFAULT_KEYWORDS",
    "DEFAULT_RATE_PATTERNS",
    "DEFAULT_USAGE_PATTERNS",
    "PAST_GRACE_SECONDS",
    "LimitDetector",
    "LimitHit",
    "LimitPatterns",
    "OutputTail",
    "parse_reset_time",
    "shared_detector",
]

LimitKind = Literal["usage", "rate"]

#: Matched case-insensitively against one output line (or a stream-json error text).
DEFAULT_USAGE_PATTERNS: tuple[str, ...] = (
    # "Claude AI usage limit reached|<epoch>", "Claude usage limit reached. Your limit will ..."
    r"\bClaude(?: AI)? usage limit reached\b",
    # "5-hour limit reached ∙ resets 1am", "Weekly limit reached · resets 10am (Asia/Seoul)",
    # "Limit reached · resets 11:30am (Asia/Calcutta)"
    r"\blimit reached\s*[·∙•–-]\s*resets\b",
    # "You've hit your limit · ...", "You've hit your session limit", "... weekly limit",
    # "You’ve hit your limit for Claude messages."
    r"\bYou(?:'|’)ve hit your (?:[\w-]+ )?limit\b",
    # "You're out of extra usage · resets Feb 4, 8pm (Europe/Budapest)"
    r"\bYou(?:'|’)re out of extra usage\b",
    # API-key spend limit: "You have reached your specified API usage limits. You will regain ..."
    r"\bYou have reached your specified API usage limits?\b",
)

#: Transient: the run is a crash, retried with backoff.
DEFAULT_RATE_PATTERNS: tuple[str, ...] = (
    # "API Error: 529 Overloaded.", "API Error: 529 {...}", "API Error (529 {...})"
    r"\bAPI Error:? ?\(?(?:429|529)\b",
    # "API Error: Request rejected (429) · Rate limited"
    r"\bRequest rejected \(429\)",
    # "API Error: Rate limit reached"
    r"\bAPI Error: Rate limit reached\b",
    # "API Error: Server is temporarily limiting requests (not your usage limit) · Rate limited"
    r"\bServer is temporarily limiting requests\b",
    # Anthropic API error bodies
    r"\brate_limit_error\b",
    r"\boverloaded_error\b",
)

#: Every default pattern can only match a line holding one of these substrings.  Checked with
#: plain ``in`` before any regex runs, so ordinary lines cost a few substring scans.  Not bare
#: "429"/"529": numbers in ordinary output hold them all the time.
DEFAULT_KEYWORDS: tuple[str, ...] = (
    "imit",
    "IMIT",
    "API Error",
    "API ERROR",
    "api error",
    "ejected (429",
    "verload",
    "xtra usage",
)

#: A clock time without a date ("resets 3pm") that lies at most this far in the past is taken
#: as today's, just passed (the messages round to the minute or ten), not as tomorrow's: a wrong
#: "tomorrow" would idle the fleet for a day, a wrong "just now" costs one more limited attempt.
PAST_GRACE_SECONDS = 15 * 60

_RETRYING_MARKER = "Retrying in"


@dataclass(frozen=True)
class LimitHit:
    """One output line that says the provider refused work."""

    kind: LimitKind  # usage = pause until reset; rate = transient, retry with backoff
    reset_at: float | None  # epoch seconds when known
    line: str  # the line that matched


@dataclass(frozen=True)
class LimitPatterns:
    """Regex strings (case-insensitive) for the two kinds of hit, from config or the defaults.

    ``keywords`` is the cheap pre-filter: a line is only tried against the regexes when it holds
    one of these substrings.  ``None`` means: :data:`DEFAULT_KEYWORDS` when the patterns are the
    defaults, otherwise no keyword filter (one combined regex of all patterns is used instead, so
    a custom pattern can never be filtered out by mistake).  Lists from a config file are
    accepted and stored as tuples.
    """

    usage: tuple[str, ...] = DEFAULT_USAGE_PATTERNS
    rate: tuple[str, ...] = DEFAULT_RATE_PATTERNS
    keywords: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "usage", tuple(self.usage))
        object.__setattr__(self, "rate", tuple(self.rate))
        if self.keywords is not None:
            object.__setattr__(self, "keywords", tuple(self.keywords))


# What makes a stream-json line worth parsing (see ``_feed_json``).
_JSON_MARKERS = ('"rate_limit_event"', '"is_error"', '"is_api_error_message"')


def _compile(patterns: tuple[str, ...], kind: str) -> tuple[re.Pattern[str], ...]:
    compiled: list[re.Pattern[str]] = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise ValueError(f"invalid {kind} limit pattern {pattern!r}: {exc}") from exc
    return tuple(compiled)


@functools.lru_cache(maxsize=32)
def shared_detector(patterns: LimitPatterns, tz: tzinfo | None = None) -> LimitDetector:
    """One detector per set of patterns and time zone (it keeps no state between calls): a
    fleet of a thousand tasks compiles its patterns once per machine's zone, not once per task.
    ``tz`` is the zone of the machine the agent runs on (None: this machine's)."""
    return LimitDetector(patterns, tz=tz)


class OutputTail:
    """The last ``keep`` bytes (give or take the block at its start) of one output stream, in
    whole lines: what an agent said last, which is where it says that a limit stopped it."""

    def __init__(self, keep: int = 64 * 1024) -> None:
        self.keep = keep
        self._blocks: deque[bytes] = deque()
        self._size = 0

    def add(self, block: bytes) -> None:
        """Append a block of lines (joined by newlines, as :class:`~supervisor.lines.LineSplitter`
        gives them)."""
        self._blocks.append(block)
        self._size += len(block) + 1  # each with its joining newline: len(text()) + 1
        # Drop the oldest block while the others still say at least ``keep`` bytes.
        while len(self._blocks) > 1 and self._size - len(self._blocks[0]) - 2 >= self.keep:
            self._size -= len(self._blocks.popleft()) + 1

    def text(self) -> str:
        """The kept lines joined by newlines ("" when the stream said nothing)."""
        return b"\n".join(self._blocks).decode("utf-8", "replace")


class LimitDetector:
    """Feed it every output line of a run; it returns a :class:`LimitHit` for the lines that
    report a usage or rate limit and ``None`` for everything else.

    ``tz`` is the zone in which reset times without an explicit ``(Area/City)`` are meant: the
    zone of the machine the agent runs on.  ``None`` means this machine's local zone.
    """

    def __init__(self, patterns: LimitPatterns | None = None, *, tz: tzinfo | None = None) -> None:
        p = patterns if patterns is not None else LimitPatterns()
        self._usage = _compile(p.usage, "usage")
        self._rate = _compile(p.rate, "rate")
        self._tz = tz
        keywords = p.keywords
        if (
            keywords is None
            and p.usage == DEFAULT_USAGE_PATTERNS
            and p.rate == DEFAULT_RATE_PATTERNS
        ):
            keywords = DEFAULT_KEYWORDS
        self._keywords: tuple[str, ...] | None = keywords
        self._candidates = self._candidate_finder(p, keywords)
        self._combined: Callable[[str], object] | None = None
        if keywords is None:
            everything = [*p.usage, *p.rate]
            if everything:
                self._combined = re.compile(
                    "|".join(f"(?:{pattern})" for pattern in everything), re.IGNORECASE
                ).search

    @property
    def tz(self) -> tzinfo | None:
        """The zone its reset times are read in (``None``: this machine's)."""
        return self._tz

    def feed(self, line: str, now: float) -> LimitHit | None:
        """Classify one output line; ``now`` (epoch seconds) anchors relative reset times."""
        if line.startswith('{"'):
            handled, hit = self._feed_json(line, now)
            if handled:
                return hit
        if not self._prefilter(line):
            return None
        return self._match_text(line, line.rstrip("\r\n"), now)

    def feed_batch(
        self, lines: Sequence[str], now: float, text: str | None = None
    ) -> LimitHit | None:
        """Classify a batch of lines: its first usage hit, else its first rate hit, else None.

        The whole batch is checked once for anything that could match (a keyword, a
        stream-json marker); only then are its lines looked at one by one.  Agents print
        hundreds of thousands of lines a second, nearly none of them about limits.
        """
        if not lines:
            return None
        if text is None:
            text = "\n".join(lines)
        found: LimitHit | None = None
        starts: set[int] = set()
        for position in self._candidates(text):
            start = text.rfind("\n", 0, position) + 1
            if start in starts:
                continue  # another match on a line already looked at
            starts.add(start)
            end = text.find("\n", position)
            hit = self.feed(text[start : end if end >= 0 else len(text)], now)
            if hit is not None:
                if hit.kind == "usage":
                    return hit
                found = found or hit
        return found

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _candidate_finder(
        p: LimitPatterns, keywords: tuple[str, ...] | None
    ) -> Callable[[str], Iterator[int]]:
        """Where in a batch a line could match: a keyword or a stream-json marker (found with
        ``str.find``, far faster than a regex alternation), or, with custom patterns and no
        keywords, a pattern itself (with ^ and $ at every line)."""
        if keywords is not None:
            needles = (*_JSON_MARKERS, *keywords)

            def find(text: str) -> Iterator[int]:
                for needle in needles:
                    at = text.find(needle)
                    while at >= 0:
                        yield at
                        at = text.find(needle, at + 1)

            return find
        alternatives = [re.escape(m) for m in _JSON_MARKERS]
        alternatives += [f"(?:{pattern})" for pattern in (*p.usage, *p.rate)]
        finditer = re.compile("|".join(alternatives), re.IGNORECASE | re.MULTILINE).finditer
        return lambda text: (match.start() for match in finditer(text))

    def _prefilter(self, line: str) -> bool:
        keywords = self._keywords
        if keywords is not None:
            # An explicit loop: measurably faster than any() over a generator on the hot path.
            for keyword in keywords:  # noqa: SIM110
                if keyword in line:
                    return True
            return False
        combined = self._combined
        return combined is not None and combined(line) is not None

    def _match_text(self, text: str, line: str, now: float) -> LimitHit | None:
        for pattern in self._usage:
            if pattern.search(text):
                return LimitHit("usage", parse_reset_time(text, now, self._tz), line)
        if _RETRYING_MARKER in text:
            return None  # Claude Code is retrying on its own; only its final error counts
        for pattern in self._rate:
            if pattern.search(text):
                return LimitHit("rate", None, line)
        return None

    def _feed_json(self, line: str, now: float) -> tuple[bool, LimitHit | None]:
        """Read a stream-json event.  Returns (handled, hit); not handled = not JSON after all."""
        if not (
            '"rate_limit_event"' in line
            or '"is_error":true' in line
            or '"is_error": true' in line
            or '"is_api_error_message":true' in line
            or '"is_api_error_message": true' in line
        ):
            return True, None  # a JSON event of no interest: never searched as text
        try:
            event: Any = json.loads(line)
        except ValueError:
            return False, None
        if not isinstance(event, dict):
            return False, None
        raw = line.rstrip("\r\n")
        kind = event.get("type")
        if kind == "rate_limit_event":
            info = event.get("rate_limit_info")
            if isinstance(info, dict) and info.get("status") == "rejected":
                return True, LimitHit("usage", _epoch_or_none(info.get("resetsAt")), raw)
            return True, None
        if kind == "result" and event.get("is_error") is True:
            text = event.get("result")
            if isinstance(text, str):
                hit = self._match_text(text, raw, now)
                if hit is not None:
                    return True, hit
            if event.get("api_error_status") in (429, 529):
                return True, LimitHit("rate", None, raw)
            return True, None
        if kind == "assistant" and event.get("is_api_error_message") is True:
            for text in _assistant_texts(event):
                hit = self._match_text(text, raw, now)
                if hit is not None:
                    return True, hit
        return True, None


def _epoch_or_none(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value > 0 else None


def _assistant_texts(event: dict[str, Any]) -> list[str]:
    message = event.get("message")
    if not isinstance(message, dict):
        return []
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [
        block["text"]
        for block in content
        if isinstance(block, dict) and isinstance(block.get("text"), str)
    ]


# -- reset times -------------------------------------------------------------------------------

_EPOCH_RE = re.compile(r"\|\s*(\d{9,11})\b")
_ISO_RE = re.compile(
    r"\b(\d{4})-(\d{2})-(\d{2})(?:\s+at\s+|T|\s+)(\d{1,2}):(\d{2})(?::(\d{2}))?\s*(UTC|GMT|Z)?\b",
    re.IGNORECASE,
)
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}
_CLOCK_RE = re.compile(
    r"\breset(?:s)?(?:\s+at)?\s+"
    r"(?:(?P<mon>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+"
    r"(?P<day>\d{1,2})(?:st|nd|rd|th)?,?\s+(?:at\s+)?)?"
    r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?\s*(?P<ampm>[ap])\.?\s?m\b\.?"
    r"(?:\s*\((?P<zone>[A-Za-z0-9_+\-/]+)\))?",
    re.IGNORECASE,
)


def _zone(name: str | None, fallback: tzinfo | None) -> tzinfo | None:
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return fallback


def _at(day: date, clock: time, zone: tzinfo | None) -> float:
    # A naive datetime's .timestamp() uses the local zone, DST included.
    return datetime.combine(day, clock, tzinfo=zone).timestamp()


def parse_reset_time(text: str, now: float, tz: tzinfo | None) -> float | None:
    """Find when a limit resets in a message, as epoch seconds; ``None`` when it does not say.

    Understands ``...|1750000000`` (epoch), ``resets 3pm``, ``reset at 7:30pm``,
    ``resets 5am (Europe/Berlin)``, ``resets Jan 30, 11:30am (Asia/Calcutta)``,
    ``resets Sep 15 at 7pm``, ``Limits will reset at 9:30 AM`` and
    ``regain access on 2026-04-01 at 00:00 UTC``.  A zone in parentheses wins; otherwise ``tz``
    (``None``: this machine's local zone).  A clock time already past today means tomorrow,
    unless it passed less than :data:`PAST_GRACE_SECONDS` ago; a month and day already past
    means next year.
    """
    epoch = _EPOCH_RE.search(text)
    if epoch:
        return float(epoch.group(1))

    iso = _ISO_RE.search(text)
    if iso:
        year, month, day_, hour, minute = (int(iso.group(i)) for i in range(1, 6))
        second = int(iso.group(6) or 0)
        zone = ZoneInfo("UTC") if iso.group(7) else tz
        try:
            return datetime(year, month, day_, hour, minute, second, tzinfo=zone).timestamp()
        except ValueError:
            return None

    clock = _CLOCK_RE.search(text)
    if clock is None:
        return None
    hour = int(clock.group("hour"))
    minute = int(clock.group("minute") or 0)
    if not 1 <= hour <= 12 or not 0 <= minute <= 59:
        return None
    hour = hour % 12 + (12 if clock.group("ampm").lower() == "p" else 0)
    at = time(hour, minute)
    zone = _zone(clock.group("zone"), tz)
    today = datetime.fromtimestamp(now, zone).date()

    mon = clock.group("mon")
    if mon:
        month = _MONTHS[mon.lower()]
        day_ = int(clock.group("day"))
        for year in (today.year, today.year + 1):
            try:
                candidate = _at(date(year, month, day_), at, zone)
            except ValueError:  # Feb 30, or Feb 29 outside a leap year
                continue
            if candidate >= now - PAST_GRACE_SECONDS:
                return candidate
        return None

    candidate = _at(today, at, zone)
    if candidate < now - PAST_GRACE_SECONDS:
        candidate = _at(today + timedelta(days=1), at, zone)
    return candidate
