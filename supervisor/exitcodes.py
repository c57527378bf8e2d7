"""Every exit code of every ``agentize-fleet`` command, and what it means: the one place they live.

Scripts and cron jobs branch on these numbers, so they are part of the interface: a code is
never reused for another meaning, and the README's table is written from :data:`MEANINGS`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOTHING = 3
EXIT_LOCKED = 4
EXIT_DEADLINE = 5
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

MEANINGS: dict[int, str] = {
    EXIT_OK: "all tasks done",
    EXIT_FAILED: "some tasks failed",
    EXIT_USAGE: "bad usage or config",
    EXIT_NOTHING: "nothing to do",
    EXIT_LOCKED: "another run holds the lock",
    EXIT_DEADLINE: "deadline reached with work left",
    EXIT_INTERRUPTED: "interrupted",
    EXIT_BROKEN_PIPE: "output closed",
}
