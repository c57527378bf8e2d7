"""A Host in memory, for fast in-process tests of the core (``Worker``, ``Fleet``, recovery).

:class:`FakeHost` implements :class:`~supervisor.hosts.base.Host` with scripted runs instead of
processes: each task's runs follow a list of :class:`Script` (exit code, output lines, a
milestone left behind, a usage-limit line, a lost link, a hang), in order, the last repeating,
as ``scripts/fake-agent``'s plans do.  It keeps what the real hosts would show -- run
directories with ``pid`` and ``exit`` files, milestone files in worktrees -- and counts what a
test asserts: every start, and the most runs alive at once.

Its helper commands do nothing and succeed (``git``, ``mkdir``, the claim); what recovery asks
of run directories it answers through ``probe`` and ``scan``, as the hosts do.  The end-to-end
tests stay on the real hosts; this is for the core's logic, in seconds.

A machine that goes away (``Script.away``) behaves as the SSH host does: it reports each change
of its reachability (``unreachable``, then ``back`` and ``up``) to ``on_reachability``'s
callbacks, refuses commands meanwhile, and a run's ``wait`` never gives the run up: it returns
the run's real end once the machine is back.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import math
import posixpath
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio

from supervisor.config import FleetConfig, load_config
from supervisor.hosts.base import (
    Chunk,
    CommandResult,
    ExitStatus,
    Host,
    HostUnreachable,
    Reach,
    ReachChange,
    RunHandle,
    RunIdentity,
    RunSpec,
    Stream,
    TreeStats,
)
from supervisor.hosts.runfiles import RunState, RunStatus


@dataclass(frozen=True)
class Script:
    """One scripted run."""

    exit: int = 0
    stdout: Sequence[str] = ("working",)
    stderr: Sequence[str] = ()
    duration: float = 0.02
    milestone: bool = False
    hang: bool = False
    #: (after, for): this long into the run its machine goes away, for that long (inf: for
    #: good); the run goes on there, its end is read once the machine is back.
    away: tuple[float, float] | None = None
    #: It ends stopped by its watchdog (its lease was not renewed while its machine was away).
    watchdog: bool = False
    #: Its start's answer is lost: the run starts, the machine goes away for this long and
    #: ``start`` raises; (with ``started=False`` the start never reached the machine).
    unanswered: float | None = None
    started: bool = True
    #: A usage limit announced as its last line, resetting this many seconds on.
    limit_in: float | None = None


@dataclass
class Started:
    """What the host saw of one start."""

    issue: int
    run: int
    argv: list[str]
    cwd: str
    run_dir: str
    at: float
    ended_at: float | None = None
    code: int | None = None


class FakeRun(RunHandle):
    """One scripted run: its output is written at start, its end comes after ``duration``
    (never, for a hang) or at a signal."""

    def __init__(self, host: FakeHost, spec: RunSpec, script: Script, started: Started) -> None:
        self.host = host
        self.script = script
        self.started = started
        self.identity = RunIdentity(host.name, spec.run_dir, 10000 + len(host.starts), 1)
        self.cwd = spec.cwd
        self.end_at = time.time() + script.duration
        self._signalled = anyio.Event()
        self._ended = anyio.Event()
        self._status: ExitStatus | None = None
        self._signal_code: int | None = None
        lines = list(script.stdout)
        if script.limit_in is not None:
            reset = math.ceil(time.time() + script.limit_in)
            lines.append(f"Claude AI usage limit reached|{reset}")
        self.data: dict[Stream, bytes] = {
            "stdout": "".join(f"{line}\n" for line in lines).encode(),
            "stderr": "".join(f"{line}\n" for line in script.stderr).encode(),
        }
        host.files.add(posixpath.join(spec.run_dir, "pid"))

    def _finish(self) -> ExitStatus:
        if self._status is not None:
            return self._status
        script = self.script
        if self._signal_code is not None:
            self._status = ExitStatus(self._signal_code)
        elif script.watchdog:
            self._status = ExitStatus(
                143, reason="stopped by the watchdog: lease not renewed for 2s"
            )
        else:
            if script.milestone:
                issue = self.started.issue
                count = sum(1 for f in self.host.files if f"/issue-{issue}-milestone-" in f)
                self.host.files.add(
                    posixpath.join(
                        self.cwd, ".tmp/milestones", f"issue-{issue}-milestone-{count + 1}.md"
                    )
                )
            self._status = ExitStatus(script.exit)
        if not self._status.lost:
            self.host.files.add(posixpath.join(self.identity.run_dir, "exit"))
        self.started.ended_at, self.started.code = time.time(), self._status.code
        self.host.alive.discard(self)
        self._ended.set()
        return self._status

    async def wait(self) -> ExitStatus:
        if self._status is None:
            if self.script.hang:
                await self._signalled.wait()
            else:
                with anyio.move_on_after(max(0.0, self.end_at - time.time())):
                    await self._signalled.wait()
        status = self._finish()
        await self.host.until_up()  # its end is read only once its machine answers again
        return status

    async def output(self, offsets: Mapping[Stream, int] | None = None) -> AsyncIterator[Chunk]:
        start = dict(offsets or {})
        for stream, data in self.data.items():
            at = start.get(stream, 0)
            if at < len(data):
                yield Chunk(stream, data[at:], len(data))
        await self._ended.wait()

    async def signal(self, signum: int) -> None:
        self.host._reachable()
        if self._status is None and self._signal_code is None:
            self._signal_code = 128 + signum
            self._signalled.set()
        if signum == signal.SIGKILL:
            self._finish()

    async def alive(self) -> bool:
        return self._status is None and (self.script.hang or time.time() < self.end_at)

    async def stats(self) -> TreeStats:
        return TreeStats(processes=1, cpu_percent=0.0, rss_bytes=1 << 20)


class FakeHost(Host):
    """A machine in memory (see the module docstring)."""

    def __init__(
        self,
        name: str = "local",
        scripts: Mapping[int, Sequence[Script]] = (),
        *,
        zone: str | None = None,
    ) -> None:
        self.name = name
        self.zone = zone
        self.scripts: dict[int, list[Script]] = {k: list(v) for k, v in dict(scripts).items()}
        self.starts: list[Started] = []
        self.runs: dict[str, FakeRun] = {}
        self.alive: set[FakeRun] = set()
        self.peak = 0
        self.files: set[str] = set()
        self.leases: list[str] = []
        #: Every start asked for, by task (its run numbers), started or not.
        self.attempts: dict[int, list[int]] = {}
        self.commands: list[list[str]] = []
        #: Reported as ``hosts/reach.Reachability`` would; the fleet hears it.
        self.reach = Reach.UP
        self._callbacks: list[Callable[[ReachChange], None]] = []
        self._back: anyio.Event | None = None

    # what a test asserts ----------------------------------------------------------------

    def runs_of(self, issue: int) -> list[Started]:
        return [s for s in self.starts if s.issue == issue]

    def overlapping(self, issue: int) -> bool:
        """Whether two runs of ``issue`` were ever alive at once."""
        runs = self.runs_of(issue)
        return any(
            b.at < (a.ended_at if a.ended_at is not None else float("inf"))
            for a, b in itertools.pairwise(runs)
        )

    # the Host interface ---------------------------------------------------------------------

    # reachability -------------------------------------------------------------------------

    def on_reachability(self, callback: Callable[[ReachChange], None]) -> None:
        self._callbacks.append(callback)

    def _report(self, state: Reach, detail: str = "") -> None:
        change = ReachChange(self.name, state, self.reach, time.time(), detail)
        self.reach = state
        for callback in list(self._callbacks):
            callback(change)

    def go_away(self, seconds: float) -> None:
        """The machine stops answering now, for ``seconds`` (inf: for good)."""
        self._report(Reach.UNREACHABLE, "link lost (fake)")
        if math.isfinite(seconds):
            asyncio.get_running_loop().call_later(seconds, self._come_back)

    def _come_back(self) -> None:
        self._report(Reach.BACK)
        self._report(Reach.UP)
        if self._back is not None:
            self._back.set()
            self._back = None

    async def until_up(self) -> None:
        while self.reach is not Reach.UP:
            if self._back is None:
                self._back = anyio.Event()
            await self._back.wait()

    def _reachable(self) -> None:
        if self.reach is not Reach.UP:
            raise HostUnreachable(self.name, "link lost (fake)")

    async def _execute(
        self, argv: list[str], cwd: str | None, timeout: float, input: bytes | None
    ) -> CommandResult:
        self._reachable()
        self.commands.append(argv)
        return CommandResult(0, "", "")

    async def probe(self, run_dirs: Sequence[str]) -> dict[str, RunStatus]:
        """Each run's state, as the hosts' ``probe`` tells it."""
        self._reachable()
        found = {}
        for run_dir in run_dirs:
            run = self.runs.get(run_dir)
            if run is None:
                found[run_dir] = RunStatus(RunState.GONE)
                continue
            status = run._status
            state = (
                RunState.RUNNING
                if status is None
                else RunState.LOST
                if status.lost
                else RunState.EXITED
            )
            found[run_dir] = RunStatus(
                state,
                None if status is None else status.code,
                run.identity.pid,
                run.identity.start_ticks,
            )
        return found

    async def scan(self, root: str) -> list[str]:
        """Run directories under ``root`` without an ``exit`` file."""
        self._reachable()
        return sorted(
            d
            for d, run in self.runs.items()
            if d.startswith(root.rstrip("/") + "/") and f"{d}/exit" not in self.files
        )

    async def attach_dir(self, run_dir: str) -> RunHandle | None:
        return self.runs.get(run_dir)

    async def timezone(self) -> tzinfo | None:
        """The machine's zone, from its IANA name (``Host.timezone``)."""
        return ZoneInfo(self.zone) if self.zone else None

    async def resolve_path(self, path: str) -> str:
        return path if path.startswith("/") else posixpath.join("/home/fake", path.lstrip("~/"))

    async def exists(self, path: str) -> bool:
        return True

    async def glob(self, directory: str, patterns: Sequence[str]) -> set[str]:
        self._reachable()
        found = set()
        for path in self.files:
            if not path.startswith(directory.rstrip("/") + "/"):
                continue
            rel = path[len(directory.rstrip("/")) + 1 :]
            if any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                found.add(rel)
        return found

    async def start(self, spec: RunSpec) -> RunHandle:
        self._reachable()
        issue = int(spec.env["AGENTIZE_FLEET_ISSUE"])
        number = int(spec.env["AGENTIZE_FLEET_RUN"])
        plan = self.scripts.get(issue) or [Script()]
        script = plan[min(len(self.attempts.setdefault(issue, [])), len(plan) - 1)]
        self.attempts[issue].append(number)
        if script.unanswered is not None and not script.started:
            self.go_away(script.unanswered)
            raise HostUnreachable(self.name, "link lost during the start (fake)")
        started = Started(issue, number, list(spec.argv), spec.cwd, spec.run_dir, time.time())
        self.starts.append(started)
        run = FakeRun(self, spec, script, started)
        self.runs[spec.run_dir] = run
        self.alive.add(run)
        self.peak = max(self.peak, len(self.alive))
        if script.away is not None:
            after, seconds = script.away
            asyncio.get_running_loop().call_later(after, self.go_away, seconds)
        if script.unanswered is not None:
            self.go_away(script.unanswered)
            raise HostUnreachable(self.name, "link lost during the start (fake)")
        return run

    async def attach(self, identity: RunIdentity) -> RunHandle | None:
        return self.runs.get(identity.run_dir)

    async def renew_leases(self, run_dirs: Sequence[str], *, claim: str | None = None) -> None:
        self._reachable()
        self.leases.extend(run_dirs)


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait (bounded) until ``predicate()`` is true."""
    with anyio.fail_after(timeout):
        while True:
            if predicate():
                return
            await anyio.sleep(0.005)


def fake_config(tmp_path: Path, tasks: Sequence[dict[str, Any]], **overrides: Any) -> FleetConfig:
    """A config for in-process fleets: the real loader, fast steps, tiny backoffs."""
    from tests.conftest import deep_merge, to_toml

    base: dict[str, Any] = {
        "name": "inproc",
        "repository": str(tmp_path / "origin"),
        "workspace_root": str(tmp_path / "workspaces"),
        "state_dir": str(tmp_path / "state"),
        "concurrency": 3,
        "start_interval": 0,
        "stop_timeout": 1,
        "lease_timeout": 0,
        "agent": {"command": ["fake-agent", "{prompt}"]},
        "restart": {"backoff_base": 0.02, "backoff_max": 0.05},
        "tasks": list(tasks),
    }
    path = tmp_path / "fleet.toml"
    path.write_text(to_toml(deep_merge(base, overrides)))
    return load_config(path)
