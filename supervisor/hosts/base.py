"""The one interface between the fleet and the machines it runs agents on.

Everything machine-specific -- how a short command runs, how an agent is started so that it
outlives a lost link or a dead supervisor, how its output is read back, how its whole process
tree is signalled -- sits behind :class:`Host`.  The worker state machine, the restart policy,
milestone detection and the log records are the same code for every machine; only the host
differs (``hosts/local.py`` and the ``hosts/ssh`` package).

Every run is started through the same wrapper, ``supervisor/sh/runner.sh`` (copied into its run
directory), on every host; the run directory's rules are ``hosts/runfiles.py``'s:

* the agent runs in a session of its own (``setsid``), so its process group id equals its pid
  and the whole tree can be signalled with ``kill -SIG -- -PGID``;
* its stdout and stderr are appended to files in the run directory, so output survives a lost
  link or a dead supervisor and can be read again from any byte offset;
* ``pid`` in the run directory holds ``PID START_TICKS`` (field 22 of ``/proc/PID/stat``) so a
  reused pid is never mistaken for the agent;
* ``wrapper`` holds the wrapper's own ``PID START_TICKS``: it is alive while those match;
* ``exit`` is written when the agent ends, with its exit status, or ``lost`` by whoever finds
  the wrapper gone without it (after killing what was left of the run);
* ``lease`` is the run's own lease, made at its start: the fleet renews it
  (:meth:`Host.renew_leases`) for as long as it supervises the run, and a watchdog (one per
  shift and machine) stops the run once its lease is older than ``lease_timeout``: a run never
  outlives the supervision of its fleet unnoticed.
"""

from __future__ import annotations

import abc
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Literal

import anyio

from supervisor import sh
from supervisor.hosts import runfiles
from supervisor.hosts.reach import Reach, Reachability, ReachChange
from supervisor.hosts.runfiles import ExitStatus, RunState, RunStatus

__all__ = [
    "STOP_WATCHDOG",
    "STREAMS",
    "Chunk",
    "CommandFailed",
    "CommandResult",
    "ExitStatus",
    "Host",
    "HostAuthError",
    "HostError",
    "HostSlow",
    "HostUnreachable",
    "Reach",
    "ReachChange",
    "Reachability",
    "RunHandle",
    "RunIdentity",
    "RunSpec",
    "RunState",
    "RunStatus",
    "Stream",
    "TreeStats",
    "wait_while_reachable",
]

Stream = Literal["stdout", "stderr"]
KILL_SETTLE = 5.0  # after SIGKILL, how long to wait for the wrapper to record the end
RENEW_BATCH = 500  # leases renewed by one command (keeps its command line short)
STREAMS: tuple[Stream, Stream] = ("stdout", "stderr")


#: Ends the lease watchdogs of a shift on a machine once every run they guard has ended
#: (``sh/stop-watchdog.sh``; argument: the shift's ``RunSpec.lease_path`` there).
STOP_WATCHDOG = sh.script("stop-watchdog")


class HostError(Exception):
    """A machine could not do what was asked; the message names the machine and the cause."""

    def __init__(self, host: str, message: str) -> None:
        super().__init__(f"{host}: {message}")
        self.host = host
        self.message = message


class HostUnreachable(HostError):
    """The machine cannot be reached right now (refused, timed out, link lost)."""


class HostSlow(HostUnreachable):
    """The machine's connection lives, but a command (or a login) did not answer within its
    timeout: an overloaded machine, a hung login shell.  A kind of :class:`HostUnreachable`
    -- every caller that copes with an absent machine (retry later, never a crash) copes with
    a slow one the same way -- distinct for those that tell them apart: it is never a run's
    end, and never a reason to give a run up."""


class HostAuthError(HostError):
    """The machine refused our credentials or its host key did not match: retrying will not help."""


class CommandFailed(HostError):
    """A short helper command (git, mkdir, ...) exited non-zero."""

    def __init__(self, host: str, argv: Sequence[str], result: CommandResult) -> None:
        detail = (result.stderr or result.stdout).strip().splitlines()
        last = detail[-1] if detail else ""
        super().__init__(host, f"`{' '.join(argv)}` exited {result.exit_code}: {last}")
        self.argv = list(argv)
        self.result = result


@dataclass(frozen=True)
class CommandResult:
    """What a short helper command printed and how it ended."""

    exit_code: int
    stdout: str
    stderr: str
    #: What the machine's login shell printed before the command ran (a banner, a ``.bashrc``
    #: warning): never part of ``stdout``/``stderr``, kept so that ``check`` can warn of it.
    login_noise: str = ""


@dataclass(frozen=True)
class RunSpec:
    """Everything a host needs to start one run of an agent.

    Paths are paths on the host.  ``argv`` is executed without a shell: each element reaches the
    agent as one argument, whatever characters it holds.  ``lease_path`` names the shift's
    lease watchdog on the machine (its files are ``lease_path.dog``, ``lease_path.runs/``, ...);
    the run's own lease is ``run_dir/lease``.  ``meta`` is written to the run
    directory's ``meta`` file (``task``, ``run``, ``shift``, ``worker``, ``machine``), so that a
    run found by a scan says whose it is.
    """

    argv: Sequence[str]
    cwd: str
    run_dir: str
    lease_path: str
    lease_timeout: float
    env: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunIdentity:
    """Enough to find a run again, from this supervisor or the next one.

    ``start_ticks`` is the process start time in clock ticks since boot, as the kernel reports
    it; together with ``pid`` it names one process for ever, where a bare pid may be reused.
    The process group id equals ``pid`` (the wrapper starts the agent with ``setsid``).
    """

    host: str
    run_dir: str
    pid: int
    start_ticks: int


@dataclass(frozen=True)
class Chunk:
    """Raw bytes appended to one of a run's output files, ending at byte ``end`` of that file."""

    stream: Stream
    data: bytes
    end: int


@dataclass(frozen=True)
class TreeStats:
    """Resources of a run's whole process tree at one instant.

    ``cpu_percent`` is the CPU used since the handle's previous look (100 = one core), and
    ``None`` at the first look: a lifetime average, or psutil's meaningless first 0.0, would
    show an agent spinning at 100% as idle.
    """

    processes: int
    cpu_percent: float | None
    rss_bytes: int


class RunHandle(abc.ABC):
    """A started (or re-attached) run on some host."""

    identity: RunIdentity
    #: Its machine's reachability (``hosts/reach.py``); None for a machine that never changes.
    #: A handle never gives its run up while the machine is away: :meth:`wait` waits for the
    #: machine to be back and the run's end to be read, and the caller decides whether to wait.
    reachability: Reachability | None = None

    @abc.abstractmethod
    def output(self, offsets: Mapping[Stream, int] | None = None) -> AsyncIterator[Chunk]:
        """Yield the run's output as it is written, from the given byte offsets (default 0).

        The iterator ends once the run has ended and both files are drained; it survives lost
        links by resuming from the last byte it yielded.
        """

    @abc.abstractmethod
    async def wait(self) -> ExitStatus:
        """Wait for the run to end and return its status (idempotent)."""

    @abc.abstractmethod
    async def signal(self, signum: int) -> None:
        """Send ``signum`` to the run's whole process tree; a run already gone is not an error."""

    @abc.abstractmethod
    async def alive(self) -> bool:
        """Whether any process of the run's tree still lives."""

    @abc.abstractmethod
    async def stats(self) -> TreeStats:
        """CPU and memory of the run's whole process tree now."""

    async def stop(
        self,
        timeout: float,
        *,
        sooner: anyio.Event | None = None,
        before_kill: Callable[[], object] | None = None,
    ) -> None:
        """The one way a run is stopped: SIGTERM to its whole tree; after ``timeout`` (or as soon
        as ``sooner`` is set: a second Ctrl-C) SIGKILL to whatever of it is left; then a short
        wait for the wrapper to record the end."""
        await self.signal(signal.SIGTERM)
        async with anyio.create_task_group() as race:

            async def cut_short(event: anyio.Event) -> None:
                await event.wait()
                race.cancel_scope.cancel()

            if sooner is not None:
                race.start_soon(cut_short, sooner)
            with anyio.move_on_after(timeout):
                await self.wait()
            race.cancel_scope.cancel()
        if before_kill is not None and await self.alive():
            before_kill()
        await self.signal(signal.SIGKILL)  # also whatever escaped the group, even after the end
        with anyio.move_on_after(KILL_SETTLE):
            await self.wait()


class Host(abc.ABC):
    """A machine that can hold worker clones and run agents."""

    name: str

    def on_reachability(self, callback: Callable[[ReachChange], None]) -> None:
        """Call ``callback`` at each change of the machine's reachability (connecting, up,
        slow, unreachable, back: ``hosts/reach.py``).  This machine never changes: the
        default never calls it."""
        return None

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        check: bool = True,
        timeout: float = 300.0,
        input: bytes | None = None,
    ) -> CommandResult:
        """Run a short helper command to completion (git, mkdir, ...); ``input`` is its
        standard input (default: none) -- content too large for an argument (a file to write).

        Raises :class:`CommandFailed` when ``check`` and the command exits non-zero.  The
        hosts differ only in how they run it (:meth:`_execute`).
        """
        words = list(argv)
        if not words:
            raise ValueError("run() needs a command")
        result = await self._execute(words, cwd, timeout, input)
        if check and result.exit_code != 0:
            raise CommandFailed(self.name, words, result)
        return result

    @abc.abstractmethod
    async def _execute(
        self, argv: list[str], cwd: str | None, timeout: float, input: bytes | None
    ) -> CommandResult:
        """Run ``argv`` (never empty) to its end: its exit code and output, whatever the code;
        :class:`HostError` when it does not end within ``timeout`` seconds or cannot start."""

    @abc.abstractmethod
    async def resolve_path(self, path: str) -> str:
        """Turn ``path`` (possibly ``~``-relative) into an absolute path on the host."""

    async def exists(self, path: str) -> bool:
        """Whether ``path`` exists on the host."""
        result = await self.run(["test", "-e", path], check=False)
        return result.exit_code == 0

    @abc.abstractmethod
    async def glob(self, directory: str, patterns: Sequence[str]) -> set[str]:
        """Paths relative to ``directory`` matching any of the glob ``patterns``."""

    @abc.abstractmethod
    async def start(self, spec: RunSpec) -> RunHandle:
        """Start a run through the wrapper and return once its pid is known."""

    @abc.abstractmethod
    async def attach(self, identity: RunIdentity) -> RunHandle | None:
        """Find a run started earlier (by this or a dead supervisor) by its identity.

        Returns ``None`` when the run directory is gone.  A run that has already ended is
        returned too: its output can still be read and ``wait`` returns its recorded status.
        The identity's pid and start ticks are taken as given (:meth:`attach_dir` reads them).
        """

    @abc.abstractmethod
    async def attach_dir(self, run_dir: str) -> RunHandle | None:
        """Find a run by its directory alone: its pid and start ticks are read from its files
        (a start still in flight is waited for, briefly).  ``None`` when the directory is
        gone or holds a run that never started."""

    @abc.abstractmethod
    async def probe(self, run_dirs: Sequence[str]) -> dict[str, RunStatus]:
        """The status of many runs in one look (one command on a remote machine), by run
        directory.  A start in flight is seen RUNNING, never UNSTARTED."""

    @abc.abstractmethod
    async def scan(self, root: str) -> list[str]:
        """Run directories at any depth under ``root`` that have no ``exit`` file: runs whose
        end nobody recorded (the safety net behind the ledger)."""

    @abc.abstractmethod
    async def timezone(self) -> tzinfo | None:
        """The machine's local time zone (a usage limit's "resets 5pm" is in it), or None when
        it cannot be told."""

    async def renew_leases(self, run_dirs: Sequence[str], *, claim: str | None = None) -> None:
        """Renew the leases of exactly ``run_dirs`` (the runs the fleet supervises here now)
        and the ``claim`` file of the machine's workdir, in one command: the watchdog stops a
        run whose own lease is older than ``lease_timeout``, and another fleet takes a workdir
        whose claim is older than that.  A lease or claim that is gone is not made again."""
        paths = runfiles.lease_paths(run_dirs, claim)
        for first in range(0, len(paths), RENEW_BATCH):
            await self.run(sh.command("renew", *paths[first : first + RENEW_BATCH]), timeout=60)

    async def aclose(self) -> None:
        """Release connections; running agents are not touched."""
        return None


async def wait_while_reachable(handle: RunHandle) -> ExitStatus:
    """The run's end, or a lost status once its machine has been unreachable for its
    ``unreachable_after`` (the run goes on there; the handle would follow it again).

    The rule the fleet applied until it decides for itself what an absent machine means
    (``RunHandle.wait`` no longer gives up): a slow machine is never a reason to stop waiting.
    """
    reach = handle.reachability
    if reach is None:
        return await handle.wait()
    found: ExitStatus | None = None
    async with anyio.create_task_group() as race:

        async def end() -> None:
            nonlocal found
            found = await handle.wait()
            race.cancel_scope.cancel()

        async def away() -> None:
            nonlocal found
            while reach.state is not Reach.UNREACHABLE:
                await reach.changed()
            reason = f"{reach.machine} unreachable for more than {reach.unreachable_after:g}s"
            found = ExitStatus(None, lost=True, reason=f"{reason}: {reach.detail}")
            race.cancel_scope.cancel()

        race.start_soon(end)
        race.start_soon(away)
    assert found is not None
    return found
