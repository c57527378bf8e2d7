"""One watcher per SSH machine, for the output and the end of every run followed there.

A run on an SSH machine writes its output to files in its run directory; the host reads them
back by byte offset.  Following each run with a channel of its own (two ``tail -F``, a status
poll per run) cost the machine some 160 ms of CPU per agent-second and a connection per eight
runs.  Instead, per machine, **one watcher** (``sh/watch.sh``) on one channel:

* prints, only when something changed, each followed run's stdout and stderr sizes, whether
  ``exit`` is written and whether its wrapper lives: a pass every 0.1 s while files change,
  every second once nothing has for a while, at once when poked (a run was signalled);
* answers on its stdin, without a login each: ``watch RUN_DIR`` (one more run to follow),
  ``fetch`` (for every reader behind its run's files, the new bytes, each piece with a length
  header, at most :data:`PIECE` bytes, :data:`FETCH_TOTAL` in all, asked again at once while a
  piece came back full), ``renew`` (leases and the claim: ``Host.renew_leases``).  A machine
  whose logins hang while its connections live keeps its output flowing and its leases fresh.

A run whose ``exit`` appeared, or whose wrapper is gone, or whose directory vanished, is judged
by one probe (``sh/status.sh`` and ``runfiles.decide``) for all of them, and ended there and then
when its wrapper is gone without an ``exit`` (``sh/end-lost.sh``).

Runs are added to the running watcher (``watch``), not by starting a new one: a new login per
run start cost more than the watching itself, and delayed the new run's first output by it.
The watcher is started anew only when it ended (a lost link), fell silent, answered nonsense,
or holds mostly runs long ended; a new watcher is given every run followed, and its first pass
reports each, which is exactly what a reconnect needs: each reader fetches from the offsets it
holds (nothing lost, nothing repeated), every reader at once once the link is back, without
waiting for that first pass.  Without a watcher (nothing left to watch: an ended run's output
read again) a fetch is one command (``sh/fetch.sh``).

The work is done by one background task per machine, started at the first run followed and
ended by :meth:`Follower.aclose`.  It is a plain asyncio task (asyncssh is asyncio-only): the
readers and waiters come and go (a worker's output pump, a ``wait`` cut short by a stop
timeout) while the watcher, the fetches and the reconnects must go on regardless of which of
them happens to be waiting; no error of the loop reaches them, only what it found.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import posixpath
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
import structlog

from supervisor.hosts import runfiles
from supervisor.hosts.base import (
    STREAMS,
    Chunk,
    ExitStatus,
    HostError,
    HostSlow,
    Stream,
)
from supervisor.hosts.ssh.batch import (
    Asked,
    Fetched,
    FetchError,
    Piece,
    fetch,
    fetch_request,
    probe,
)
from supervisor.hosts.ssh.connection import Connections
from supervisor.hosts.ssh.target import decode
from supervisor.hosts.ssh.watcher import WATCH_SILENCE, Watching, first_of

log = structlog.get_logger(__name__)

#: A watcher that ended sooner than this after its start failed (it is not restarted at once).
WATCH_MIN_LIFE = 1.0
#: How long a restart waits for the old watcher's channel to close.
WATCH_CLOSE_WAIT = 2.0
#: A watcher following no run any more is let go after this long (seconds): a task's next run
#: usually comes soon.
WATCH_IDLE = 30.0
#: A watcher is started anew (its list rid of ended runs) once it holds more ended runs than
#: this, and twice as many as live ones.
SHRINK_AFTER_RUNS = 50
#: Largest piece of one file in one fetch; most bytes in one fetch; most bytes a reader may
#: hold unconsumed before its run is fetched for again.
PIECE = 2 * 1024 * 1024
FETCH_TOTAL = 16 * 1024 * 1024
READER_BUFFER = 4 * 1024 * 1024
# ---- what the loop knows ------------------------------------------------------------------------


@dataclass(eq=False)
class _Run:
    """A run followed on this machine: what the watcher and the fetches found, and its end."""

    run_dir: str
    sizes: dict[Stream, int | None] = field(default_factory=lambda: dict.fromkeys(STREAMS))
    exit_token: str = "-"
    alive: bool = True
    missing: bool = False
    users: int = 0  # handles, readers and waiters of it
    readers: set[_Reader] = field(default_factory=set)
    status: ExitStatus | None = None
    #: Fetches started before the end was known (a fetch numbered above reads the final bytes).
    ended_after: int = 0
    #: Nothing more can be read (the machine was given up on, or the host closed).
    abandoned: bool = False
    #: The watcher facts last judged RUNNING: not probed again until they change.
    judged: tuple[str, bool, bool] | None = None
    done: anyio.Event = field(default_factory=anyio.Event)

    def facts(self) -> tuple[str, bool, bool]:
        return (self.exit_token, self.alive, self.missing)

    def wants_judging(self) -> bool:
        if self.status is not None or self.judged == self.facts():
            return False
        return self.exit_token != "-" or not self.alive or self.missing


class _Reader:
    """One ``output()`` of a run: its offsets and the chunks fetched but not yet taken."""

    def __init__(self, run: _Run, offsets: Mapping[Stream, int] | None) -> None:
        self.run = run
        self.pos: dict[Stream, int] = {s: int((offsets or {}).get(s, 0)) for s in STREAMS}
        self.chunks: collections.deque[Chunk] = collections.deque()
        self.buffered = 0
        self.caught_up = -1  # the last fetch that read both files to their ends
        self.wake = anyio.Event()

    def finished(self) -> bool:
        run = self.run
        if run.abandoned:
            return True
        return run.status is not None and self.caught_up > run.ended_after

    def room(self) -> int:
        return READER_BUFFER - self.buffered

    def wanted(self, resync: bool) -> list[Stream]:
        """The streams to fetch for: those behind the sizes the watcher saw; both for the last
        read after the end, and with ``resync`` (the watcher was down: its sizes are old)."""
        run = self.run
        if self.room() <= 0 or self.finished():
            return []
        if run.status is not None or resync:
            return list(STREAMS)
        return [s for s in STREAMS if (size := run.sizes[s]) is not None and self.pos[s] < size]


class Follower:
    """The watcher, the fetches and the judging of one SSH machine's followed runs."""

    def __init__(self, conns: Connections) -> None:
        self.conns = conns
        self.name = conns.name
        self._runs: dict[str, _Run] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: anyio.Event | None = None
        self._closed = False
        self._fetches = 0
        self._turn = 0  # where the next fetch starts picking readers (fairness)
        self._down_since: float | None = None
        self._resync = False  # the watcher was down: read every reader once, as it comes back
        self._watching: Watching | None = None  # the watcher running now
        #: Watchers started so far (the first included): a restart or reconnect shows as 2, ...
        self.watchers = 0
        #: Lease renewals done through a watcher (acknowledged).
        self.renewals = 0
        conns.reach.resync_needed = self._behind

    # ---- the interface of run handles and of the host -----------------------------------------

    def renew(self, paths: Sequence[str]) -> bool:
        """Renew the leases ``paths`` through the running watcher's stdin (no new login: a
        machine whose logins hang while its connections live keeps its runs); False when that
        cannot be done now (no watcher, or it has not acknowledged the last renewal), and the
        caller runs a command instead."""
        watching = self._watching
        if watching is None or not watching.usable():
            return False
        if watching.answers.renewed < watching.renewals:
            return False
        if any("\n" in path or not path for path in paths):
            return False
        request = "".join(f"lease {path}\n" for path in paths) + "renew\n"
        if not watching.ask(request.encode()):
            return False
        watching.renewals += 1
        return True

    def follow(self, run_dir: str, status: ExitStatus | None = None) -> None:
        """A handle of the run exists: follow it (``status``: its end, when already known)."""
        if "\n" in run_dir:
            raise HostError(
                self.name, f"a run directory with a newline cannot be followed: {run_dir!r}"
            )
        run = self._take(run_dir)
        if status is not None and run.status is None:
            self._end(run, status)
        self._kick()

    def unfollow(self, run_dir: str) -> None:
        """A handle of the run is gone."""
        self._drop(run_dir)

    async def wait(self, run_dir: str) -> ExitStatus:
        """The run's end, once known."""
        run = self._take(run_dir)
        try:
            self._kick()
            await run.done.wait()
        finally:
            self._drop(run_dir)
        assert run.status is not None
        return run.status

    async def read(
        self, run_dir: str, offsets: Mapping[Stream, int] | None
    ) -> AsyncIterator[Chunk]:
        """The run's output from ``offsets``, until its end has been read."""
        run = self._take(run_dir)
        reader = _Reader(run, offsets)
        run.readers.add(reader)
        try:
            self._kick()
            while True:
                while reader.chunks:
                    chunk = reader.chunks.popleft()
                    full = reader.room() <= 0
                    reader.buffered -= len(chunk.data)
                    if full:
                        self._kick()  # it may be fetched for again
                    yield chunk
                wake = reader.wake = anyio.Event()
                if reader.finished() or self._closed:
                    return
                if not reader.chunks:
                    await wake.wait()
        finally:
            run.readers.discard(reader)
            self._drop(run_dir)

    async def aclose(self) -> None:
        """Stop the loop (and the watcher with it); every follower still waiting is told the
        run is lost to this supervisor (the run itself goes on)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception), anyio.move_on_after(10):
                await task
        for run in list(self._runs.values()):
            self._abandon(run, f"the SSH host {self.name} was closed")

    def _behind(self) -> bool:
        """Back after an absence, not every run is followed again yet."""
        return self._resync or (bool(self._watch_list()) and self._watching is None)

    # ---- bookkeeping --------------------------------------------------------------------------

    def _take(self, run_dir: str) -> _Run:
        run = self._runs.get(run_dir)
        if run is None:
            run = self._runs[run_dir] = _Run(run_dir)
        run.users += 1
        return run

    def _drop(self, run_dir: str) -> None:
        run = self._runs.get(run_dir)
        if run is None:
            return
        run.users -= 1
        if run.users <= 0:
            del self._runs[run_dir]

    def _kick(self) -> None:
        """Something changed for the loop: wake it, or start it."""
        if self._closed:
            return
        if self._wake is not None:
            self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._serve(), name=f"ssh-follow-{self.name}"
            )

    def _end(self, run: _Run, status: ExitStatus) -> None:
        run.status = status
        run.ended_after = self._fetches
        run.done.set()
        for reader in run.readers:
            reader.wake.set()

    def _abandon(self, run: _Run, reason: str) -> None:
        """Nothing more can be known of the run here: its followers are told it is lost."""
        run.abandoned = True
        if run.status is None:
            log.warning("run lost", machine=self.name, run_dir=run.run_dir, reason=reason)
            self._end(run, ExitStatus(code=None, lost=True, reason=reason))
        for reader in run.readers:
            reader.wake.set()

    # ---- the loop -----------------------------------------------------------------------------

    async def _serve(self) -> None:
        """Keep a watcher on the runs that have not ended, fetch what grew, judge what ended;
        after a failure, back off and start again."""
        watching: Watching | None = None
        attempt = 0
        try:
            while not self._closed:
                try:
                    watching = await self._tend(watching)
                    if self._down_since is not None:
                        log.info("ssh watcher back", machine=self.name)
                    self._down_since, attempt = None, 0
                    self.conns.reach.settled()
                except FetchError as err:
                    log.warning("ssh fetch failed", machine=self.name, error=err.message)
                    await anyio.sleep(0.5)
                except HostSlow as err:
                    # New commands hang while the watcher's channel may well live on: keep
                    # it, and try again later (nothing is given up for a slow machine).
                    log.info("ssh command unanswered", machine=self.name, error=err.message)
                    self._resync = True
                    await anyio.sleep(min(0.5 * 2**attempt, 5.0))
                    attempt += 1
                except HostError as err:
                    self._stop(watching)
                    watching = None
                    self._trouble(err)
                    await anyio.sleep(min(0.25 * 2**attempt, 5.0))
                    attempt += 1
        finally:
            self._stop(watching)

    async def _fetch_now(self, pieces: list[Piece]) -> list[Fetched]:
        """The pieces, read by the running watcher (no new login: output goes on flowing from
        a machine whose logins hang), else by one command."""
        asked = await self._through_watcher(pieces, fetch_request(pieces))
        if asked is None:
            return await fetch(self.conns, pieces)
        if asked.error:
            raise FetchError(self.name, asked.error)
        return asked.found

    def poke(self) -> None:
        """The host expects news soon (it signalled a run by a command): the watcher looks at
        once."""
        if self._watching is not None:
            self._watching.ask(b"poke\n")

    async def signal(self, pid: int, ticks: int, name: str) -> bool:
        """Signal a run's tree through the running watcher (no new login: a run can be stopped
        on a machine whose logins hang); False when that could not be done (the caller runs a
        command instead)."""
        asked = await self._through_watcher(None, f"signal {pid} {ticks} {name}\n".encode())
        return asked is not None and not asked.error

    async def _through_watcher(self, pieces: list[Piece] | None, request: bytes) -> Asked | None:
        """Ask the running watcher ``request`` and wait (bounded) for its answer; None when no
        watcher could take it.  A watcher that does not answer in time is not trusted again."""
        watching = self._watching
        if watching is None or not watching.usable() or watching.watch is None:
            return None
        asked = watching.answers.ask(pieces)
        if not watching.ask(request):
            watching.answers.fail("the watcher's channel is gone")
            return None
        timeout = self.conns.target.command_timeout
        with anyio.move_on_after(timeout):
            await first_of(asked.done, watching.watch.ended)
        if not asked.done.is_set():
            watching.answers.fail(
                "the watcher ended" if watching.watch.ended.is_set()
                else f"no answer from the watcher within {timeout:g}s"
            )  # fmt: skip
        return asked

    def _stop(self, watching: Watching | None) -> None:
        if watching is not None:
            watching.answers.fail("the watcher was stopped")
        if watching is not None and watching.watch is not None:
            watching.watch.close()
        if self._watching is watching:
            self._watching = None

    def _trouble(self, err: HostError) -> None:
        """The machine could not be reached: nothing is given up (each run is found again by
        its directory once it is back; the machine's reachability tells the fleet meanwhile),
        and every reader is read at once when it is."""
        self._resync = True
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.info("ssh watcher interrupted", machine=self.name, error=err.message)

    async def _tend(self, watching: Watching | None) -> Watching | None:
        """One round: the watcher right, its news read, runs judged, output fetched, then a
        wait for news (unless a fetch left more to read)."""
        self._wake = wake = anyio.Event()
        watching, wait_for = await self._keep_watching(watching)
        if watching is not None:
            self._absorb(watching)
        await self._judge()
        resync, self._resync = self._resync, False
        try:
            if await self._fetch(resync):
                return watching
        except BaseException:
            self._resync = resync
            raise
        if watching is not None:
            wait_for = min(wait_for, watching.heard + WATCH_SILENCE - time.monotonic())
        with anyio.move_on_after(max(0.0, wait_for)):
            if watching is not None and watching.watch is not None:
                await first_of(wake, watching.watch.ended)
            else:
                await wake.wait()
        return watching

    def _watch_list(self) -> list[str]:
        return [d for d, run in self._runs.items() if run.status is None]

    async def _keep_watching(self, watching: Watching | None) -> tuple[Watching | None, float]:
        """Start the watcher, give it the runs followed anew, or start it again (it ended, fell
        silent, answered nonsense, or holds mostly runs long ended); how long the loop may then
        wait before it must look again (an idle watcher is let go after a while)."""
        wanted = self._watch_list()
        now = time.monotonic()
        wait_for = math.inf
        if watching is not None and watching.watch is not None:
            watch = watching.watch
            by_itself = watch.ended.is_set() and now - watching.started < WATCH_MIN_LIFE
            if wanted:
                watching.idle_since = None
            elif watching.idle_since is None:
                watching.idle_since = now
            restart = ""
            if watch.ended.is_set():
                restart = f"it ended: {watch.why()}"
                self._resync = True  # its link died, most likely: read on at once when back
            elif now - watching.heard > WATCH_SILENCE:
                restart = f"it said nothing for {WATCH_SILENCE:g}s"
            elif watching.answers.broken:
                restart = watching.answers.broken
            elif watching.idle_since is not None and now - watching.idle_since > WATCH_IDLE:
                restart = "nothing left to follow"
            elif len(watching.dirs) - len(wanted) > max(SHRINK_AFTER_RUNS, 2 * len(wanted)):
                restart = "mostly runs that have ended"
            elif watching.idle_since is not None:
                wait_for = watching.idle_since + WATCH_IDLE - now
            if restart:
                log.debug("ssh watcher restarted", machine=self.name, why=restart)
                self._stop(watching)
                watching = None
                # Its channel counts against MaxSessions until closed: the next waits for that.
                with anyio.move_on_after(WATCH_CLOSE_WAIT):
                    await watch.ended.wait()
                if by_itself:
                    # A watcher that ends as soon as it starts would be started in a loop:
                    # this is a failure like any other (backoff, then again).
                    raise HostError(self.name, f"the run watcher ended at once: {watch.why()}")
        if watching is None and wanted:
            watching = Watching()
            await self._start_watch(watching)
            self._watching = watching
        if watching is not None and watching.watch is not None:
            new = [d for d in wanted if d not in watching.numbers]
            if new and not watching.add(new):
                raise HostError(self.name, "the run watcher's channel is gone")
        return watching, wait_for

    async def _start_watch(self, watching: Watching) -> None:
        def on_news() -> None:
            if self._wake is not None:
                self._wake.set()

        def on_renewed(count: int) -> None:
            self.renewals += count

        await watching.start(self.conns, on_news, on_renewed)
        self.watchers += 1

    def _absorb(self, watching: Watching) -> None:
        """Take in what the watcher's complete passes said of the runs still followed."""
        for fact in watching.news():
            run = self._runs.get(fact.run_dir)
            if run is None or run.status is not None:
                continue
            for stream, size in zip(STREAMS, fact.sizes, strict=True):
                if size is None:
                    run.missing = True
                else:
                    run.sizes[stream] = max(run.sizes[stream] or 0, size)
            run.exit_token = fact.exit_token
            run.alive = fact.alive

    async def _judge(self) -> None:
        """Probe, in one command, the runs whose end the watcher saw (or whose wrapper or
        directory it found gone); end those whose wrapper vanished without an ``exit``."""
        runs = [run for run in self._runs.values() if run.wants_judging()]
        if not runs:
            return
        found = await probe(self.conns, [run.run_dir for run in runs])
        for run in runs:
            status = found[run.run_dir]
            if status.needs_ending:
                out = await self.conns.script("end-lost", run.run_dir, runfiles.WRAPPER_VANISHED)
                if out.code != 0:
                    raise HostError(self.name, f"cannot end a lost run: {decode(out.stderr)}")
            ended = runfiles.exit_status(status, run.run_dir)
            if ended is None:
                run.judged = run.facts()  # running after all: looked at again on news
            elif run.status is None:
                self._end(run, ended)

    async def _fetch(self, resync: bool = False) -> bool:
        """One fetch for every reader behind its files (with ``resync``, every reader: output
        written while the watcher was down is read without waiting for its first pass); True
        when a piece came back full (there is more to read at once)."""
        readers = [r for run in self._runs.values() for r in run.readers]
        if not readers:
            return False
        self._turn = (self._turn + 1) % len(readers)
        readers = readers[self._turn :] + readers[: self._turn]
        asked: list[tuple[_Reader, Stream, Piece]] = []
        total = 0
        for reader in readers:
            room = reader.room()
            for stream in reader.wanted(resync):
                if total >= FETCH_TOTAL:
                    break
                limit = min(PIECE, room, FETCH_TOTAL - total)
                if limit <= 0:
                    break
                size = reader.run.sizes[stream]
                expect = limit if size is None else min(limit, size - reader.pos[stream])
                path = posixpath.join(reader.run.run_dir, stream)
                asked.append((reader, stream, Piece(path, reader.pos[stream], limit)))
                room -= max(0, expect)
                total += max(0, expect)
        if not asked:
            return False
        self._fetches += 1
        number = self._fetches
        got = await self._fetch_now([piece for _, _, piece in asked])
        more = False
        done: dict[_Reader, int] = {}
        for (reader, stream, piece), fetched in zip(asked, got, strict=True):
            run = reader.run
            if fetched.size < 0:
                run.missing = True
            else:
                run.sizes[stream] = max(run.sizes[stream] or 0, fetched.size)
            if fetched.data:
                reader.pos[stream] += len(fetched.data)
                reader.buffered += len(fetched.data)
                reader.chunks.append(Chunk(stream, fetched.data, reader.pos[stream]))
                reader.wake.set()
            if len(fetched.data) >= piece.limit:
                more = True
            elif fetched.size < 0 or reader.pos[stream] >= fetched.size:
                done[reader] = done.get(reader, 0) + 1
        for reader, streams in done.items():
            if streams == len(STREAMS) and reader.run.status is not None:
                reader.caught_up = number
                reader.wake.set()
        return more
