"""One command for many runs of an SSH machine: their status (``sh/status.sh``, judged by
``hosts/runfiles.py``) and pieces of their output files (``sh/fetch.sh``, each piece with a
length header).  A fleet of fifty runs costs one command per look, not fifty."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from supervisor.hosts import runfiles
from supervisor.hosts.base import HostError, RunStatus
from supervisor.hosts.ssh.connection import Connections
from supervisor.hosts.ssh.target import decode

#: How long a start waits for the wrapper to write the ``pid`` file (seconds); a probe waits
#: as long (and a little more) for a start in flight.
START_TIMEOUT = 10.0
#: Run directories judged by one probe command (keeps the command line short).
PROBE_BATCH = 200


async def probe(conns: Connections, run_dirs: Sequence[str]) -> dict[str, RunStatus]:
    """The status of each run directory, in one command per :data:`PROBE_BATCH`."""
    found: dict[str, RunStatus] = {}
    lock_wait = int(START_TIMEOUT) + 2
    for first in range(0, len(run_dirs), PROBE_BATCH):
        batch = run_dirs[first : first + PROBE_BATCH]
        timeout = conns.target.command_timeout + lock_wait
        out = await conns.script("status", str(lock_wait), *batch, timeout=timeout)
        facts = runfiles.parse_probe(decode(out.stdout))
        missing = [d for d in batch if d not in facts]
        if out.code != 0 or missing:
            detail = decode(out.stderr).strip() or f"exit {out.code}, no facts for {missing[:3]}"
            raise HostError(conns.name, f"cannot read the status of runs: {detail}")
        found.update((d, runfiles.decide(facts[d])) for d in batch)
    return found


@dataclass(frozen=True)
class Piece:
    """One file's part asked of :func:`fetch`: ``limit`` bytes of ``path`` from ``start``."""

    path: str
    start: int
    limit: int


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch` read of a :class:`Piece`: the file's size then (-1: missing) and
    the bytes."""

    size: int
    data: bytes


class FetchError(HostError):
    """A fetch's answer did not add up (a file cut short under it): nothing of it is used."""


def read_pieces(
    data: bytes | bytearray, at: int, count: int, found: list[Fetched]
) -> tuple[int, bool]:
    """Parse pieces (``SIZE LEN`` lines, each followed by LEN bytes) from ``data[at:]`` into
    ``found`` until it holds ``count``: the offset after the last whole piece, and whether all
    are there (if not, call again with more data, from that offset and list: nothing is parsed
    twice).  Raises ValueError for anything else."""
    while len(found) < count:
        eol = data.find(b"\n", at)
        if eol < 0:
            return at, False
        size, length = (int(word) for word in bytes(data[at:eol]).split())
        if length < 0:
            raise ValueError(f"a piece of {length} bytes")
        if len(data) < eol + 1 + length:
            return at, False
        found.append(Fetched(size, bytes(data[eol + 1 : eol + 1 + length])))
        at = eol + 1 + length
    return at, True


def fetch_request(pieces: Sequence[Piece]) -> bytes:
    """The same fetch, asked of the machine's watcher on its stdin (``sh/watch.sh``)."""
    lines = [f"piece {p.start} {p.limit} {p.path}\n" for p in pieces]
    return ("".join(lines) + "fetch\n").encode()


async def fetch(conns: Connections, pieces: Sequence[Piece]) -> list[Fetched]:
    """Read many pieces of files in one command (``sh/fetch.sh``)."""
    args = [word for p in pieces for word in (p.path, str(p.start), str(p.limit))]
    out = await conns.script("fetch", *args)
    found: list[Fetched] = []
    try:
        at, whole = read_pieces(out.stdout, 0, len(pieces), found)
        if not whole:
            raise ValueError("short answer")
        if out.code != 0 or out.stdout[at:] != b"end\n":
            raise ValueError(f"exit {out.code}, trailer {out.stdout[at : at + 20]!r}")
    except ValueError as exc:
        said = decode(out.stderr).strip()[-200:]
        raise FetchError(
            conns.name, f"a fetch of run output did not add up: {exc} {said}"
        ) from None
    return found


@dataclass(eq=False)
class Asked:
    """A fetch (or, without pieces, a signal) asked of the watcher, and its answer as it
    comes."""

    pieces: Sequence[Piece] | None
    found: list[Fetched] = field(default_factory=list)
    at: int = 0  # how far into the answer buffer it was parsed
    started: bool = False  # its `pieces` line came
    error: str = ""
    done: anyio.Event = field(default_factory=anyio.Event)


class Answers:
    """What the watcher's second process says on stderr (``sh/watch.sh``), parsed as it
    comes: ``renewed`` for each renewal, and the answers of fetches and signals, in the order
    asked.
    Anything else breaks it (:attr:`broken` says why): the watcher is then started anew."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.asked: collections.deque[Asked] = collections.deque()
        self.renewed = 0
        self.broken = ""

    def ask(self, pieces: Sequence[Piece] | None) -> Asked:
        """Expect the answer of a fetch of ``pieces`` (None: of a signal) next."""
        asked = Asked(pieces)
        self.asked.append(asked)
        return asked

    def feed(self, data: bytes) -> None:
        self.buffer += data
        try:
            while self._one():
                pass
        except ValueError as exc:
            self.fail(f"the watcher's answer did not add up: {exc}")

    def fail(self, reason: str) -> None:
        """No more answers will come (``reason``): every fetch still asked fails."""
        self.broken = self.broken or reason
        self.buffer.clear()
        while self.asked:
            asked = self.asked.popleft()
            asked.error = reason
            asked.done.set()

    def _one(self) -> bool:
        """Take one whole message from the buffer; False when it needs more bytes."""
        buf = self.buffer
        asked = self.asked[0] if self.asked else None
        if asked is not None and asked.started and asked.pieces is not None:
            at, whole = read_pieces(buf, asked.at, len(asked.pieces), asked.found)
            asked.at = at
            if not whole or len(buf) < at + 4:
                return False
            if buf[at : at + 4] != b"end\n":
                raise ValueError(f"no end after the pieces: {bytes(buf[at : at + 20])!r}")
            del buf[: at + 4]
            self.asked.popleft()
            asked.done.set()
            return True
        eol = buf.find(b"\n")
        if eol < 0:
            return False
        word = bytes(buf[:eol])
        del buf[: eol + 1]
        if word == b"renewed":
            self.renewed += 1
            return True
        if word == b"pieces" and asked is not None and asked.pieces is not None:
            asked.started = True
            return True
        if word == b"signalled" and asked is not None and asked.pieces is None:
            self.asked.popleft()
            asked.done.set()
            return True
        raise ValueError(f"unexpected {word[:60]!r}")
