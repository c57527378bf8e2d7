"""A run on an SSH machine, followed through the files of its run directory.

* output and end: the machine's one watcher (``follow.py``) follows every run there; a handle
  only registers its run and waits for what the watcher and the fetches found: no run holds a
  channel.  Offsets count payload bytes only (the login shell's chatter is dropped by the
  frame, see ``connection.py``), so a reader resumes from any byte offset after a reconnect,
  without loss or duplicates.
* signals: ``sh/signal.sh`` (OpenSSH ignores channel signals), guarded by the agent's start
  time in ``/proc/PID/stat`` so that a reused pid is never signalled.
* the process tree: ``sh/tree.sh`` (CPU ticks and RSS of the run's session).
"""

from __future__ import annotations

import signal as signal_module
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from supervisor.hosts.base import (
    Chunk,
    ExitStatus,
    HostError,
    RunHandle,
    RunIdentity,
    Stream,
    TreeStats,
)
from supervisor.hosts.ssh.connection import Connections
from supervisor.hosts.ssh.follow import Follower
from supervisor.hosts.ssh.target import decode


def _signal_name(signum: int) -> str:
    return signal_module.Signals(signum).name.removeprefix("SIG")


@dataclass(frozen=True)
class _TreeRow:
    """One process of a remote run's session, as ``sh/tree.sh`` lists it."""

    pid: int
    rss_kib: int
    ticks: int | None  # CPU ticks used so far (None: /proc could not be read)


class SSHRunHandle(RunHandle):
    """A run on an SSH machine, followed by the machine's watcher while this handle lives.

    It never gives its run up while the machine is away (:attr:`reachability` says so): its
    run directory is its identity, and once the machine is back the watcher finds the run
    again, its output is read on from the offsets held and its real end is read."""

    def __init__(
        self,
        conns: Connections,
        follower: Follower,
        identity: RunIdentity,
        status: ExitStatus | None = None,
    ) -> None:
        """``status``: the run's end, when the caller already read it (an attach to a run
        that has ended)."""
        self.conns = conns
        self.identity = identity
        self.reachability = conns.reach
        self._follower = follower
        self._status: ExitStatus | None = None
        # The last look at the tree's CPU: (monotonic time, CPU ticks by pid).
        self._cpu_seen: tuple[float, dict[int, int]] | None = None
        follower.follow(identity.run_dir, status)
        weakref.finalize(self, follower.unfollow, identity.run_dir)

    def __repr__(self) -> str:
        return (
            f"SSHRunHandle({self.conns.name!r}, {self.identity.run_dir!r}, pid={self.identity.pid})"
        )

    @property
    def _name(self) -> str:
        return self.conns.name

    def output(self, offsets: Mapping[Stream, int] | None = None) -> AsyncIterator[Chunk]:
        return self._follower.read(self.identity.run_dir, offsets)

    async def wait(self) -> ExitStatus:
        if self._status is None:
            self._status = await self._follower.wait(self.identity.run_dir)
        return self._status

    # ---- the process tree -----------------------------------------------------------------------

    async def signal(self, signum: int) -> None:
        """Through the machine's watcher when it runs (no new login: a run can be stopped on a
        machine whose logins hang), else one command; guarded by the agent's start ticks."""
        if self.identity.pid <= 1:
            return
        ident = self.identity
        name = _signal_name(signum)
        if await self._follower.signal(ident.pid, ident.start_ticks, name):
            return
        out = await self.conns.script("signal", str(ident.pid), str(ident.start_ticks), name)
        if out.code != 0:
            raise HostError(self._name, f"cannot signal the run: {decode(out.stderr).strip()}")
        self._follower.poke()  # its end may come at once: the watcher looks now

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
