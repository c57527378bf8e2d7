"""One command for many runs of an SSH machine: their status (``sh/status.sh``, judged by
``hosts/runfiles.py``) and pieces of their output files (``sh/fetch.sh``, each piece with a
length header).  A fleet of fifty runs costs one command per look, not fifty."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


async def fetch(conns: Connections, pieces: Sequence[Piece]) -> list[Fetched]:
    """Read many pieces of files in one command (``sh/fetch.sh``)."""
    args = [word for p in pieces for word in (p.path, str(p.start), str(p.limit))]
    out = await conns.script("fetch", *args)
    data = out.stdout
    found: list[Fetched] = []
    at = 0
    try:
        for _ in pieces:
            eol = data.index(b"\n", at)
            size, length = (int(word) for word in data[at:eol].split())
            at = eol + 1 + length
            if length < 0 or at > len(data):
                raise ValueError("short piece")
            found.append(Fetched(size, data[eol + 1 : at]))
        if out.code != 0 or data[at:] != b"end\n":
            raise ValueError(f"exit {out.code}, trailer {data[at : at + 20]!r}")
    except ValueError as exc:
        said = decode(out.stderr).strip()[-200:]
        raise FetchError(
            conns.name, f"a fetch of run output did not add up: {exc} {said}"
        ) from None
    return found
