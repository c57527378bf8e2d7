"""One run's text in and out: its argv rendered from the config's templates, its output pumped
into the log, and the limit scan of what it said last."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping

from supervisor.hosts.base import STREAMS, RunHandle, Stream
from supervisor.limits import LimitDetector, LimitHit, OutputTail
from supervisor.logs import LineSplitter, LogMux, Tag

_PLACEHOLDER = re.compile(r"\{(issue|title|prompt|workspace)\}")


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{issue}``-style placeholders once; values are never re-scanned or shell-parsed."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


async def pump_output(
    handle: RunHandle,
    offsets: Mapping[Stream, int],
    mux: LogMux,
    tag: Tag,
    max_line_bytes: int,
) -> list[OutputTail]:
    """Log the run's output from ``offsets`` until it has ended and both files are drained;
    return the tail of each stream.  Blocks of whole lines go to the log's fast path, each
    with the byte offset after it (what a re-adopting supervisor resumes from)."""
    splitters = {s: LineSplitter(max_line_bytes, offsets.get(s, 0)) for s in STREAMS}
    tails = {s: OutputTail() for s in STREAMS}
    async for chunk in handle.output(offsets):
        splitter = splitters[chunk.stream]
        block = splitter.feed(chunk.data)
        if block is not None:
            mux.output(tag, chunk.stream, block, splitter.offset)
            tails[chunk.stream].add(block)
    for stream, splitter in splitters.items():
        rest = splitter.finish()
        if rest is not None:
            mux.output(tag, stream, rest, splitter.offset)
            tails[stream].add(rest)
    return list(tails.values())


def limit_in(tails: Iterable[OutputTail], detector: LimitDetector) -> LimitHit | None:
    """Why did the run end: a usage or rate limit in the last output it printed.

    Only the tail of each stream counts (:class:`OutputTail`): an agent stopped by a limit says
    so last, while a limit message far earlier in the output (a test log, a file the agent
    printed) says nothing about this exit -- and scanning every line of an agent printing a
    million lines a second would cost more than logging them.  ``detector`` reads reset times
    in the time zone of the run's machine.
    """
    found: LimitHit | None = None
    for tail in tails:
        text = tail.text()
        hit = detector.feed_batch(text.split("\n"), time.time(), text) if text else None
        if hit is not None and (found is None or hit.kind == "usage"):
            found = hit
    return found
