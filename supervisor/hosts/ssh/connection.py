"""Connections to one SSH machine: the pool, command execution, the watcher's channel.

One SSH connection per machine, opened lazily and shared by every helper command and by the
machine's one watcher (``follow.py``); a second (third, ...) connection is opened only when all
``max_channels`` helper channels of the open ones are busy, up to ``max_connections``, and is
closed again once idle for :data:`LINK_IDLE` seconds.  OpenSSH allows ``MaxSessions`` (10)
channels per connection: ``max_channels`` (8) helper commands plus the watcher fit; a server
configured lower refuses a channel, and that connection's cap is lowered to what it carried.
A lost connection is re-opened on the next use, with capped exponential backoff between failed
attempts.

Every command is one ``sh -c SCRIPT sh ARG...`` line with each word shlex-quoted: the login shell
(bash, zsh, ...) only ever sees single-quoted words, and the script gets its data as positional
parameters, never pasted into its text.  Every command is also **framed** (``target.py``):
what the login shell prints before the command's own output is dropped, never taken for
output or counted into a byte offset, and remembered for ``check`` to warn of.

asyncssh is asyncio-only: this needs anyio's asyncio backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal as signal_module
import time
from collections.abc import Callable
from typing import cast

import anyio
import asyncssh
import structlog

from supervisor import sh
from supervisor.hosts.base import HostError, HostSlow, HostUnreachable
from supervisor.hosts.reach import Reachability
from supervisor.hosts.ssh.target import (
    Deframer,
    FramingError,
    LinkLost,
    Output,
    SSHTarget,
    as_bytes,
    command_line,
    connect_error,
    connect_options,
    decode,
    link_error,
    one_line,
)

log = structlog.get_logger(__name__)

#: Longest pause between two connection attempts.
MAX_BACKOFF = 30.0
#: A connection beyond the first is closed once it has carried nothing for this long (seconds).
LINK_IDLE = 3.0


class _Link:
    """One SSH connection: how many helper channels it carries, whether the watcher is on it,
    how many channels it may carry (lowered when the server refused one), and since when it
    has been idle."""

    def __init__(self, conn: asyncssh.SSHClientConnection, cap: int) -> None:
        self.conn = conn
        self.busy = 0
        self.watching = 0
        self.cap = cap
        self.idle_since = time.monotonic()

    @property
    def alive(self) -> bool:
        return not self.conn.is_closed()


class _WatchSession(asyncssh.SSHClientSession[bytes]):
    """The channel of a long-running framed command: its payload on stdout goes to ``on_data``
    as it comes, on stderr to ``on_stderr``; ``ended`` is set when the channel closes."""

    def __init__(
        self,
        name: str,
        on_data: Callable[[bytes], None],
        on_stderr: Callable[[bytes], None],
        on_closed: Callable[[], None],
    ) -> None:
        self._on_data = on_data
        self._on_stderr = on_stderr
        self._on_closed = on_closed
        self._out = Deframer(name)
        self._err = Deframer(name)
        self.name = name
        self.ended = anyio.Event()
        self.exit_status: int | None = None
        self.error: Exception | None = None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        try:
            if datatype == asyncssh.EXTENDED_DATA_STDERR:
                said = self._err.feed(data)
                if said:
                    self._on_stderr(said)
                return
            payload = self._out.feed(data)
        except FramingError as err:
            self.error = err
            self.ended.set()
            return
        if payload:
            self._on_data(payload)

    def eof_received(self) -> bool:
        return True  # keep the channel until the exit status and the close come

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = exc
        self.ended.set()
        self._on_closed()


class Watch:
    """A long-running framed command on one channel (the per-machine watcher of
    ``hosts/ssh/follow.py``).  It holds no helper channel slot: its link carries at most
    ``max_channels`` helper commands besides it (OpenSSH's ``MaxSessions`` is 10)."""

    def __init__(self, chan: asyncssh.SSHClientChannel[bytes], session: _WatchSession) -> None:
        self._chan = chan
        self._session = session

    @property
    def ended(self) -> anyio.Event:
        """Set when the command ended or its channel was lost."""
        return self._session.ended

    def why(self) -> str:
        """Why it ended, in a few words."""
        session = self._session
        if session.error is not None:
            return str(session.error) or type(session.error).__name__
        if session.exit_status is not None:
            return f"the watcher exited with {session.exit_status}"
        return "the watcher's channel closed"

    def write(self, data: bytes) -> bool:
        """Write to the command's stdin; False when its channel is gone."""
        if self.ended.is_set():
            return False
        try:
            self._chan.write(data)
        except (asyncssh.Error, OSError, BrokenPipeError):
            return False
        return True

    def close(self) -> None:
        """End the command: EOF on its stdin (it stops), then the channel is closed.  Its
        connection counts the channel until the close is through (:attr:`ended`): OpenSSH
        counts it against ``MaxSessions`` until then."""
        for step in (self._chan.write_eof, self._chan.close):
            with contextlib.suppress(Exception):
                step()


class Connections:
    """The connection pool of one machine, and the one way commands are run over it.

    This is the whole interface the SSH host, its watcher and its run handles share:
    :meth:`script` and :meth:`command` (short framed commands), :meth:`watch` (the long-running
    watcher), :attr:`closed` and :meth:`aclose`.
    """

    def __init__(self, target: SSHTarget) -> None:
        if target.max_channels < 1 or target.max_connections < 1:
            raise ValueError("max_channels and max_connections must be at least 1")
        self.target = target
        self.name = target.name
        self._links: list[_Link] = []
        self._connect_lock = anyio.Lock()
        self._freed = anyio.Event()
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: HostError | None = None
        #: What the connections see of the machine: connecting, up, slow, unreachable, back.
        self.reach = Reachability(target.name, target.unreachable_after)
        self.closed = False
        #: Connections opened so far (first one included): a reconnect shows as 2, 3, ...
        self.connects = 0
        #: What the login shell printed before the first command that had it print (see
        #: :class:`Deframer`); ``None`` while no command has shown any.
        self.login_noise: bytes | None = None
        if target.known_hosts == "none":
            log.warning(
                "ssh host key checking disabled",
                machine=target.name,
                host=target.host,
                hint="known_hosts = 'none': anyone on the path can impersonate this machine",
            )

    # ---- connections ----------------------------------------------------------------------------

    async def _open(self) -> _Link:
        """Open one more connection, unless the last attempt failed too recently."""
        now = time.monotonic()
        if self._last_error is not None and now < self._retry_at:
            err = self._last_error
            self._failing(err)
            raise type(err)(self.name, err.message)
        try:
            options = connect_options(self.target)
            with anyio.fail_after(self.target.connect_timeout + 5.0):
                conn = await asyncssh.connect(self.target.host, **options)
        except Exception as exc:  # every cause is mapped to one line
            err = connect_error(self.target, exc)
            self._failures += 1
            self._retry_at = time.monotonic() + min(MAX_BACKOFF, 0.5 * 2 ** (self._failures - 1))
            self._last_error = err
            log.debug("ssh connect failed", machine=self.name, error=err.message)  # raised below
            self._failing(err)
            raise err from None
        self._failures = 0
        self._last_error = None
        self.connects += 1
        if self.connects > 1 and not any(link.alive for link in self._links):
            log.info("ssh reconnected", machine=self.name, connection=self.connects)
        self.reach.connected()
        return _Link(conn, self.target.max_channels)

    def _failing(self, err: HostError) -> None:
        """A connection could not be opened: with no connection left, the machine is away
        (credentials refused or a bad key file are no absence: the machine answered)."""
        if isinstance(err, HostUnreachable) and not any(link.alive for link in self._links):
            self.reach.failed(err.message)

    def _free_link(self) -> _Link | None:
        """The first live connection with a helper channel free (the first ones are filled
        first, so that the later ones fall idle and are closed)."""
        self._links = [link for link in self._links if link.alive]
        for link in self._links:
            if link.busy < link.cap:
                return link
        return None

    def _close_idle(self) -> None:
        """Close the connections beyond the first that carry nothing and have been idle for
        :data:`LINK_IDLE` seconds: a burst of commands (fifty runs starting) opened them."""
        now = time.monotonic()
        for link in self._links[1:]:
            if link.busy == 0 and link.watching == 0 and now - link.idle_since > LINK_IDLE:
                link.conn.close()
        self._links = [link for link in self._links if link.alive]

    async def _acquire(self, *, watcher: bool = False) -> _Link:
        """A connection with a channel reserved: a helper channel, or the watcher's (any live
        connection; the first one opened if there is none)."""
        while True:
            if self.closed:
                raise HostUnreachable(self.name, "the SSH host was closed")
            self._close_idle()
            link = self._free_link() if not watcher else next(iter(self._links), None)
            if link is None and len(self._links) < self.target.max_connections:
                async with self._connect_lock:
                    # Those who queued here behind an opening look again: its channels, or
                    # the cap it may have reached, decide for them.
                    link = self._free_link() if not watcher else next(iter(self._links), None)
                    room = len(self._links) < self.target.max_connections
                    if link is None and room and not self.closed:
                        link = await self._open()
                        self._links.append(link)
            if link is not None:
                if watcher:
                    link.watching += 1
                else:
                    link.busy += 1
                return link
            await self._freed.wait()

    def _release(self, link: _Link) -> None:
        link.busy -= 1
        link.idle_since = time.monotonic()
        if link.busy == 0 and self._links and link is not self._links[0]:
            # A plain event-loop timer (sync, nothing to await): an idle fleet makes no call
            # that would close the connection otherwise.
            asyncio.get_running_loop().call_later(LINK_IDLE + 0.1, self._close_idle)
        self._freed.set()  # wakes every waiter; the next ones wait for the next release
        self._freed = anyio.Event()

    def _refused(
        self, link: _Link, exc: asyncssh.ChannelOpenError, *, watcher: bool = False
    ) -> bool:
        """A channel refused on a connection that carries others: the server allows fewer
        sessions per connection than we thought (``MaxSessions``).  Lower this connection's cap
        of helper channels to what it carries (less one, when the refused one was the
        watcher's) and say so; True when a helper command may simply be tried again."""
        others = link.busy + link.watching - (0 if watcher else 1)
        if others < 1 or link.cap <= 1:
            return False
        link.cap = max(1, link.busy - 1)
        log.warning(
            "ssh channel refused",
            machine=self.name,
            reason=exc.reason,
            channels=others,
            hint="the server's MaxSessions is lower than max_channels + 1: fewer channels used",
        )
        return True

    async def aclose(self) -> None:
        self.closed = True
        self.reach.close()
        links, self._links = self._links, []
        for link in links:
            link.conn.close()
        for link in links:
            with contextlib.suppress(Exception), anyio.move_on_after(5.0):
                await link.conn.wait_closed()
        self._freed.set()

    # ---- short commands -------------------------------------------------------------------------

    async def command(
        self,
        script: str,
        *args: str,
        timeout: float,
        input: bytes | None = None,
        idempotent: bool = False,
    ) -> Output:
        """Run the shell text ``script`` with ``args``, framed; its status and payloads.

        A command whose channel could not even be opened (the connection had just died) is
        retried once on a fresh connection; an ``idempotent`` one also when the link died
        while it ran.  Raises :class:`HostSlow` when it did not answer within ``timeout`` (the
        remote command may go on).
        """
        line = command_line(script, *args)
        try:
            return await self.exec_once(line, timeout=timeout, input=input)
        except LinkLost as err:
            if self.closed or (err.started and not idempotent):
                raise
            log.info("ssh command retried after a lost link", machine=self.name, error=err.message)
            return await self.exec_once(line, timeout=timeout, input=input)

    async def exec_once(self, line: str, *, timeout: float, input: bytes | None) -> Output:
        """Run one framed command line once (no retry; a channel the server refused for lack
        of sessions is asked for again)."""
        while True:
            link = await self._acquire()
            process: asyncssh.SSHClientProcess[bytes] | None = None
            try:
                with anyio.fail_after(timeout):
                    if input is None:
                        process = await link.conn.create_process(
                            line, encoding=None, stdin=asyncssh.DEVNULL
                        )
                    else:
                        process = await link.conn.create_process(line, encoding=None, input=input)
                    result = await process.wait()
                break
            except TimeoutError:
                if process is not None:
                    process.close()  # the command may go on remotely; its channel is let go
                raise self._slow(
                    f"no answer within {timeout:g}s to a command (its connection lives: the "
                    "machine is overloaded, or its logins hang)"
                ) from None
            except asyncssh.ChannelOpenError as exc:
                if self._refused(link, exc):
                    continue
                if link.alive:
                    # Refused on a live connection: sessions that hang hold their slots.
                    raise self._slow(f"the machine refuses new sessions: {exc.reason}") from None
                err = link_error(self.name, exc)
                raise LinkLost(self.name, err.message, started=False) from None
            except (asyncssh.Error, OSError) as exc:
                err = link_error(self.name, exc)
                raise LinkLost(self.name, err.message, started=process is not None) from None
            finally:
                self._release(link)
        if link.cap < self.target.max_channels:
            link.cap += 1  # what the server refused may have been sessions of timed-out commands
        self.reach.answered()
        if result.exit_signal is not None:
            name = result.exit_signal[0]
            try:
                code = 128 + int(signal_module.Signals[f"SIG{name}"])
            except KeyError:
                code = 255
        elif result.exit_status is None or result.exit_status < 0:
            # No exit status at all: the channel was closed under the command.
            raise LinkLost(self.name, "SSH link lost while a command ran", started=True)
        else:
            code = result.exit_status
        on_out, on_err = Deframer(self.name), Deframer(self.name)
        stdout = on_out.feed(as_bytes(result.stdout))
        stderr = on_err.feed(as_bytes(result.stderr))
        if not on_out.framed:
            said = one_line(decode(on_out.noise + on_err.noise))[-300:]
            raise FramingError(
                self.name,
                f"the login shell did not run the command as sent (exit {code}, no frame "
                f"mark in its output): {said or 'no output'}",
            )
        if not on_err.framed:  # stderr redirected somewhere by the login: nothing to drop
            stderr, on_err.noise = on_err.noise, b""
        noise = on_out.noise + on_err.noise
        self._noticed(noise)
        return Output(code, stdout, stderr, noise)

    def _slow(self, message: str) -> HostSlow:
        """The error of a machine that did not answer in time while its connection lived,
        said to its reachability too."""
        self.reach.slow(message)
        return HostSlow(self.name, message)

    def _noticed(self, noise: bytes) -> None:
        if noise and self.login_noise is None:
            self.login_noise = noise
            log.warning(
                "login shell prints",
                machine=self.name,
                bytes=len(noise),
                sample=one_line(decode(noise))[:200],
                hint="dropped from every command's output; quieter: print only in "
                "interactive shells (`[ -t 1 ]`, `case $- in *i*`)",
            )

    async def script(
        self,
        name: str,
        *args: str,
        timeout: float | None = None,
        input: bytes | None = None,
        idempotent: bool = True,
    ) -> Output:
        """Run ``supervisor/sh/NAME.sh`` (they are idempotent unless told); a command that does
        not answer within ``timeout`` (default: the target's ``command_timeout``) raises
        :class:`HostSlow`."""
        return await self.command(
            sh.script(name),
            *args,
            timeout=self.target.command_timeout if timeout is None else timeout,
            input=input,
            idempotent=idempotent,
        )

    # ---- the long-running watcher ----------------------------------------------------------------

    async def watch(
        self,
        name: str,
        *args: str,
        input: bytes,
        on_data: Callable[[bytes], None],
        on_stderr: Callable[[bytes], None],
    ) -> Watch:
        """Start ``supervisor/sh/NAME.sh`` on a channel of its own, ``input`` written to its
        stdin (which stays open: :meth:`Watch.write` adds to it, closing it ends the command),
        its payload on stdout handed to ``on_data`` as it comes, on stderr to ``on_stderr``.
        Raises :class:`HostUnreachable` when it cannot be started."""
        line = command_line(sh.script(name), *args)
        link = await self._acquire(watcher=True)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                link.watching -= 1
                link.idle_since = time.monotonic()

        try:
            with anyio.fail_after(self.target.connect_timeout + 5.0):
                chan, session = await link.conn.create_session(
                    lambda: _WatchSession(self.name, on_data, on_stderr, release),
                    line,
                    encoding=None,
                )
        except TimeoutError:
            release()
            raise self._slow(
                f"no answer within {self.target.connect_timeout + 5.0:g}s "
                "to the start of the watcher"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            release()
            if isinstance(exc, asyncssh.ChannelOpenError) and link.alive:
                self._refused(link, exc, watcher=True)
                raise self._slow(f"the machine refuses new sessions: {exc.reason}") from None
            raise link_error(self.name, exc) from None
        chan.write(input)
        return Watch(chan, cast(_WatchSession, session))
