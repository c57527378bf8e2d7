"""Every exit code of every ``agentize-fleet`` command, and what it means: the one place they live.

Scripts and cron jobs branch on these numbers, so they are part of the interface: a code is
never reused for another meaning, and the README's table and ``--help``'s list are written from
:data:`DETAILS`.

The rule that decides between the first three, for every command:

* **2** -- nothing was done because of what was asked: a bad flag, a bad config, or a name that
  does not exist (an unknown shift, task or machine), or a request the running fleet refuses
  (``restart`` of a task it does not have).  The message names what to fix; running the same command
  again cannot help.
* **1** -- the command ran and what it was for failed: some tasks failed (``up``), a machine
  cannot run agents (``check``), the running fleet did not answer (``status``, ``down``, ...).
* **3** -- there is nothing to act on: no tasks, no fleet running, no shift recorded yet.
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

#: Short meanings: a shift's summary and its ``fleet-ended`` record quote these.
MEANINGS: dict[int, str] = {
    EXIT_OK: "all tasks done",
    EXIT_FAILED: "some tasks failed",
    EXIT_USAGE: "bad usage or config",
    EXIT_NOTHING: "nothing to do",
    EXIT_LOCKED: "another up holds the lock",
    EXIT_DEADLINE: "deadline reached with work left",
    EXIT_INTERRUPTED: "interrupted",
    EXIT_BROKEN_PIPE: "output closed",
}

#: What each code means for every command: the README's table and the end of ``--help``.
DETAILS: dict[int, str] = {
    EXIT_OK: "done: all tasks done (up); the command did what was asked",
    EXIT_FAILED: "failed: some tasks failed (up: the restart-intensity limit or the milestone "
    "cap); a machine cannot run agents (check); the running fleet did not answer",
    EXIT_USAGE: "bad usage: a bad flag or config (the message names the file, the field and the "
    "fix), an unknown shift, task or machine (logs, report, restart), or a request the running "
    "fleet refuses (restart of a task it does not have)",
    EXIT_NOTHING: "nothing to do: no tasks (up); no fleet running (status, down, pause, "
    "resume, restart, add); no shift recorded yet (logs, shifts, report)",
    EXIT_LOCKED: "locked: another up holds the state directory's lock, or the local workspace "
    "root's (the message names its pid)",
    EXIT_DEADLINE: "deadline reached with work left (up --until / --max-duration), or new runs "
    "stopped early: a usage hold longer than max_usage_wait, a max_cost_usd.fleet limit",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C, SIGTERM, down)",
    EXIT_BROKEN_PIPE: "output closed: the reader of the output went away (status --json | head)",
}
