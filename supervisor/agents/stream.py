"""The machinery the stream-JSON kinds share: one reader and one judge, three parameter sets.

Claude Code, Codex CLI and Gemini CLI all print one JSON event a line and end with a final event
that says how the run went; what differs is what their events are called and mean, which
wordings of theirs announce a limit or refuse a resume, and which exit codes have a documented
meaning.  :class:`StreamRules` holds those differences (a kind module fills one in);
:class:`StreamReader` reads any of them, and :func:`judge` turns what it read and the exit status
into the run's honest :class:`~supervisor.agents.base.Verdict`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any, ClassVar

from supervisor.agents.base import (
    KEEP_TEXT,
    AgentKind,
    Event,
    Launch,
    Outcome,
    RunFacts,
    RunReader,
    Stream,
    Verdict,
    reset_time,
)
from supervisor.limits import (
    LimitDetector,
    LimitHit,
    LimitPatterns,
    OutputTail,
    shared_detector,
)

__all__ = [
    "StreamKind",
    "StreamReader",
    "StreamRules",
    "int_of",
    "judge",
    "number_of",
    "text_of",
]

#: A line that does not parse is joined with the lines after it while the whole stays below
#: this size: the worker's line splitter cuts lines longer than ``max_line_bytes`` into pieces,
#: and a cut ``result`` event is still the run's result.
MAX_JOINED_LINE = 8 * 1024 * 1024


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
            return Verdict(Outcome.RATE_LIMITED, why or f"API error {result.api_status}", line=why)
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

    def _reader(
        self, launch: Launch, detector: LimitDetector | None, tz: tzinfo | None
    ) -> RunReader:
        return StreamReader(self.rules, launch, detector, tz)
