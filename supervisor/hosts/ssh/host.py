"""A machine reached over SSH (asyncssh), through the connections of ``connection.py``.

Runs are started detached through the run wrapper (``sh/runner.sh``, copied into the run
directory by ``sh/start.sh``), in a session of their own, so they survive a lost link and a dead
supervisor; everything about a run is read back from files in its run directory (``run.py``).
"""

from __future__ import annotations

import posixpath
import re
import shlex
import time
from collections.abc import Callable, Sequence
from datetime import tzinfo

import anyio
import structlog

from supervisor import sh
from supervisor.hosts import runfiles, tz
from supervisor.hosts.base import (
    RENEW_BATCH,
    CommandResult,
    Host,
    HostError,
    HostUnreachable,
    Reachability,
    ReachChange,
    RunIdentity,
    RunSpec,
    RunState,
    RunStatus,
)
from supervisor.hosts.ssh.batch import START_TIMEOUT, Piece, fetch, probe
from supervisor.hosts.ssh.connection import Connections
from supervisor.hosts.ssh.follow import Follower
from supervisor.hosts.ssh.run import SSHRunHandle
from supervisor.hosts.ssh.target import SSHTarget, decode, one_line

log = structlog.get_logger(__name__)

#: Extra seconds given to a helper command past its own remote ``timeout`` before giving up.
TIMEOUT_GRACE = 10.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USER_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


class SSHHost(Host):
    """A machine reached over SSH."""

    def __init__(self, target: SSHTarget, *, runner: bytes | None = None) -> None:
        self.target = target
        self.name = target.name
        self.connections = Connections(target)
        self.follower = Follower(self.connections)
        self._runner = runner
        self._home: str | None = None
        self._zone: tzinfo | None = None

    def __repr__(self) -> str:
        return f"SSHHost({self.name!r}, {self.target.host}:{self.target.port})"

    @property
    def reachability(self) -> Reachability:
        """Whether the machine can be reached now (``hosts/reach.py``)."""
        return self.connections.reach

    def on_reachability(self, callback: Callable[[ReachChange], None]) -> None:
        self.connections.reach.subscribe(callback)

    @property
    def connects(self) -> int:
        """Connections opened so far (first one included): a reconnect shows as 2, 3, ..."""
        return self.connections.connects

    async def aclose(self) -> None:
        await self.follower.aclose()
        await self.connections.aclose()

    # ---- short commands -------------------------------------------------------------------------

    async def _execute(
        self, argv: list[str], cwd: str | None, timeout: float, input: bytes | None
    ) -> CommandResult:
        # The remote `timeout` ends a hung command on the machine itself; the local deadline
        # only guards against a link that stays silent.
        words = ["timeout", "-k", "5", _seconds(timeout), *argv]
        if cwd is not None and cwd.startswith("~"):
            cwd = await self.resolve_path(cwd)
        began = time.monotonic()
        # No answer at all by the local deadline: HostSlow (the machine, not the command).
        out = await self.connections.command(
            sh.script("run"), cwd or "", *words, timeout=timeout + TIMEOUT_GRACE, input=input
        )
        code, stdout, stderr, noise = out.code, out.stdout, out.stderr, out.noise
        if code in (124, 137) and time.monotonic() - began >= timeout * 0.99:
            raise HostError(self.name, f"`{shlex.join(argv)}` took longer than {timeout:g}s")
        return CommandResult(code, decode(stdout), decode(stderr), login_noise=decode(noise))

    async def _home_of(self, user: str = "") -> str:
        out = await self.connections.script("home", user)
        home = decode(out.stdout)
        if out.code != 0 or not home.startswith("/"):
            detail = decode(out.stderr).strip()
            raise HostError(
                self.name, f"cannot find the home directory of {user or 'the login'}: {detail}"
            )
        return home

    async def resolve_path(self, path: str) -> str:
        if path.startswith("/"):
            return posixpath.normpath(path)
        if path == "~" or path.startswith("~/"):
            return posixpath.normpath(posixpath.join(await self._home_dir(), path[2:]))
        if path.startswith("~"):
            user, _, rest = path[1:].partition("/")
            if not _USER_NAME.fullmatch(user):
                raise HostError(self.name, f"bad user name in path {path!r}")
            return posixpath.normpath(posixpath.join(await self._home_of(user), rest))
        return posixpath.normpath(posixpath.join(await self._home_dir(), path))

    async def _home_dir(self) -> str:
        if self._home is None:
            self._home = await self._home_of()
        return self._home

    async def _absolute(self, path: str) -> str:
        return path if path.startswith("/") else await self.resolve_path(path)

    async def glob(self, directory: str, patterns: Sequence[str]) -> set[str]:
        if not patterns:
            return set()
        directory = await self._absolute(directory)
        out = await self.connections.script("glob", directory, *patterns)
        if out.code != 0:
            raise HostError(self.name, f"glob in {directory} failed: {decode(out.stderr).strip()}")
        return {decode(p) for p in out.stdout.split(b"\0") if p}

    async def renew_leases(self, run_dirs: Sequence[str], *, claim: str | None = None) -> None:
        """Through the machine's watcher when it runs (its stdin: no new login, so a machine
        whose logins hang while its connections live keeps its runs), else one command."""
        paths = runfiles.lease_paths(run_dirs, claim)
        if not paths or self.follower.renew(paths):
            return
        for first in range(0, len(paths), RENEW_BATCH):
            out = await self.connections.script("renew", *paths[first : first + RENEW_BATCH])
            if out.code != 0:
                detail = decode(out.stderr).strip()
                raise HostError(self.name, f"cannot renew leases: {detail}")

    async def timezone(self) -> tzinfo | None:
        if self._zone is None:
            out = await self.connections.script("timezone")
            self._zone = tz.zone_from_facts(tz.parse_facts(decode(out.stdout)))
        return self._zone

    # ---- runs -----------------------------------------------------------------------------------

    async def start(self, spec: RunSpec) -> SSHRunHandle:
        run_dir = posixpath.normpath(await self._absolute(spec.run_dir))
        lease = await self._absolute(spec.lease_path)
        cwd = await self._absolute(spec.cwd)
        argv = list(spec.argv)
        if not argv:
            raise ValueError("a run needs a command")
        env_words = []
        for key, value in spec.env.items():
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"bad environment variable name {key!r}")
            env_words.append(f"{key}={value}")
        runner_path = posixpath.join(run_dir, runfiles.RUNNER)
        # The wrapper's UMASK is left empty: start.sh starts it with the login's own umask.
        command = ["env", *env_words, "setsid", "sh", runner_path, run_dir, lease,
                   _seconds(spec.lease_timeout), cwd, "", "--", *argv]  # fmt: skip
        runner = self._runner if self._runner is not None else sh.script("runner").encode()
        try:
            out = await self.connections.script(
                "start",
                run_dir,
                lease,
                runfiles.format_meta(spec.meta),
                str(int(START_TIMEOUT)),
                *command,
                timeout=START_TIMEOUT + 30.0,
                input=runner,
                idempotent=False,
            )
            code, answer, err = out.code, out.stdout, out.stderr
        except HostUnreachable as lost:
            # The link died under the start: the run may be running all the same, and must not
            # be left there unknown (its lease, fresh from the start, lets it live a while).
            code, answer, err = 0, await self._recover_start(run_dir, lost), b""
        if code != 0:
            last = decode(err).strip().splitlines()
            raise HostError(
                self.name,
                f"could not start a run in {run_dir}: {last[-1] if last else f'exit {code}'}",
            )
        lines = decode(answer).splitlines()
        found = runfiles.parse_pair(lines[0] + "\n") if lines else None
        if found is None:
            # The wrapper could not start the agent (bad cwd): it recorded an exit status and
            # why on its stderr.
            detail = ""
            try:
                stderr = Piece(posixpath.join(run_dir, "stderr"), 0, 65536)
                detail = one_line(decode((await fetch(self.connections, [stderr]))[0].data))
            except HostError:
                pass
            raise HostError(self.name, f"the run did not start in {cwd}: {detail[-300:]}")
        pid, ticks = found
        identity = RunIdentity(host=self.name, run_dir=run_dir, pid=pid, start_ticks=ticks)
        log.info("run started", machine=self.name, run_dir=run_dir, pid=pid)
        return self._handle(identity)

    def _handle(self, identity: RunIdentity, found: RunStatus | None = None) -> SSHRunHandle:
        """A handle of the run, followed by this machine's watcher (``found``: its status
        just read, which may tell its end already)."""
        ended = runfiles.exit_status(found, identity.run_dir) if found and found.ended else None
        return SSHRunHandle(self.connections, self.follower, identity, ended)

    async def _recover_start(self, run_dir: str, lost: HostUnreachable) -> bytes:
        """After a start whose answer was lost: the run's pid lines, or raise ``lost``."""
        deadline = time.monotonic() + min(self.target.unreachable_after, 30.0)
        delay = 0.5
        while True:
            try:
                out = await self.connections.script(
                    "find-start", run_dir, str(int(START_TIMEOUT)), timeout=START_TIMEOUT + 30
                )
            except HostUnreachable as err:
                if time.monotonic() + delay > deadline:
                    raise HostUnreachable(
                        self.name,
                        f"{lost.message}; the run may have started in {run_dir} "
                        f"and could not be checked: {err.message}",
                    ) from None
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if out.code != 0 or decode(out.stdout).strip() == "none":
                raise lost  # it never started: starting again is safe
            log.info("run found after a lost link", machine=self.name, run_dir=run_dir)
            return out.stdout

    async def attach(self, identity: RunIdentity) -> SSHRunHandle | None:
        found = (await self.probe([identity.run_dir]))[identity.run_dir]
        if found.state is RunState.GONE:
            return None
        return self._handle(identity, found)

    async def attach_dir(self, run_dir: str) -> SSHRunHandle | None:
        run_dir = posixpath.normpath(await self._absolute(run_dir))
        found = (await self.probe([run_dir]))[run_dir]
        with anyio.move_on_after(START_TIMEOUT):
            # A start still in flight without its pid yet (the probe waited for its lock):
            # look again until the wrapper has written it.
            while found.pid is None and found.state is RunState.RUNNING:
                await anyio.sleep(0.2)
                found = (await self.probe([run_dir]))[run_dir]
        if found.state in (RunState.GONE, RunState.UNSTARTED):
            return None
        identity = RunIdentity(self.name, run_dir, found.pid or 0, found.start_ticks or 0)
        return self._handle(identity, found)

    async def probe(self, run_dirs: Sequence[str]) -> dict[str, RunStatus]:
        return await probe(self.connections, run_dirs)

    async def scan(self, root: str) -> list[str]:
        root = await self._absolute(root)
        out = await self.connections.script("scan", root)
        if out.code != 0:
            raise HostError(self.name, f"cannot scan {root}: {decode(out.stderr).strip()}")
        return sorted(set(decode(out.stdout).splitlines()) - {""})
