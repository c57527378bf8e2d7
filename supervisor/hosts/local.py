"""The machine the supervisor runs on.

Runs start through ``runner.sh`` like everywhere else (see ``hosts/base.py``); the wrapper is
our child in a session of its own (so a Ctrl-C at the terminal reaches the supervisor, which
then stops the agents in order, rather than every process at once).  Output is read back from
the run's files in-process, by byte offset: the agent never blocks on a slow supervisor, and a
supervisor that died can be replaced by one that resumes reading where the old one stopped.

Process trees are found with psutil and always checked against the recorded start time, so a
pid reused by an unrelated process is never signalled.  What a run directory says is read
through ``hosts/runfiles.py``, the same rules the SSH host's scripts print facts for.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import glob as globlib
import os
import signal as signals
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import tzinfo
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import psutil

from supervisor import sh
from supervisor.hosts import runfiles, tz
from supervisor.hosts.base import (
    STREAMS,
    Chunk,
    CommandResult,
    ExitStatus,
    Host,
    HostError,
    RunHandle,
    RunIdentity,
    RunSpec,
    RunState,
    RunStatus,
    Stream,
    TreeStats,
)
from supervisor.hosts.dirwatch import DirWatcher
from supervisor.hosts.runfiles import read_small

READ_SIZE = 256 * 1024
# While output flows, read it at most this often (a pass that found a backlog goes on at once).
# Reading as soon as every line lands costs the supervisor a pass per few lines, and the agents
# a wake-up of the reader each; letting 10 ms of output gather makes the reads big and few, at
# a delay nobody watching a log can see.  The end of the run cuts the wait short.
BATCH_WINDOW = 0.01
POLL_MIN = 0.005
POLL_MAX = 0.5
WATCH_SAFETY_POLL = 60.0  # with inotify: re-read anyway this often, should an event be missed
PID_WAIT = 10.0
PID_SAFETY_POLL = 0.05  # with inotify: look for the pid file anyway this often


def use_pidfd_child_watcher() -> None:
    """On Python 3.11, wait for children through pidfds instead of one thread per child.

    3.11's default child watcher starts a thread per subprocess (a fleet of 200 idle agents
    holds 200 threads); Linux's pidfds let the event loop itself wait.  3.12 and later do
    this by themselves.  Call from inside the running event loop.
    """
    if sys.version_info >= (3, 12) or not hasattr(asyncio, "PidfdChildWatcher"):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            watcher = asyncio.PidfdChildWatcher()
            watcher.attach_loop(asyncio.get_running_loop())
            asyncio.get_event_loop_policy().set_child_watcher(watcher)
    except (OSError, RuntimeError, NotImplementedError):
        return  # no pidfd_open (old kernel): keep the default


def _exit_written(run_dir: str) -> bool:
    """The run's end is recorded (a code or ``lost``, written whole)."""
    return runfiles.complete_line(read_small(os.path.join(run_dir, runfiles.EXIT))) is not None


def _no_inherited_descriptors() -> None:
    """Make every descriptor above 2 close on exec.  Ours are (PEP 446), but whatever the
    supervisor inherited (a pipe of the shell or cron that started it) would otherwise reach
    every agent through ``posix_spawn``, which, unlike ``subprocess``, closes nothing."""
    global _descriptors_checked
    if _descriptors_checked:
        return
    _descriptors_checked = True
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)


_descriptors_checked = False
_DEFAULT_SIGNALS = tuple(
    getattr(signals, name)
    for name in ("SIGPIPE", "SIGXFSZ", "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    if hasattr(signals, name)
)
_DEVNULL_ACTIONS = [
    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
]


class WrapperProcess:
    """A run wrapper we started with ``posix_spawn`` and wait for through a pidfd.

    Half the supervisor's CPU per start of an asyncio subprocess (no transport, protocol and
    child watcher per run), which a fleet of a thousand short tasks feels.  Linux 5.3+
    (``pidfd_open``); :meth:`LocalHost.start` falls back to ``anyio.open_process`` elsewhere.
    """

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._lock = anyio.Lock()  # one waiter on the pidfd at a time; the others queue

    @classmethod
    def spawn(cls, argv: list[str], env: Mapping[str, str]) -> WrapperProcess:
        _no_inherited_descriptors()
        pid = os.posix_spawnp(
            argv[0],
            argv,
            env,
            file_actions=_DEVNULL_ACTIONS,
            setsid=True,
            # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across
            # exec: as subprocess's restore_signals does, the run gets the defaults back (an
            # agent's `yes | head` must end by SIGPIPE, not loop on EPIPE).
            setsigdef=_DEFAULT_SIGNALS,
            setsigmask=(),
        )
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            os.kill(pid, signals.SIGKILL)
            os.waitpid(pid, 0)
            if exc.errno == errno.ENOSYS:  # a kernel before 5.3
                raise NotImplementedError("pidfd_open") from exc
            raise
        return cls(pid, pidfd)

    def _poll(self) -> bool:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: its exit file still tells
                pid, status = self.pid, 255 << 8
            if pid == 0:
                return False
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self._pidfd)
        return True

    async def wait(self) -> int:
        async with self._lock:
            while not self._poll():
                await anyio.wait_readable(self._pidfd)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signals.SIGKILL)


class LocalRunHandle(RunHandle):
    """A run on this machine, started by us or found again after a supervisor restart."""

    def __init__(
        self,
        identity: RunIdentity,
        wrapper: anyio.abc.Process | WrapperProcess | None = None,
        watcher: DirWatcher | None = None,
    ) -> None:
        self.identity = identity
        self._wrapper = wrapper
        self._watcher = watcher
        self._ended = anyio.Event()
        self._status: ExitStatus | None = None
        self._procs: dict[int, psutil.Process] = {}

    # the process tree --------------------------------------------------------------------

    def _leader(self) -> psutil.Process | None:
        """The agent's process, if it still lives as the very process we started."""
        ident = self.identity
        if not runfiles.same_process((ident.pid, ident.start_ticks)):
            return None
        try:
            proc = psutil.Process(ident.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def _tree(self) -> list[psutil.Process]:
        """The agent and all it started: its descendants and whatever stayed in its group or
        session (as ``sh/lib.sh``'s ``kill_tree`` reaches them remotely)."""
        leader = self._leader()
        pid = self.identity.pid
        found: dict[int, psutil.Process] = {}
        if leader is not None:
            found[leader.pid] = leader
            with contextlib.suppress(psutil.Error):
                for child in leader.children(recursive=True):
                    found[child.pid] = child
        elif pid <= 1 or runfiles.read_start_ticks(pid) is not None:
            return []  # the pid names another process now: no member of the run is left
        # Members still carry the leader's pid as their group or session id, which the kernel
        # gives no new process while any of them lives: they are the run's, leader gone or not.
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.pid not in found and pid in (os.getpgid(proc.pid), os.getsid(proc.pid)):
                    found[proc.pid] = proc
        return list(found.values())

    async def signal(self, signum: int) -> None:
        for proc in self._tree():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signum)
        if self._leader() is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.identity.pid, signum)

    async def alive(self) -> bool:
        return self._leader() is not None

    async def stats(self) -> TreeStats:
        tree = self._tree()
        cpu = 0.0
        rss = 0
        live: dict[int, psutil.Process] = {}
        for proc in tree:
            cached = self._procs.get(proc.pid, proc)
            with contextlib.suppress(psutil.Error):
                cpu += cached.cpu_percent(interval=None)  # since this object's previous call
                rss += cached.memory_info().rss
                live[proc.pid] = cached
        # psutil's first call for a process says 0.0, whatever it does: no second look, no %.
        sampled = any(pid in self._procs for pid in live)
        self._procs = live
        return TreeStats(processes=len(live), cpu_percent=cpu if sampled else None, rss_bytes=rss)

    # its end -------------------------------------------------------------------------------

    async def wait(self) -> ExitStatus:
        if self._status is not None:
            return self._status
        run_dir = self.identity.run_dir
        if self._wrapper is not None:
            await self._wrapper.wait()
        delay = POLL_MIN
        found = runfiles.local_status(run_dir)
        while found.state is RunState.RUNNING and self._wrapper is None:
            await anyio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)
            found = runfiles.local_status(run_dir)
        if found.needs_ending:
            # The wrapper died without recording the end (someone killed it): nothing of the
            # agent may be left, and the end is written down for every later reader.
            await self.signal(signals.SIGKILL)
            runfiles.write_lost(run_dir, runfiles.WRAPPER_VANISHED)
        # Still "running" after our own wrapper ended: it died before it could write its
        # `wrapper` file, and so before it could start anything.
        status = runfiles.exit_status(found, run_dir) or ExitStatus(
            code=None, lost=True, reason="the run wrapper ended before it started the agent"
        )
        self._status = status
        self._ended.set()
        return status

    # its output ------------------------------------------------------------------------------

    async def output(self, offsets: Mapping[Stream, int] | None = None) -> AsyncIterator[Chunk]:
        start = dict(offsets or {})
        # Plain descriptors, positioned once: the reads are big and few, no buffer helps.
        fds: dict[Stream, int] = {}
        try:
            for stream in STREAMS:
                fds[stream] = os.open(os.path.join(self.identity.run_dir, stream), os.O_RDONLY)
        except OSError:
            for fd in fds.values():
                os.close(fd)
            raise
        watcher = self._watcher
        wd: int | None = None
        if watcher is not None:
            with contextlib.suppress(OSError):
                wd = watcher.add(self.identity.run_dir, STREAMS)
        try:
            position = {s: start.get(s, 0) for s in STREAMS}
            for stream, fd in fds.items():
                os.lseek(fd, position[stream], os.SEEK_SET)
            delay = POLL_MIN
            while True:
                if watcher is not None and wd is not None:
                    watcher.arm(wd)  # before reading to the end: a later write wakes us
                # ``exit`` is written after the agent's group is gone: all output is in the files.
                ended = self._ended.is_set() or _exit_written(self.identity.run_dir)
                got = backlog = False
                for stream, fd in fds.items():
                    while data := os.read(fd, READ_SIZE):
                        got = True
                        position[stream] += len(data)
                        yield Chunk(stream, data, position[stream])
                        if len(data) < READ_SIZE:
                            break
                        backlog = True
                if got:
                    delay = POLL_MIN
                    if ended or backlog:
                        await anyio.lowlevel.checkpoint()
                    else:
                        with anyio.move_on_after(BATCH_WINDOW):
                            await self._ended.wait()
                    continue
                if ended:
                    return
                if watcher is not None and wd is not None:
                    # inotify wakes us when a file changes, the ``exit`` file's arrival included.
                    await watcher.wait(wd, WATCH_SAFETY_POLL)
                    continue
                with anyio.move_on_after(delay):
                    await self._ended.wait()
                delay = min(delay * 2, POLL_MAX)
        finally:
            for fd in fds.values():
                os.close(fd)
            if watcher is not None and wd is not None:
                watcher.remove(wd)


class LocalHost(Host):
    """This machine: subprocesses, files and psutil."""

    def __init__(
        self, name: str = "local", *, use_inotify: bool = True, umask: int | None = None
    ) -> None:
        """``umask``: the agents' (default: the one this process started with, whatever the
        supervisor uses for its own files)."""
        self.name = name
        self._runner = sh.script("runner").encode()
        self._umask = f"{runfiles.USER_UMASK if umask is None else umask:04o}"
        self._use_inotify = use_inotify
        self._watcher: DirWatcher | None = None
        self._dog_dirs: set[str] = set()
        self._spawn = hasattr(os, "pidfd_open")
        # The supervisor never changes its own environment: read (and decode) it once, not at
        # every start of a thousand short runs.
        self._environ = dict(os.environ)

    def _dir_watcher(self) -> DirWatcher | None:
        """The host's inotify watcher, made on first use (None where inotify is unavailable)."""
        if self._watcher is None and self._use_inotify:
            try:
                self._watcher = DirWatcher()
            except (OSError, AttributeError):
                self._use_inotify = False
        return self._watcher

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    async def _execute(
        self, argv: list[str], cwd: str | None, timeout: float, input: bytes | None
    ) -> CommandResult:
        try:
            with anyio.fail_after(timeout):
                done = await anyio.run_process(
                    argv,
                    cwd=cwd,
                    check=False,
                    input=input,
                    stdin=subprocess.DEVNULL if input is None else None,
                )
        except TimeoutError:
            command = " ".join(argv)
            raise HostError(self.name, f"`{command}` took longer than {timeout:g}s") from None
        except OSError as exc:
            raise HostError(self.name, f"cannot run `{argv[0]}`: {exc.strerror}") from None
        return CommandResult(
            done.returncode,
            done.stdout.decode("utf-8", "replace"),
            done.stderr.decode("utf-8", "replace"),
        )

    async def resolve_path(self, path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))

    async def exists(self, path: str) -> bool:
        return os.path.exists(path)

    async def glob(self, directory: str, patterns: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for pattern in patterns:
            folder, name = os.path.split(pattern)
            if globlib.has_magic(folder):
                found.update(globlib.glob(pattern, root_dir=directory))
                continue
            # The usual case (".tmp/milestones/issue-7-milestone-*.md"): one directory listing,
            # or one failed open when the directory does not exist yet.
            try:
                names = os.listdir(os.path.join(directory, folder))
            except OSError:
                continue
            found.update(os.path.join(folder, n) for n in fnmatch.filter(names, name))
        return found

    async def renew_leases(self, run_dirs: Sequence[str], *, claim: str | None = None) -> None:
        for path in runfiles.lease_paths(run_dirs, claim):
            with contextlib.suppress(FileNotFoundError):  # gone: not made again
                os.utime(path)

    async def start(self, spec: RunSpec) -> RunHandle:
        run_dir = Path(spec.run_dir)
        runfiles.make_private_dirs(spec.run_dir)
        if (run_dir / runfiles.WRAPPER).exists():
            raise HostError(self.name, f"run directory {run_dir} already holds a run")
        runner = str(run_dir / runfiles.RUNNER)
        try:
            runfiles.write_private(str(run_dir / runfiles.META), runfiles.format_meta(spec.meta))
            runfiles.write_private(str(run_dir / runfiles.LEASE), "")  # fresh from the start
            with open(runner, "wb", opener=_private) as handle:
                handle.write(self._runner)
            dog_dir = os.path.dirname(spec.lease_path)
            if dog_dir not in self._dog_dirs:  # the watchdog's files live there
                runfiles.make_private_dirs(dog_dir)
                self._dog_dirs.add(dog_dir)
        except OSError as exc:
            raise HostError(self.name, f"cannot prepare run directory {run_dir}: {exc}") from None
        argv = [
            "sh",
            runner,
            spec.run_dir,
            spec.lease_path,
            f"{spec.lease_timeout:g}",
            spec.cwd,
            self._umask,
            "--",
            *spec.argv,
        ]
        env = {**self._environ, **spec.env} if spec.env else self._environ
        # Watched before the wrapper starts: its pid file wakes us the moment it is written
        # (a poll would find it up to its own interval late, and every start waits for it).
        watcher = self._dir_watcher()
        wd: int | None = None
        if watcher is not None:
            with contextlib.suppress(OSError):
                wd = watcher.add(spec.run_dir)
        wrapper: anyio.abc.Process | WrapperProcess
        pid_file = str(run_dir / "pid")
        try:
            try:
                if self._spawn:
                    try:
                        wrapper = WrapperProcess.spawn(argv, env)
                    except (AttributeError, NotImplementedError):  # no pidfd_open/setsid spawn
                        self._spawn = False
                if not self._spawn:
                    wrapper = await anyio.open_process(
                        argv,
                        env=env,
                        start_new_session=True,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
            except OSError as exc:
                raise HostError(
                    self.name, f"cannot start the run wrapper: {exc.strerror}"
                ) from None
            with anyio.move_on_after(PID_WAIT):
                delay = 0.0005
                # The pid file, or the exit file of a wrapper that could not start the agent.
                while (
                    runfiles.parse_pair(read_small(pid_file)) is None
                    and wrapper.returncode is None
                    and not _exit_written(spec.run_dir)
                ):
                    if watcher is not None and wd is not None:
                        await watcher.wait(wd, PID_SAFETY_POLL)
                    else:
                        await anyio.sleep(delay)
                        delay = min(delay * 2, 0.05)
        finally:
            if watcher is not None and wd is not None:
                watcher.remove(wd)
        found = runfiles.parse_pair(read_small(pid_file))
        if found is None:
            # The wrapper could not start the agent (bad cwd, no setsid): it recorded an exit
            # code, or we stop it and report what it wrote.
            if wrapper.returncode is None:
                wrapper.kill()
            await wrapper.wait()
            detail = ""
            with contextlib.suppress(OSError):
                detail = (run_dir / "stderr").read_text(errors="replace").strip()[-300:]
            raise HostError(self.name, f"the run did not start in {spec.cwd}: {detail}")
        pid, ticks = found
        identity = RunIdentity(self.name, spec.run_dir, pid, ticks)
        return LocalRunHandle(identity, wrapper, self._dir_watcher())

    async def attach(self, identity: RunIdentity) -> RunHandle | None:
        if not Path(identity.run_dir).is_dir():
            return None
        return LocalRunHandle(identity, watcher=self._dir_watcher())

    async def attach_dir(self, run_dir: str) -> RunHandle | None:
        found = runfiles.local_status(run_dir)
        with anyio.move_on_after(PID_WAIT):
            # A run still starting (its wrapper spawned, no pid yet): wait for the pid.
            while found.state is RunState.RUNNING and found.pid is None:
                await anyio.sleep(PID_SAFETY_POLL)
                found = runfiles.local_status(run_dir)
        if found.state in (RunState.GONE, RunState.UNSTARTED):
            return None
        identity = RunIdentity(self.name, run_dir, found.pid or 0, found.start_ticks or 0)
        return LocalRunHandle(identity, watcher=self._dir_watcher())

    async def probe(self, run_dirs: Sequence[str]) -> dict[str, RunStatus]:
        return {run_dir: runfiles.local_status(run_dir) for run_dir in run_dirs}

    async def scan(self, root: str) -> list[str]:
        found = []
        for directory, _, files in os.walk(root):
            if (runfiles.WRAPPER in files or runfiles.META in files) and (
                runfiles.EXIT not in files
            ):
                found.append(directory)
        return sorted(found)

    async def timezone(self) -> tzinfo | None:
        return tz.zone_from_facts(tz.local_facts())


def _private(path: str, flags: int) -> int:
    """An ``open`` opener making the file 0600."""
    return os.open(path, flags, 0o600)
