"""Machines reached over SSH (asyncssh).

One SSH connection per machine, opened lazily and shared by every run and helper command; a
second (third, ...) connection is opened only when all channels of the open ones are busy, since
OpenSSH allows ``MaxSessions`` (10) channels per connection.  A lost connection is re-opened on
the next use, with capped exponential backoff between failed attempts.

Runs are started detached through ``runner.sh`` (copied into the run directory), in a session of
their own, so they survive a lost link and a dead supervisor; everything about a run is read back
from files in its run directory:

* output: one channel per reader runs ``tail -c +K -F`` on both output files (the channel's
  stdout and stderr carry the two files), so a reader resumes from any byte offset after a
  reconnect, without loss or duplicates; once the run has ended the tails are stopped and the
  remainder of each file is fetched up to its final size, so the last bytes are never lost;
* status: the ``exit`` file, or ``lost`` when the wrapper is gone without writing it;
* signals: a separate ``kill -s SIG -- -PGID`` command (OpenSSH ignores channel signals), guarded
  by the start time of the pid in ``/proc/PID/stat`` so that a reused pid is never signalled.

asyncssh is asyncio-only: this host needs the asyncio backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import re
import shlex
import signal as signal_module
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncssh
import structlog

from supervisor.hosts.base import (
    STREAMS,
    Chunk,
    CommandFailed,
    CommandResult,
    ExitStatus,
    Host,
    HostAuthError,
    HostError,
    HostUnreachable,
    RunHandle,
    RunIdentity,
    RunSpec,
    Stream,
    TreeStats,
    runner_path,
)

log = structlog.get_logger(__name__)

#: Bytes read from a channel stream at a time.
READ_SIZE = 64 * 1024
#: Largest piece of an ended run's output fetched by one command after its stream has stopped.
CATCH_UP_SIZE = 4 * 1024 * 1024
#: How often ``wait()`` looks at the run directory: every WAIT_POLL seconds for the first
#: WAIT_FAST_POLLS looks, then every WAIT_POLL_SLOW seconds (a stream seeing the end wakes it).
WAIT_POLL = 0.5
WAIT_FAST_POLLS = 20
WAIT_POLL_SLOW = 2.0
#: Longest pause between two connection attempts.
MAX_BACKOFF = 30.0
#: How long ``start()`` waits for the wrapper to write the ``pid`` file (seconds).
START_TIMEOUT = 10.0
#: Extra seconds given to a helper command past its own remote ``timeout`` before giving up.
TIMEOUT_GRACE = 10.0


@dataclass(frozen=True)
class SSHTarget:
    """How to reach one SSH machine.

    ``known_hosts``: a path, ``None`` for the default (``~/.ssh/known_hosts``), or the literal
    ``"none"`` to disable host key checking (logged as a warning).  ``ssh_config``: an OpenSSH
    client config file (``Host`` blocks, ``IdentityFile``, ...); when ``None`` asyncssh reads
    ``~/.ssh/config`` if it exists.
    """

    name: str
    host: str
    port: int = 22
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    ssh_config: str | None = None
    connect_timeout: float = 10.0
    keepalive_interval: float = 5.0
    keepalive_count_max: int = 3
    max_channels: int = 8
    unreachable_after: float = 120.0
    #: More connections are opened only when all channels of the open ones are busy.
    max_connections: int = 4


class SSHHostKeyError(HostAuthError):
    """The machine's host key is unknown or has changed."""

    host_key = True


class _LinkLost(HostUnreachable):
    """The link failed under a command; ``started`` tells whether the command had begun."""

    def __init__(self, host: str, message: str, *, started: bool) -> None:
        super().__init__(host, message)
        self.started = started


class SSHLoginError(HostAuthError):
    """The machine refused our credentials, or our key / config files cannot be used."""

    host_key = False


# ---- remote shell snippets ----------------------------------------------------------------------
# Every remote command is `sh -c SCRIPT sh ARG...` with each piece shlex-quoted: the login shell
# (bash, zsh, fish, ...) only ever sees single-quoted words, and the script gets its data as
# positional parameters, never pasted into its text.

# `wrapper_alive RUN_DIR`: the run's wrapper still runs (its pid file names a process whose
# command line holds RUN_DIR as one argument, so a reused pid is not mistaken for it).
_WRAPPER_ALIVE = r"""
wrapper_alive() {
    w=$(cat "$1/wrapper" 2>/dev/null) || return 1
    case $w in '' | *[!0-9]*) return 1 ;; esac
    tr '\000' '\n' <"/proc/$w/cmdline" 2>/dev/null | grep -qxF -- "$1"
}
"""

# `leader_state PID TICKS`: prints "ours" (PID runs and started at TICKS), "other" (PID is
# another process: the run's leader is gone and its pid reused) or "gone".
_LEADER_STATE = r"""
leader_state() {
    case $1 in '' | *[!0-9]* | 0 | 1) echo gone; return ;; esac
    st=
    read -r st <"/proc/$1/stat" 2>/dev/null || st=
    if [ -z "$st" ]; then echo gone; return; fi
    set -f
    set -- "$2" ${st##*) }
    set +f
    if [ "${21:-}" = "$1" ]; then echo ours; else echo other; fi
}
"""

_RUN_IN_DIR = 'cd -- "$1" || exit 1; shift; exec "$@"'

_START = (
    r"""
set -eu
rd=$1
lease=$2
shift 2
command -v setsid >/dev/null 2>&1 || { echo "setsid not found (install util-linux)" >&2; exit 92; }
mkdir -p -- "$rd"
if [ -e "$rd/wrapper" ]; then echo "run directory $rd already holds a run" >&2; exit 90; fi
cat >"$rd/runner.sh"
mkdir -p -- "$(dirname -- "$lease")"
touch -- "$lease"
cd /
"$@" </dev/null >/dev/null 2>&1 &
i=0
while [ ! -s "$rd/pid" ] && [ ! -e "$rd/exit" ]; do
    i=$((i + 1))
    if [ "$i" -gt """
    + str(int(START_TIMEOUT / 0.05))
    + r""" ]; then echo "the wrapper wrote no pid file in $rd" >&2; exit 91; fi
    sleep 0.05
done
cat "$rd/pid" 2>/dev/null || echo
cat "$rd/wrapper" 2>/dev/null || echo
"""
)

# After a start whose answer was lost: "none" if the wrapper never ran, else what _START prints.
_FIND_START = (
    r"""
rd=$1
[ -e "$rd/wrapper" ] || { echo none; exit 0; }
i=0
while [ ! -s "$rd/pid" ] && [ ! -e "$rd/exit" ] && [ "$i" -lt """
    + str(int(START_TIMEOUT / 0.05))
    + r""" ]; do
    i=$((i + 1))
    sleep 0.05
done
cat "$rd/pid" 2>/dev/null || echo
cat "$rd/wrapper" 2>/dev/null || echo
"""
)

# Streams RUN_DIR/stdout from byte $2 (1-based) to the channel's stdout and RUN_DIR/stderr from
# byte $3 to its stderr, until the run has ended.  Exit 0: ended (exit file written); 4: the
# wrapper died without writing it; 3: no such run directory.  When the channel's stdin reaches
# EOF (the reader went away, or the link died) everything it started is stopped.
_STREAM = (
    _WRAPPER_ALIVE
    + r"""
rd=$1
cd -- "$rd" 2>/dev/null || exit 3
exec 3<&0
tail -s 0.5 -c "+$2" -F stdout 2>/dev/null &
a=$!
tail -s 0.5 -c "+$3" -F stderr >&2 2>/dev/null &
b=$!
me=$$
(cat <&3 >/dev/null 2>&1; kill "$a" "$b" "$me" 2>/dev/null) >/dev/null 2>&1 &
c=$!
exec 3<&-
code=0
w=$(cat wrapper 2>/dev/null) || w=
n=0
while [ ! -e exit ]; do
    n=$((n + 1))
    # kill -0 is cheap; every 5 s also make sure the pid was not reused by another process
    if [ -z "$w" ] || ! kill -0 "$w" 2>/dev/null ||
        { [ $((n % 25)) -eq 0 ] && ! wrapper_alive "$rd"; }; then
        [ -e exit ] || code=4
        break
    fi
    sleep 0.2
done
kill "$c" 2>/dev/null
kill "$a" "$b" 2>/dev/null
wait "$a" "$b" 2>/dev/null
exit "$code"
"""
)

# Prints "gone" (no run directory), "exit CODE", "running" or "dead"; then the wrapper's note.
_STATUS = (
    _WRAPPER_ALIVE
    + r"""
rd=$1
[ -d "$rd" ] || { echo gone; exit 0; }
if [ -s "$rd/exit" ]; then
    state="exit $(cat "$rd/exit")"
elif wrapper_alive "$rd"; then
    state=running
elif [ -s "$rd/exit" ]; then
    state="exit $(cat "$rd/exit")"
else
    state=dead
fi
echo "$state"
cat "$rd/note" 2>/dev/null || true
"""
)

_SIGNAL = (
    _LEADER_STATE
    + r"""
pid=$1
ticks=$2
sig=$3
case $(leader_state "$pid" "$ticks") in
ours) kill -s "$sig" -- "-$pid" 2>/dev/null || true ;;
other) exit 0 ;;
esac
# Processes that left the group but not the session (a session id cannot be reused while any
# process of it lives, so these are the run's).
if command -v pkill >/dev/null 2>&1; then pkill "-$sig" -s "$pid" 2>/dev/null || true; fi
exit 0
"""
)

_TREE = (
    _LEADER_STATE
    + r"""
pid=$1
[ "$(leader_state "$pid" "$2")" != other ] || exit 0
echo "hz $(getconf CLK_TCK 2>/dev/null || echo 100)"
# Each process of the session, with the CPU ticks it has used (utime + stime, fields 14 and 15
# of /proc/PID/stat): two looks give its CPU% in between, where ps's %CPU is a lifetime average.
ps -o pid=,rss=,pcpu=,stat= -s "$pid" 2>/dev/null | while read -r p r c s; do
    t=""
    if read -r st <"/proc/$p/stat" 2>/dev/null; then
        set -f
        set -- ${st##*) }
        set +f
        t=$((${12} + ${13}))
    fi
    echo "$p $r $c $s $t"
done
"""
)

_GLOB = r"""
cd -- "$1" 2>/dev/null || exit 0
shift
IFS=
for p in "$@"; do
    for f in $p; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
    done
done
"""

_TOUCH = 'mkdir -p -- "$(dirname -- "$1")" && touch -- "$1"'


def _sh(script: str, *args: str) -> str:
    """The command line running ``script`` under ``sh`` with ``args`` as $1, $2, ..."""
    return shlex.join(["sh", "-c", script, "sh", *args])


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _as_bytes(data: bytes | str | None) -> bytes:
    if data is None:
        return b""
    if isinstance(data, str):
        return data.encode()
    return data


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def _signal_name(signum: int) -> str:
    return signal_module.Signals(signum).name.removeprefix("SIG")


def runner_script() -> bytes:
    """The run wrapper shipped with the package."""
    return runner_path().read_bytes()


class _Link:
    """One SSH connection and how many of its channels are in use."""

    def __init__(self, conn: asyncssh.SSHClientConnection, number: int) -> None:
        self.conn = conn
        self.number = number
        self.busy = 0

    @property
    def alive(self) -> bool:
        return not self.conn.is_closed()


class SSHHost(Host):
    """A machine reached over SSH."""

    def __init__(self, target: SSHTarget, *, runner: bytes | None = None) -> None:
        if target.max_channels < 1 or target.max_connections < 1:
            raise ValueError("max_channels and max_connections must be at least 1")
        self.target = target
        self.name = target.name
        self._runner = runner
        self._links: list[_Link] = []
        self._connect_lock = asyncio.Lock()
        self._freed = asyncio.Event()
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: HostError | None = None
        self._home: str | None = None
        self._closed = False
        #: Connections opened so far (first one included): a reconnect shows as 2, 3, ...
        self.connects = 0
        if target.known_hosts == "none":
            log.warning(
                "ssh host key checking disabled",
                machine=target.name,
                host=target.host,
                hint="known_hosts = 'none': anyone on the path can impersonate this machine",
            )

    def __repr__(self) -> str:
        return f"SSHHost({self.name!r}, {self.target.host}:{self.target.port})"

    # ---- connections ----------------------------------------------------------------------------

    def _where(self) -> str:
        user = f"{self.target.user}@" if self.target.user else ""
        return f"{user}{self.target.host}:{self.target.port}"

    def _options(self) -> dict[str, Any]:
        """Arguments for ``asyncssh.connect``; bad local files raise :class:`SSHLoginError`."""
        t = self.target
        kwargs: dict[str, Any] = {
            "port": t.port,
            "connect_timeout": t.connect_timeout,
            "login_timeout": max(t.connect_timeout, 1.0),
            "keepalive_interval": t.keepalive_interval,
            "keepalive_count_max": t.keepalive_count_max,
        }
        if t.user:
            kwargs["username"] = t.user
        if t.identity_file:
            path = os.path.expanduser(t.identity_file)
            try:
                asyncssh.read_private_key(path)
            except (OSError, asyncssh.KeyImportError) as exc:
                raise SSHLoginError(
                    self.name, f"cannot use identity_file {t.identity_file}: {exc}"
                ) from None
            kwargs["client_keys"] = [path]
        if t.known_hosts == "none":
            kwargs["known_hosts"] = None
        elif t.known_hosts:
            path = os.path.expanduser(t.known_hosts)
            if not os.path.isfile(path):
                raise SSHHostKeyError(
                    self.name,
                    f"known_hosts file {t.known_hosts} does not exist: create it with "
                    f"`ssh-keyscan -p {t.port} {t.host} >> {t.known_hosts}` "
                    "after checking the key with the machine's owner",
                )
            kwargs["known_hosts"] = path
        if t.ssh_config:
            path = os.path.expanduser(t.ssh_config)
            if not os.path.isfile(path):
                raise SSHLoginError(self.name, f"ssh_config file {t.ssh_config} does not exist")
            kwargs["config"] = [path]
        return kwargs

    def _connect_error(self, exc: BaseException) -> HostError:
        """One clear line for a failed connection attempt."""
        t = self.target
        where = self._where()
        if isinstance(exc, HostError):
            return exc
        if isinstance(exc, asyncssh.PermissionDenied):
            user = t.user or "(default user)"
            key = t.identity_file or "default keys / ssh-agent"
            return SSHLoginError(
                self.name,
                f"authentication failed for user {user} (key {key}) at {where}: "
                "check identity_file / ssh-agent and the machine's authorized_keys",
            )
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            known = t.known_hosts or "~/.ssh/known_hosts"
            pattern = t.host if t.port == 22 else f"[{t.host}]:{t.port}"
            return SSHHostKeyError(
                self.name,
                f"host key of {t.host}:{t.port} is not in known_hosts ({known}) or has changed: "
                f"if the machine was reinstalled remove the old key with "
                f"`ssh-keygen -R '{pattern}' -f {known}`, then add the new one with "
                f"`ssh-keyscan -p {t.port} {t.host} >> {known}` after checking it",
            )
        if isinstance(exc, asyncssh.ConfigParseError):
            return SSHLoginError(self.name, f"bad ssh_config {t.ssh_config}: {exc}")
        if isinstance(exc, asyncssh.KeyImportError):
            return SSHLoginError(self.name, f"cannot load a client key: {exc}")
        if isinstance(exc, socket.gaierror):
            return HostUnreachable(self.name, f"cannot resolve host name {t.host!r}: {exc}")
        if isinstance(exc, ConnectionRefusedError):
            return HostUnreachable(self.name, f"connection refused at {where} (is sshd running?)")
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            return HostUnreachable(
                self.name, f"timed out after {t.connect_timeout:g}s connecting to {where}"
            )
        if isinstance(exc, asyncssh.DisconnectError):
            return HostUnreachable(self.name, f"disconnected by {where}: {exc.reason or exc}")
        if isinstance(exc, OSError):
            return HostUnreachable(self.name, f"cannot connect to {where}: {exc.strerror or exc}")
        return HostUnreachable(self.name, f"cannot connect to {where}: {type(exc).__name__}: {exc}")

    def _link_error(self, exc: BaseException) -> HostError:
        """One clear line for a channel that failed on an open connection."""
        if isinstance(exc, HostError):
            return exc
        if isinstance(exc, asyncssh.ChannelOpenError):
            return HostUnreachable(self.name, f"cannot open an SSH channel: {exc.reason or exc}")
        if isinstance(exc, asyncssh.DisconnectError):
            return HostUnreachable(self.name, f"SSH link lost: {exc.reason or exc}")
        if isinstance(exc, OSError):
            return HostUnreachable(self.name, f"SSH link lost: {exc.strerror or exc}")
        return HostUnreachable(self.name, f"SSH link failed: {type(exc).__name__}: {exc}")

    async def _open(self) -> _Link:
        """Open one more connection, unless the last attempt failed too recently."""
        now = time.monotonic()
        if self._last_error is not None and now < self._retry_at:
            err = self._last_error
            raise type(err)(self.name, err.message)
        try:
            options = self._options()
            async with asyncio.timeout(self.target.connect_timeout + 5.0):
                conn = await asyncssh.connect(self.target.host, **options)
        except (TimeoutError, Exception) as exc:  # every cause is mapped to one line
            err = self._connect_error(exc)
            self._failures += 1
            self._retry_at = time.monotonic() + min(MAX_BACKOFF, 0.5 * 2 ** (self._failures - 1))
            self._last_error = err
            log.debug("ssh connect failed", machine=self.name, error=err.message)  # raised below
            raise err from None
        self._failures = 0
        self._last_error = None
        self.connects += 1
        if self.connects > 1:
            log.info("ssh reconnected", machine=self.name, connection=self.connects)
        return _Link(conn, self.connects)

    def _free_link(self) -> _Link | None:
        self._links = [link for link in self._links if link.alive]
        for link in self._links:
            if link.busy < self.target.max_channels:
                return link
        return None

    async def _acquire(self) -> _Link:
        while True:
            if self._closed:
                raise HostUnreachable(self.name, "the SSH host was closed")
            link = self._free_link()
            if link is None and len(self._links) < self.target.max_connections:
                async with self._connect_lock:
                    link = self._free_link()
                    if link is None and not self._closed:
                        link = await self._open()
                        self._links.append(link)
            if link is not None:
                link.busy += 1
                return link
            self._freed.clear()
            await self._freed.wait()

    def _release(self, link: _Link) -> None:
        link.busy -= 1
        self._freed.set()

    @contextlib.asynccontextmanager
    async def _channel(self) -> AsyncIterator[asyncssh.SSHClientConnection]:
        """A connection with one channel slot reserved for the caller."""
        link = await self._acquire()
        try:
            yield link.conn
        finally:
            self._release(link)

    async def connect(self) -> None:
        """Open the connection now (``run`` and friends open it on first use anyway)."""
        async with self._channel():
            pass

    async def aclose(self) -> None:
        self._closed = True
        links, self._links = self._links, []
        for link in links:
            link.conn.close()
        for link in links:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await link.conn.wait_closed()
        self._freed.set()

    # ---- short commands -------------------------------------------------------------------------

    async def _exec(
        self,
        command: str,
        *,
        timeout: float,
        input: bytes | None = None,
        idempotent: bool = False,
    ) -> tuple[int, bytes, bytes]:
        """Run ``command`` (a full command line) and return its status and raw output.

        A command whose channel could not even be opened (the connection had just died) is
        retried once on a fresh connection; an ``idempotent`` one also when the link died
        while it ran.
        """
        try:
            return await self._exec_once(command, timeout=timeout, input=input)
        except _LinkLost as err:
            if self._closed or (err.started and not idempotent):
                raise
            log.info("ssh command retried after a lost link", machine=self.name, error=err.message)
            return await self._exec_once(command, timeout=timeout, input=input)

    async def _exec_once(
        self, command: str, *, timeout: float, input: bytes | None
    ) -> tuple[int, bytes, bytes]:
        async with self._channel() as conn:
            process: asyncssh.SSHClientProcess[bytes] | None = None
            try:
                async with asyncio.timeout(timeout):
                    if input is None:
                        process = await conn.create_process(
                            command, encoding=None, stdin=asyncssh.DEVNULL
                        )
                    else:
                        process = await conn.create_process(command, encoding=None, input=input)
                    result = await process.wait()
            except TimeoutError:
                if process is not None:
                    process.close()  # the command may go on remotely; its channel is let go
                raise
            except (asyncssh.Error, OSError) as exc:
                err = self._link_error(exc)
                raise _LinkLost(self.name, err.message, started=process is not None) from None
        if result.exit_signal is not None:
            name = result.exit_signal[0]
            try:
                code = 128 + int(signal_module.Signals[f"SIG{name}"])
            except KeyError:
                code = 255
        elif result.exit_status is None or result.exit_status < 0:
            # No exit status at all: the channel was closed under the command.
            raise _LinkLost(self.name, "SSH link lost while a command ran", started=True)
        else:
            code = result.exit_status
        return code, _as_bytes(result.stdout), _as_bytes(result.stderr)

    async def _script(
        self,
        script: str,
        *args: str,
        timeout: float = 60.0,
        input: bytes | None = None,
        idempotent: bool = True,
    ) -> tuple[int, bytes, bytes]:
        """Run one of this module's shell snippets (they are idempotent unless told)."""
        try:
            return await self._exec(
                _sh(script, *args), timeout=timeout, input=input, idempotent=idempotent
            )
        except TimeoutError:
            raise HostUnreachable(
                self.name, f"no answer within {timeout:g}s to a helper command"
            ) from None

    async def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        check: bool = True,
        timeout: float = 300.0,
    ) -> CommandResult:
        argv = list(argv)
        if not argv:
            raise ValueError("run() needs a command")
        # The remote `timeout` ends a hung command on the machine itself; the local deadline
        # only guards against a link that stays silent.
        words = ["timeout", "-k", "5", _seconds(timeout), *argv]
        if cwd is not None:
            cwd = await self.resolve_path(cwd) if cwd.startswith("~") else cwd
            command = shlex.join(["sh", "-c", _RUN_IN_DIR, "sh", cwd, *words])
        else:
            command = shlex.join(words)
        began = time.monotonic()
        try:
            code, out, err = await self._exec(command, timeout=timeout + TIMEOUT_GRACE)
        except TimeoutError:
            code, out, err = 124, b"", b""
        if code in (124, 137) and time.monotonic() - began >= timeout * 0.99:
            raise HostError(self.name, f"`{shlex.join(argv)}` took longer than {timeout:g}s")
        result = CommandResult(exit_code=code, stdout=_decode(out), stderr=_decode(err))
        if check and code != 0:
            raise CommandFailed(self.name, argv, result)
        return result

    async def _home_dir(self) -> str:
        if self._home is None:
            code, out, err = await self._script('printf %s "$HOME"')
            home = _decode(out)
            if code != 0 or not home.startswith("/"):
                code, out, err = await self._script("cd && pwd -P")
                home = _decode(out).strip()
            if not home.startswith("/"):
                raise HostError(self.name, f"cannot find the home directory: {_decode(err)}")
            self._home = home
        return self._home

    async def resolve_path(self, path: str) -> str:
        if path.startswith("/"):
            return posixpath.normpath(path)
        if path == "~" or path.startswith("~/"):
            return posixpath.normpath(posixpath.join(await self._home_dir(), path[2:]))
        if path.startswith("~"):
            user, _, rest = path[1:].partition("/")
            if not re.fullmatch(r"[A-Za-z0-9._][A-Za-z0-9._-]*", user):
                raise HostError(self.name, f"bad user name in path {path!r}")
            code, out, err = await self._script(f"cd ~{user} && pwd -P")
            home = _decode(out).strip()
            if code != 0 or not home.startswith("/"):
                raise HostError(self.name, f"cannot expand {path!r}: {_decode(err).strip()}")
            return posixpath.normpath(posixpath.join(home, rest))
        return posixpath.normpath(posixpath.join(await self._home_dir(), path))

    async def _absolute(self, path: str) -> str:
        return path if path.startswith("/") else await self.resolve_path(path)

    async def glob(self, directory: str, patterns: Sequence[str]) -> set[str]:
        if not patterns:
            return set()
        directory = await self._absolute(directory)
        code, out, err = await self._script(_GLOB, directory, *patterns)
        if code != 0:
            raise HostError(self.name, f"glob in {directory} failed: {_decode(err).strip()}")
        return {_decode(p) for p in out.split(b"\0") if p}

    async def touch_lease(self, path: str) -> None:
        path = await self._absolute(path)
        code, _, err = await self._script(_TOUCH, path, timeout=30.0)
        if code != 0:
            raise HostError(self.name, f"cannot touch lease {path}: {_decode(err).strip()}")

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
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"bad environment variable name {key!r}")
            env_words.append(f"{key}={value}")
        runner_path = posixpath.join(run_dir, "runner.sh")
        command = [
            "env",
            *env_words,
            "setsid",
            "sh",
            runner_path,
            run_dir,
            lease,
            _seconds(spec.lease_timeout),
            cwd,
            "--",
            *argv,
        ]
        runner = self._runner if self._runner is not None else runner_script()
        try:
            code, out, err = await self._script(
                _START,
                run_dir,
                lease,
                *command,
                timeout=START_TIMEOUT + 30.0,
                input=runner,
                idempotent=False,
            )
        except HostUnreachable as lost:
            # The link died under the start: the run may be running all the same, and must not
            # be left there unknown (the fleet's lease would keep it alive).  Look again.
            code, out, err = 0, await self._recover_start(run_dir, lost), b""
        if code != 0:
            last = _decode(err).strip().splitlines()
            raise HostError(
                self.name,
                f"could not start a run in {run_dir}: {last[-1] if last else f'exit {code}'}",
            )
        lines = _decode(out).splitlines()
        fields = lines[0].split() if lines else []
        if not (len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit()):
            # The wrapper could not start the agent (bad cwd): it recorded an exit status and
            # why on its stderr.
            handle = SSHRunHandle(self, RunIdentity(self.name, run_dir, 0, 0))
            detail = ""
            with contextlib.suppress(HostError):
                detail = _one_line(_decode(await handle._read_rest("stderr", 0, 64 * 1024)))[-300:]
            raise HostError(self.name, f"the run did not start in {cwd}: {detail}")
        pid, ticks = int(fields[0]), int(fields[1])
        identity = RunIdentity(host=self.name, run_dir=run_dir, pid=pid, start_ticks=ticks)
        log.info("run started", machine=self.name, run_dir=run_dir, pid=pid)
        return SSHRunHandle(self, identity)

    async def _recover_start(self, run_dir: str, lost: HostUnreachable) -> bytes:
        """After a start whose answer was lost: the run's pid lines, or raise ``lost``."""
        deadline = time.monotonic() + min(self.target.unreachable_after, 30.0)
        delay = 0.5
        while True:
            try:
                code, out, _ = await self._script(_FIND_START, run_dir, timeout=START_TIMEOUT + 30)
            except HostUnreachable as err:
                if time.monotonic() + delay > deadline:
                    raise HostUnreachable(
                        self.name,
                        f"{lost.message}; the run may have started in {run_dir} "
                        f"and could not be checked: {err.message}",
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if code != 0 or _decode(out).strip() == "none":
                raise lost  # it never started: starting again is safe
            log.info("run found after a lost link", machine=self.name, run_dir=run_dir)
            return out

    async def attach(self, identity: RunIdentity) -> SSHRunHandle | None:
        code, out, _ = await self._script('[ -d "$1" ] && echo yes || echo no', identity.run_dir)
        if code != 0 or _decode(out).strip() != "yes":
            return None
        return SSHRunHandle(self, identity)


@dataclass
class _Stop:
    """How a stream channel ended."""

    code: int | None
    link_error: HostError | None = None


@dataclass(frozen=True)
class _TreeRow:
    """One process of a remote run's session, as ``_TREE`` lists it."""

    pid: int
    rss_kib: int
    lifetime_cpu: float  # ps's %CPU: CPU time over the process's whole life
    ticks: int | None  # CPU ticks used so far (None: /proc could not be read)


class SSHRunHandle(RunHandle):
    """A run on an SSH machine, followed through the files of its run directory."""

    def __init__(self, host: SSHHost, identity: RunIdentity) -> None:
        self.host = host
        self.identity = identity
        self._status: ExitStatus | None = None
        self._lost: str | None = None
        # Set when an output stream saw the run end: wait() looks again at once.
        self._ended = asyncio.Event()
        # The last look at the tree's CPU: (monotonic time, CPU ticks by pid).
        self._cpu_seen: tuple[float, dict[int, int]] | None = None

    def __repr__(self) -> str:
        return (
            f"SSHRunHandle({self.host.name!r}, {self.identity.run_dir!r}, pid={self.identity.pid})"
        )

    @property
    def _name(self) -> str:
        return self.host.name

    def _unreachable_for(self, since: float) -> bool:
        return time.monotonic() - since > self.host.target.unreachable_after

    def _give_up(self, err: HostError) -> None:
        self._lost = (
            f"{self._name} unreachable for more than "
            f"{self.host.target.unreachable_after:g}s: {err.message}"
        )
        log.warning(
            "run lost", machine=self._name, run_dir=self.identity.run_dir, reason=self._lost
        )

    # ---- output ---------------------------------------------------------------------------------

    async def output(self, offsets: Mapping[Stream, int] | None = None) -> AsyncIterator[Chunk]:
        pos: dict[Stream, int] = {s: int((offsets or {}).get(s, 0)) for s in STREAMS}
        down_since: float | None = None
        attempt = 0
        while True:
            if self._lost is not None or self.host._closed:
                return
            stop = _Stop(code=None)
            try:
                async with self.host._channel() as conn:
                    down_since, attempt = None, 0
                    async with contextlib.aclosing(self._stream(conn, pos, stop)) as chunks:
                        async for chunk in chunks:
                            yield chunk
                if stop.link_error is not None:
                    raise stop.link_error
                if stop.code not in (0, 3, 4):
                    raise HostUnreachable(self._name, f"output stream ended with {stop.code}")
                self._ended.set()
                if stop.code == 3:
                    return  # the run directory is gone: nothing left to read
                # The run has ended: fetch whatever the tails had not delivered yet.
                for stream in STREAMS:
                    while True:
                        rest = await self._read_rest(stream, pos[stream], CATCH_UP_SIZE)
                        if rest:
                            pos[stream] += len(rest)
                            yield Chunk(stream=stream, data=rest, end=pos[stream])
                        if len(rest) < CATCH_UP_SIZE:
                            break
                return
            except HostError as err:
                if self.host._closed:
                    return
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                if self._unreachable_for(down_since):
                    self._give_up(err)
                    return
                log.info(
                    "output stream interrupted, resuming",
                    machine=self._name,
                    run_dir=self.identity.run_dir,
                    error=err.message,
                    offsets=dict(pos),
                )
                await asyncio.sleep(min(0.25 * 2**attempt, 5.0))
                attempt += 1

    async def _stream(
        self, conn: asyncssh.SSHClientConnection, pos: dict[Stream, int], stop: _Stop
    ) -> AsyncGenerator[Chunk, None]:
        """Yield what one stream channel delivers, updating ``pos``; record how it ended."""
        command = _sh(
            _STREAM, self.identity.run_dir, str(pos["stdout"] + 1), str(pos["stderr"] + 1)
        )
        try:
            process = await conn.create_process(command, encoding=None)
        except (asyncssh.Error, OSError) as exc:
            stop.link_error = self.host._link_error(exc)
            return
        readers: dict[Stream, asyncio.Task[bytes]] = {}
        try:
            sources: dict[Stream, asyncssh.SSHReader[bytes]] = {
                "stdout": process.stdout,
                "stderr": process.stderr,
            }
            readers = {s: asyncio.ensure_future(sources[s].read(READ_SIZE)) for s in STREAMS}
            while readers:
                await asyncio.wait(readers.values(), return_when=asyncio.FIRST_COMPLETED)
                for stream in STREAMS:
                    task = readers.get(stream)
                    if task is None or not task.done():
                        continue
                    try:
                        data = task.result()
                    except (asyncssh.Error, OSError) as exc:
                        stop.link_error = self.host._link_error(exc)
                        return
                    if not data:
                        del readers[stream]
                        continue
                    readers[stream] = asyncio.ensure_future(sources[stream].read(READ_SIZE))
                    pos[stream] += len(data)
                    yield Chunk(stream=stream, data=_as_bytes(data), end=pos[stream])
            try:
                async with asyncio.timeout(10.0):
                    await process.wait_closed()
            except (asyncssh.Error, OSError, TimeoutError):
                pass
            stop.code = process.exit_status
            if stop.code is None:
                stop.link_error = HostUnreachable(
                    self._name, "SSH link lost while streaming output"
                )
        finally:
            for task in readers.values():
                task.cancel()
            for task in readers.values():
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(Exception):
                process.stdin.write_eof()
            with contextlib.suppress(Exception):
                process.close()

    async def _read_rest(self, stream: Stream, offset: int, limit: int) -> bytes:
        """At most ``limit`` bytes of one output file, from byte ``offset``."""
        path = posixpath.join(self.identity.run_dir, stream)
        code, out, err = await self.host._script(
            '[ -e "$1" ] || exit 0; tail -c "+$2" -- "$1" | head -c "$3"',
            path,
            str(offset + 1),
            str(limit),
        )
        if code != 0:
            raise HostError(self._name, f"cannot read {path}: {_decode(err).strip()}")
        return out

    # ---- status ---------------------------------------------------------------------------------

    async def _poll(self) -> ExitStatus | None:
        """The run's status if it has ended, else None (raises HostError when unreachable)."""
        code, out, err = await self.host._script(_STATUS, self.identity.run_dir)
        if code != 0:
            raise HostError(self._name, f"cannot read the run's status: {_decode(err).strip()}")
        state, _, note = _decode(out).partition("\n")
        note = note.strip()
        if state == "running":
            return None
        if state == "gone":
            return ExitStatus(
                code=None, lost=True, reason=f"run directory {self.identity.run_dir} is gone"
            )
        if state == "dead":
            return ExitStatus(
                code=None,
                lost=True,
                reason=note or "the run's wrapper ended without recording an exit status",
            )
        value = state.removeprefix("exit ").strip()
        if not value.isdigit():
            return ExitStatus(code=None, lost=True, reason=f"unreadable exit file: {value!r}")
        return ExitStatus(code=int(value), reason=note)

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
            try:
                status = await self._poll()
                down_since = None
            except HostError as err:
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                if self._unreachable_for(down_since) or self.host._closed:
                    self._give_up(err)
                    continue
                status = None
            if status is not None:
                self._status = status
                return status
            # Poll often at first (short runs, failed starts), then less; an output stream that
            # sees the run end wakes us at once.
            interval = WAIT_POLL if polls <= WAIT_FAST_POLLS else WAIT_POLL_SLOW
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._ended.wait()
                self._ended.clear()

    # ---- the process tree -----------------------------------------------------------------------

    async def signal(self, signum: int) -> None:
        if self.identity.pid <= 1:
            return
        code, _, err = await self.host._script(
            _SIGNAL, str(self.identity.pid), str(self.identity.start_ticks), _signal_name(signum)
        )
        if code != 0:
            raise HostError(self._name, f"cannot signal the run: {_decode(err).strip()}")

    async def _tree(self) -> tuple[list[_TreeRow], int]:
        """The live processes of the run's session, and the host's clock ticks per second."""
        if self.identity.pid <= 1:
            return [], 100
        code, out, err = await self.host._script(
            _TREE, str(self.identity.pid), str(self.identity.start_ticks)
        )
        if code != 0:
            raise HostError(self._name, f"cannot list the run's processes: {_decode(err).strip()}")
        rows, hz = [], 100
        for line in _decode(out).splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == "hz" and fields[1].isdigit():
                hz = int(fields[1]) or 100
                continue
            if len(fields) not in (4, 5) or fields[3].startswith("Z"):
                continue  # zombies are dead, only not reaped yet
            try:
                ticks = int(fields[4]) if len(fields) == 5 else None
                rows.append(_TreeRow(int(fields[0]), int(fields[1]), float(fields[2]), ticks))
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
        if seen is None or now <= seen[0]:
            cpu = sum(r.lifetime_cpu for r in rows)  # the first look: ps's lifetime average
        else:
            since, before = seen
            used = sum(max(0, t - before.get(pid, 0)) for pid, t in ticks.items())
            cpu = 100.0 * used / hz / (now - since)
        return TreeStats(
            processes=len(rows),
            cpu_percent=cpu,
            rss_bytes=sum(r.rss_kib for r in rows) * 1024,
        )
