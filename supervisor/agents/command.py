"""Kind ``command``: any program, judged exactly as the fleet always judged it.

Why it stays: a user's wrapper script, an agent CLI we do not know, the fake agent of the
demo -- all print text we cannot parse.  The rules are today's: exit 0 is done, anything else
a crash, and a usage-limit message among the last 64 KiB of either stream (see
:mod:`supervisor.limits`) makes it a usage limit whatever the exit code.  Feeding costs nothing
per line: a block is appended to a bounded tail and only the tails are ever searched, once,
when the run has ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import tzinfo

from supervisor.agents.base import (
    AgentKind,
    Launch,
    Outcome,
    RunFacts,
    RunReader,
    Session,
    Stream,
    Verdict,
)
from supervisor.limits import LimitDetector, LimitHit, LimitPatterns, OutputTail, shared_detector


class TailReader(RunReader):
    """Keeps the last output of each stream; searches it for a limit once, at the end."""

    def __init__(self, detector: LimitDetector | None = None) -> None:
        self.facts = RunFacts()
        self._detector = detector or shared_detector(LimitPatterns())
        self._tails = {"stdout": OutputTail(), "stderr": OutputTail()}

    def feed(self, stream: Stream, block: bytes) -> None:
        self._tails[stream].add(block)

    def limit_hit(self, now: float) -> LimitHit | None:
        """The run's limit hit: a usage hit in either tail wins over a rate hit."""
        found: LimitHit | None = None
        for tail in self._tails.values():
            text = tail.text()
            hit = self._detector.feed_batch(text.split("\n"), now, text) if text else None
            if hit is not None and (found is None or hit.kind == "usage"):
                found = hit
        return found

    def verdict(self, exit_code: int | None, now: float) -> Verdict:
        hit = self.limit_hit(now)
        if hit is not None and hit.kind == "usage":
            return Verdict(Outcome.USAGE_LIMITED, hit.line, reset_at=hit.reset_at, line=hit.line)
        if exit_code == 0:
            return Verdict(Outcome.DONE, "exit 0")
        return Verdict(Outcome.CRASHED, f"exit {'lost' if exit_code is None else exit_code}")


class CommandKind(AgentKind):
    """The user's argument list as is: placeholders filled by the worker, nothing added."""

    name = "command"
    default_command = ("claude", "-p", "{prompt}", "--dangerously-skip-permissions")

    def argv(
        self, command: Sequence[str], prompt: str, session: Session, git_dir: str | None
    ) -> list[str]:
        return list(command)

    def _reader(
        self, launch: Launch, detector: LimitDetector | None, tz: tzinfo | None
    ) -> RunReader:
        return TailReader(detector)
