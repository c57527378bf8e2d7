"""A run on an SSH machine, followed through the files of its run directory.

* output: one channel per reader runs ``sh/stream.sh`` (``tail -c +K -F`` on both output files;
  the channel's stdout and stderr carry the two files), so a reader resumes from any byte
  offset after a reconnect, without loss or duplicates; once the run has ended the tails are
  stopped and the remainder of each file is fetched up to its final size, so the last bytes
  are never lost.  Offsets count payload bytes only (the login shell's chatter is dropped by
  the frame, see ``connection.py``).
* status: ``sh/status.sh`` prints the run directory's facts, ``hosts/runfiles.py`` judges
  them; a run found with its wrapper gone and no ``exit`` is ended there and then
  (``sh/end-lost.sh``: what is left of its tree killed, ``exit`` = ``lost`` written).
* signals: ``sh/signal.sh`` (OpenSSH ignores channel signals), guarded by the agent's start
  time in ``/proc/PID/stat`` so that a reused pid is never signalled.
"""

from __future__ import annotations

import contextlib
import posixpath
import signal as signal_module
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import anyio
import structlog

from supervisor.hosts import runfiles
from supervisor.hosts.base import (
    STREAMS,
    Chunk,
    ExitStatus,
    HostError,
    HostUnreachable,
    RunHandle,
    RunIdentity,
    RunState,
    RunStatus,
    Stream,
    TreeStats,
)
from supervisor.hosts.ssh.connection import Connections, StreamEnd, decode

log = structlog.get_logger(__name__)

#: Largest piece of an ended run's output fetched by one command after its stream has stopped.
CATCH_UP_SIZE = 4 * 1024 * 1024
#: How often ``wait()`` looks at the run directory: every WAIT_POLL seconds for the first
#: WAIT_FAST_POLLS looks, then every WAIT_POLL_SLOW seconds (a stream seeing the end wakes it).
WAIT_POLL = 0.5
WAIT_FAST_POLLS = 20
WAIT_POLL_SLOW = 2.0
#: How long a start waits for the wrapper to write the ``pid`` file (seconds); a probe waits
#: as long (and a little more) for a start in flight.
START_TIMEOUT = 10.0
#: Run directories judged by one probe command (keeps the command line short).
PROBE_BATCH = 200
#: The stream script's exit codes: the run ended; its directory is gone; its wrapper died.
_ENDED, _NO_RUN_DIR, _WRAPPER_DIED = 0, 3, 4


async def probe(conns: Connections, run_dirs: Sequence[str]) -> dict[str, RunStatus]:
    """The status of each run directory, in one command per :data:`PROBE_BATCH`."""
    found: dict[str, RunStatus] = {}
    lock_wait = int(START_TIMEOUT) + 2
    for first in range(0, len(run_dirs), PROBE_BATCH):
        batch = run_dirs[first : first + PROBE_BATCH]
        out = await conns.script("status", str(lock_wait), *batch, timeout=60.0 + lock_wait)
        facts = runfiles.parse_probe(decode(out.stdout))
        missing = [d for d in batch if d not in facts]
        if out.code != 0 or missing:
            detail = decode(out.stderr).strip() or f"exit {out.code}, no facts for {missing[:3]}"
            raise HostError(conns.name, f"cannot read the status of runs: {detail}")
        found.update((d, runfiles.decide(facts[d])) for d in batch)
    return found


async def read_part(conns: Connections, path: str, offset: int, limit: int) -> bytes:
    """At most ``limit`` bytes of a remote file, from byte ``offset``."""
    out = await conns.script("read-rest", path, str(offset + 1), str(limit))
    if out.code != 0:
        raise HostError(conns.name, f"cannot read {path}: {decode(out.stderr).strip()}")
    return out.stdout


def _signal_name(signum: int) -> str:
    return signal_module.Signals(signum).name.removeprefix("SIG")


@dataclass(frozen=True)
class _TreeRow:
    """One process of a remote run's session, as ``sh/tree.sh`` lists it."""

    pid: int
    rss_kib: int
    ticks: int | None  # CPU ticks used so far (None: /proc could not be read)


class SSHRunHandle(RunHandle):
    """A run on an SSH machine, followed through the files of its run directory."""

    def __init__(self, conns: Connections, identity: RunIdentity) -> None:
        self.conns = conns
        self.identity = identity
        self._status: ExitStatus | None = None
        self._lost: str | None = None
        # Set when an output stream saw the run end: wait() looks again at once.
        self._ended = anyio.Event()
        # The last look at the tree's CPU: (monotonic time, CPU ticks by pid).
        self._cpu_seen: tuple[float, dict[int, int]] | None = None

    def __repr__(self) -> str:
        return (
            f"SSHRunHandle({self.conns.name!r}, {self.identity.run_dir!r}, "
            f"pid={self.identity.pid})"
        )

    @property
    def _name(self) -> str:
        return self.conns.name

    def _unreachable_for(self, since: float) -> bool:
        return time.monotonic() - since > self.conns.target.unreachable_after

    def _give_up(self, err: HostError) -> None:
        self._lost = (
            f"{self._name} unreachable for more than "
            f"{self.conns.target.unreachable_after:g}s: {err.message}"
        )
        log.warning(
            "run lost", machine=self._name, run_dir=self.identity.run_dir, reason=self._lost
        )

    def _saw_end(self) -> None:
        self._ended.set()
        self._ended = anyio.Event()

    # ---- output ---------------------------------------------------------------------------------

    async def output(self, offsets: Mapping[Stream, int] | None = None) -> AsyncIterator[Chunk]:
        pos: dict[Stream, int] = {s: int((offsets or {}).get(s, 0)) for s in STREAMS}
        down_since: float | None = None
        attempt = 0
        run_dir = self.identity.run_dir
        while True:
            if self._lost is not None or self.conns.closed:
                return
            end = StreamEnd()
            try:
                chunks = self.conns.stream(
                    "stream", run_dir, str(pos["stdout"] + 1), str(pos["stderr"] + 1), end=end
                )
                async with contextlib.aclosing(chunks):
                    async for stream, data in chunks:
                        pos[stream] += len(data)
                        yield Chunk(stream=stream, data=data, end=pos[stream])
                if end.code not in (_ENDED, _NO_RUN_DIR, _WRAPPER_DIED):
                    raise HostUnreachable(self._name, f"output stream ended with {end.code}")
                self._saw_end()
                if end.code == _NO_RUN_DIR:
                    return  # the run directory is gone: nothing left to read
                # The run has ended: fetch whatever the tails had not delivered yet.
                for stream in STREAMS:
                    path = posixpath.join(run_dir, stream)
                    while True:
                        rest = await read_part(self.conns, path, pos[stream], CATCH_UP_SIZE)
                        if rest:
                            pos[stream] += len(rest)
                            yield Chunk(stream=stream, data=rest, end=pos[stream])
                        if len(rest) < CATCH_UP_SIZE:
                            break
                return
            except HostError as err:
                if self.conns.closed:
                    return
                if end.opened:  # the link was back (for a while, maybe) before this failure
                    down_since, attempt = None, 0
                down_since = time.monotonic() if down_since is None else down_since
                if self._unreachable_for(down_since):
                    self._give_up(err)
                    return
                log.info(
                    "output stream interrupted, resuming",
                    machine=self._name,
                    run_dir=run_dir,
                    error=err.message,
                    offsets=dict(pos),
                )
                await anyio.sleep(min(0.25 * 2**attempt, 5.0))
                attempt += 1

    # ---- status ---------------------------------------------------------------------------------

    async def _poll(self) -> ExitStatus | None:
        """The run's status if it has ended, else None (raises HostError when unreachable)."""
        run_dir = self.identity.run_dir
        found = (await probe(self.conns, [run_dir]))[run_dir]
        if found.needs_ending:
            out = await self.conns.script("end-lost", run_dir, runfiles.WRAPPER_VANISHED)
            if out.code != 0:
                raise HostError(self._name, f"cannot end a lost run: {decode(out.stderr)}")
        if found.state is RunState.RUNNING:
            return None
        return runfiles.exit_status(found, run_dir)

    async def wait(self) -> ExitStatus:
        if self._status is not None:
            return self._status
        down_since: float | None = None
        polls = 0
        while True:
            if self._lost is not None:
                self._status = ExitStatus(code=None, lost=True, reason=self._lost)
                return self._status
            polls += 1
            ended = self._ended
            try:
                status = await self._poll()
                down_since = None
            except HostError as err:
                down_since = time.monotonic() if down_since is None else down_since
                if self._unreachable_for(down_since) or self.conns.closed:
                    self._give_up(err)
                    continue
                status = None
            if status is not None:
                self._status = status
                return status
            # Poll often at first (short runs, failed starts), then less; an output stream that
            # sees the run end wakes us at once.
            interval = WAIT_POLL if polls <= WAIT_FAST_POLLS else WAIT_POLL_SLOW
            with anyio.move_on_after(interval):
                await ended.wait()

    # ---- the process tree -----------------------------------------------------------------------

    async def signal(self, signum: int) -> None:
        if self.identity.pid <= 1:
            return
        ident = self.identity
        out = await self.conns.script(
            "signal", str(ident.pid), str(ident.start_ticks), _signal_name(signum)
        )
        if out.code != 0:
            raise HostError(self._name, f"cannot signal the run: {decode(out.stderr).strip()}")

    async def _tree(self) -> tuple[list[_TreeRow], int]:
        """The live processes of the run's session, and the host's clock ticks per second."""
        if self.identity.pid <= 1:
            return [], 100
        out = await self.conns.script(
            "tree", str(self.identity.pid), str(self.identity.start_ticks)
        )
        if out.code != 0:
            detail = decode(out.stderr).strip()
            raise HostError(self._name, f"cannot list the run's processes: {detail}")
        rows, hz = [], 100
        for line in decode(out.stdout).splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == "hz" and fields[1].isdigit():
                hz = int(fields[1]) or 100
                continue
            if len(fields) not in (3, 4) or fields[2].startswith("Z"):
                continue  # zombies are dead, only not reaped yet
            try:
                ticks = int(fields[3]) if len(fields) == 4 else None
                rows.append(_TreeRow(int(fields[0]), int(fields[1]), ticks))
            except ValueError:
                continue
        return rows, hz

    async def alive(self) -> bool:
        rows, _ = await self._tree()
        return bool(rows)

    async def stats(self) -> TreeStats:
        rows, hz = await self._tree()
        now = time.monotonic()
        ticks = {r.pid: r.ticks for r in rows if r.ticks is not None}
        seen, self._cpu_seen = self._cpu_seen, (now, ticks)
        cpu: float | None = None
        if seen is not None and now > seen[0]:
            since, before = seen
            used = sum(max(0, t - before.get(pid, 0)) for pid, t in ticks.items())
            cpu = 100.0 * used / hz / (now - since)
        return TreeStats(
            processes=len(rows),
            cpu_percent=cpu,
            rss_bytes=sum(r.rss_kib for r in rows) * 1024,
        )
