"""The one interface between the fleet and the machines it runs agents on.

Everything machine-specific -- how a short command runs, how an agent is started so that it
outlives a lost link or a dead supervisor, how its output is read back, how its whole process
tree is signalled -- sits behind :class:`Host`.  The worker state machine, the restart policy,
milestone detection and the log records are the same code for every machine; only the host
differs (``hosts/local.py`` and ``hosts/ssh.py``).

Every run is started through the same wrapper, ``supervisor/runner.sh``, on every host:

* the agent runs in a session of its own (``setsid``), so its process group id equals its pid
  and the whole tree can be signalled with ``kill -SIG -- -PGID``;
* its stdout and stderr are appended to files in the run directory, so output survives a lost
  link or a dead supervisor and can be read again from any byte offset;
* ``pid`` in the run directory holds ``PID START_TICKS`` (field 22 of ``/proc/PID/stat``) so a
  reused pid is never mistaken for the agent;
* ``exit`` is written atomically when the agent ends, with its exit status;
* a watchdog kills the group when the fleet's lease file has not been touched for
  ``lease_timeout`` seconds: a run never outlives its supervisor unnoticed.
"""

from __future__ import annotations

import abc
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import anyio

Stream = Literal["stdout", "stderr"]
KILL_SETTLE = 5.0  # after SIGKILL, how long to wait for the wrapper to record the end
STREAMS: tuple[Stream, Stream] = ("stdout", "stderr")


#: Ends the lease watchdogs of ``runner.sh`` (argument: the lease file) once every run they
#: guard has ended, rather than at their next look, up to a third of the lease timeout later.  A
#: run still going (on a machine the fleet lost, say) keeps them.  Every watchdog ever started
#: for the lease is listed in ``LEASE.dog.all`` (``LEASE.dog`` names the one in charge): two
#: runs starting at once may each start one, and the one not named would otherwise linger
#: until its next look.
STOP_WATCHDOG = r"""
while read -r rd; do
    [ -e "$rd/exit" ] || exit 0
done <"$1.runs"
f() { t=${20}; }
cat -- "$1.dog.all" "$1.dog" 2>/dev/null | while read -r pid ticks; do
    read -r st <"/proc/$pid/stat" 2>/dev/null || continue
    set -f
    f ${st##*) }
    set +f
    [ "$t" = "$ticks" ] && kill "$pid" 2>/dev/null
done
exit 0
"""


def runner_path() -> Path:
    """The run wrapper shipped with the package (``supervisor/runner.sh``)."""
    return Path(str(resources.files("supervisor").joinpath("runner.sh")))


class HostError(Exception):
    """A machine could not do what was asked; the message names the machine and the cause."""

    def __init__(self, host: str, message: str) -> None:
        super().__init__(f"{host}: {message}")
        self.host = host
        self.message = message


class HostUnreachable(HostError):
    """The machine cannot be reached right now (refused, timed out, link lost)."""


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


@dataclass(frozen=True)
class RunSpec:
    """Everything a host needs to start one run of an agent.

    Paths are paths on the host.  ``argv`` is executed without a shell: each element reaches the
    agent as one argument, whatever characters it holds.
    """

    argv: Sequence[str]
    cwd: str
    run_dir: str
    lease_path: str
    lease_timeout: float
    env: Mapping[str, str] = field(default_factory=dict)


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
class ExitStatus:
    """How a run ended.

    ``code`` is the wrapper's view of the agent's status: 0..255, where 128+N means "killed by
    signal N".  ``lost`` means the run could not be followed to its end (the wrapper vanished,
    the machine stayed unreachable); ``code`` is then ``None``.
    """

    code: int | None
    lost: bool = False
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.lost


@dataclass(frozen=True)
class Chunk:
    """Raw bytes appended to one of a run's output files, ending at byte ``end`` of that file."""

    stream: Stream
    data: bytes
    end: int


@dataclass(frozen=True)
class TreeStats:
    """Resources of a run's whole process tree at one instant."""

    processes: int
    cpu_percent: float
    rss_bytes: int


class RunHandle(abc.ABC):
    """A started (or re-attached) run on some host."""

    identity: RunIdentity

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

    @abc.abstractmethod
    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        check: bool = True,
        timeout: float = 300.0,
    ) -> CommandResult:
        """Run a short helper command to completion (git, mkdir, ...).

        Raises :class:`CommandFailed` when ``check`` and the command exits non-zero.
        """

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
        """Find a run started earlier (by this or a dead supervisor).

        Returns ``None`` when the run directory is gone.  A run that has already ended is
        returned too: its output can still be read and ``wait`` returns its recorded status.
        """

    @abc.abstractmethod
    async def touch_lease(self, path: str) -> None:
        """Renew the fleet's lease so that the wrappers' watchdogs let their runs live."""

    async def aclose(self) -> None:
        """Release connections; running agents are not touched."""
        return None
