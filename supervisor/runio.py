"""One run's text in and out: its argv rendered from the config's templates, and the limit scan
of what it said last (its output reaches the log through :func:`supervisor.lines.pump_output`)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping

from supervisor.limits import LimitDetector, LimitHit, OutputTail

_PLACEHOLDER = re.compile(r"\{(issue|title|prompt|workspace)\}")


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{issue}``-style placeholders once; values are never re-scanned or shell-parsed."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


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
