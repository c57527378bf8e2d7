"""The machine's one watcher as the host sees it: ``sh/watch.sh`` started on a channel of its
own, the run directories it was given (numbered in order), its news (the complete passes it
printed) and its answers (renewals, fetches: ``batch.Answers``).  What the host does with them
is ``follow.py``'s."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import structlog

from supervisor.hosts.ssh.batch import Answers
from supervisor.hosts.ssh.connection import Connections, Watch

log = structlog.get_logger(__name__)

#: The watcher's pass interval while files change, and once QUIET_PASSES found nothing.
WATCH_FAST = 0.1
WATCH_SLOW = 1.0
QUIET_PASSES = 5
#: A quiet watcher says it lives every BEAT_PASSES passes; silent for WATCH_SILENCE seconds,
#: it is taken for hung and started again.
BEAT_PASSES = 15
WATCH_SILENCE = 3 * BEAT_PASSES * WATCH_SLOW + 5.0
#: The wrapper's start ticks are checked every TICKS_EVERY passes (``kill -0`` on the others).
TICKS_EVERY = 10


@dataclass(frozen=True)
class Fact:
    """What a pass said of one run: its stdout and stderr sizes (None: the file is missing),
    the first word of its ``exit`` (``-``: none yet), whether its wrapper lives."""

    run_dir: str
    sizes: tuple[int | None, int | None]
    exit_token: str
    alive: bool


async def first_of(*events: anyio.Event) -> None:
    """Wait until any of ``events`` is set."""
    async with anyio.create_task_group() as race:

        async def on(event: anyio.Event) -> None:
            await event.wait()
            race.cancel_scope.cancel()

        for event in events:
            race.start_soon(on, event)


class Watching:
    """One watcher started: the run directories it was given (line ``I`` is ``dirs[I-1]``),
    and what it printed that was not read yet."""

    def __init__(self) -> None:
        self.dirs: list[str] = []
        self.numbers: dict[str, int] = {}
        self.buffer = bytearray()
        self.started = time.monotonic()
        self.heard = self.started
        self.idle_since: float | None = None
        self.watch: Watch | None = None
        #: What its second process answers on stderr (renewals, fetches).
        self.answers = Answers()
        #: Lease renewals written to its stdin (``answers.renewed``: those acknowledged).
        self.renewals = 0

    def usable(self) -> bool:
        """It runs, and its answers can be trusted."""
        watch = self.watch
        return watch is not None and not watch.ended.is_set() and not self.answers.broken

    def add(self, run_dirs: list[str]) -> bool:
        """Have it follow ``run_dirs`` too (numbered on from the last); False when its channel
        is gone."""
        if not self.ask("".join(f"watch {d}\n" for d in run_dirs).encode()):
            return False
        for run_dir in run_dirs:
            self.dirs.append(run_dir)
            self.numbers[run_dir] = len(self.dirs)
        return True

    def ask(self, request: bytes) -> bool:
        """Write a request to it; False when it cannot take one now."""
        return self.usable() and self.watch is not None and self.watch.write(request)

    async def start(
        self,
        conns: Connections,
        on_news: Callable[[], None],
        on_renewed: Callable[[int], None],
    ) -> None:
        """Start the watcher on ``conns``; ``on_news`` is called when it printed, ``on_renewed``
        with how many renewals it acknowledged."""

        def on_data(data: bytes) -> None:
            self.buffer += data
            self.heard = time.monotonic()
            on_news()

        def on_stderr(data: bytes) -> None:
            answers = self.answers
            renewed = answers.renewed
            answers.feed(data)
            if answers.renewed > renewed:
                on_renewed(answers.renewed - renewed)
            if answers.broken:
                log.warning("ssh watcher answers broke", machine=conns.name, why=answers.broken)

        args = [str(WATCH_FAST), str(WATCH_SLOW), str(QUIET_PASSES), str(BEAT_PASSES),
                str(TICKS_EVERY)]  # fmt: skip
        self.watch = await conns.watch(
            "watch", *args, input=b"", on_data=on_data, on_stderr=on_stderr
        )

    def news(self) -> list[Fact]:
        """What the complete passes printed since the last call (``I OUT ERR EXIT ALIVE``
        lines, each pass ended by ``.``; a pass not yet complete waits for its end)."""
        buffer = self.buffer
        if buffer.startswith(b".\n"):
            end = 2
        else:
            end = buffer.rfind(b"\n.\n") + 3
            if end < 3:
                return []
        lines = bytes(buffer[:end]).split(b"\n")
        del buffer[:end]
        found = []
        for line in lines:
            fields = line.split()
            if len(fields) != 5 or not fields[0].isdigit():
                continue
            index = int(fields[0]) - 1
            if not 0 <= index < len(self.dirs):
                continue
            out, err = (int(f) if f.isdigit() else None for f in fields[1:3])
            exit_token = fields[3].decode("ascii", "replace")
            found.append(Fact(self.dirs[index], (out, err), exit_token, fields[4] != b"0"))
        return found
