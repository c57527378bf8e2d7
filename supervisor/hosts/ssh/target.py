"""How to reach one SSH machine and how to read what it says: the target, the error types, the
connection options and error messages, and the frame of every command's output.

Every command the SSH host runs is **framed**: it first prints :data:`supervisor.sh.FRAME_MARK`
on stdout and on stderr, and what comes before the mark on either stream is the login shell's
own chatter (a banner, a ``.bashrc`` warning, ``pyenv: cannot rehash``): dropped by
:class:`Deframer`, never taken for output or counted into a byte offset.  A command whose mark
never comes was not run as sent: that is a :class:`FramingError`, not output.
"""

from __future__ import annotations

import os
import shlex
import socket
from dataclasses import dataclass
from typing import Any

import asyncssh

from supervisor import sh
from supervisor.hosts.base import HostAuthError, HostError, HostUnreachable

#: How much login-shell chatter is looked through for the frame mark before giving up.
NOISE_LIMIT = 1024 * 1024


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
    #: How long a helper command may take to answer before the machine counts as slow.
    command_timeout: float = 60.0
    #: More connections are opened only when all channels of the open ones are busy.
    max_connections: int = 4


class SSHHostKeyError(HostAuthError):
    """The machine's host key is unknown or has changed."""

    host_key = True


class LinkLost(HostUnreachable):
    """The link failed under a command; ``started`` tells whether the command had begun."""

    def __init__(self, host: str, message: str, *, started: bool) -> None:
        super().__init__(host, message)
        self.started = started


class SSHLoginError(HostAuthError):
    """The machine refused our credentials, or our key / config files cannot be used."""

    host_key = False


class FramingError(HostError):
    """A command's output never showed the frame mark: the machine's login shell did not run
    the command as sent (a ``ForceCommand``, a shell that is not POSIX-like)."""


@dataclass(frozen=True)
class Output:
    """A framed command's end: exit code, payloads, and what the login shell printed first."""

    code: int
    stdout: bytes
    stderr: bytes
    noise: bytes = b""


class Deframer:
    """One stream of a framed command: drops what precedes the frame mark."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.framed = False
        self.noise = b""

    def feed(self, data: bytes) -> bytes:
        """The payload in ``data`` (empty until the mark has come)."""
        if self.framed:
            return data
        seen = self.noise + data
        at = seen.find(sh.FRAME_MARK)
        if at < 0:
            if len(seen) > NOISE_LIMIT:
                raise FramingError(
                    self.host,
                    f"no frame mark in the first {NOISE_LIMIT} bytes of a command's "
                    "output: the login shell did not run it as sent",
                )
            self.noise = seen
            return b""
        self.framed = True
        self.noise = seen[:at]
        return seen[at + len(sh.FRAME_MARK) :]


def decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


def as_bytes(data: bytes | str | None) -> bytes:
    if data is None:
        return b""
    if isinstance(data, str):
        return data.encode()
    return data


def one_line(text: str) -> str:
    return " ".join(text.split())


def command_line(script: str, *args: str) -> str:
    """The framed command line running the text ``script`` with ``args`` as $1, $2, ..."""
    return shlex.join(["sh", "-c", sh.framed(script), "sh", *args])


# ---- connection options and errors ---------------------------------------------------------


def where(t: SSHTarget) -> str:
    """``user@host:port``, for messages."""
    user = f"{t.user}@" if t.user else ""
    return f"{user}{t.host}:{t.port}"


def connect_options(t: SSHTarget) -> dict[str, Any]:
    """Arguments for ``asyncssh.connect``; bad local files raise :class:`SSHLoginError`."""
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
                t.name, f"cannot use identity_file {t.identity_file}: {exc}"
            ) from None
        kwargs["client_keys"] = [path]
    if t.known_hosts == "none":
        kwargs["known_hosts"] = None
    elif t.known_hosts:
        path = os.path.expanduser(t.known_hosts)
        if not os.path.isfile(path):
            raise SSHHostKeyError(
                t.name,
                f"known_hosts file {t.known_hosts} does not exist: create it with "
                f"`ssh-keyscan -p {t.port} {t.host} >> {t.known_hosts}` "
                "after checking the key with the machine's owner",
            )
        kwargs["known_hosts"] = path
    if t.ssh_config:
        path = os.path.expanduser(t.ssh_config)
        if not os.path.isfile(path):
            raise SSHLoginError(t.name, f"ssh_config file {t.ssh_config} does not exist")
        kwargs["config"] = [path]
    return kwargs


def connect_error(t: SSHTarget, exc: BaseException) -> HostError:
    """One clear line for a failed connection attempt."""
    at = where(t)
    if isinstance(exc, HostError):
        return exc
    if isinstance(exc, asyncssh.PermissionDenied):
        user = t.user or "(default user)"
        key = t.identity_file or "default keys / ssh-agent"
        return SSHLoginError(
            t.name,
            f"authentication failed for user {user} (key {key}) at {at}: "
            "check identity_file / ssh-agent and the machine's authorized_keys",
        )
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        known = t.known_hosts or "~/.ssh/known_hosts"
        pattern = t.host if t.port == 22 else f"[{t.host}]:{t.port}"
        return SSHHostKeyError(
            t.name,
            f"host key of {t.host}:{t.port} is not in known_hosts ({known}) or has changed: "
            f"if the machine was reinstalled remove the old key with "
            f"`ssh-keygen -R '{pattern}' -f {known}`, then add the new one with "
            f"`ssh-keyscan -p {t.port} {t.host} >> {known}` after checking it",
        )
    if isinstance(exc, asyncssh.ConfigParseError):
        return SSHLoginError(t.name, f"bad ssh_config {t.ssh_config}: {exc}")
    if isinstance(exc, asyncssh.KeyImportError):
        return SSHLoginError(t.name, f"cannot load a client key: {exc}")
    if isinstance(exc, socket.gaierror):
        return HostUnreachable(t.name, f"cannot resolve host name {t.host!r}: {exc}")
    if isinstance(exc, ConnectionRefusedError):
        return HostUnreachable(t.name, f"connection refused at {at} (is sshd running?)")
    if isinstance(exc, TimeoutError):
        return HostUnreachable(t.name, f"timed out after {t.connect_timeout:g}s connecting to {at}")
    if isinstance(exc, asyncssh.DisconnectError):
        return HostUnreachable(t.name, f"disconnected by {at}: {exc.reason or exc}")
    if isinstance(exc, OSError):
        return HostUnreachable(t.name, f"cannot connect to {at}: {exc.strerror or exc}")
    return HostUnreachable(t.name, f"cannot connect to {at}: {type(exc).__name__}: {exc}")


def link_error(name: str, exc: BaseException) -> HostError:
    """One clear line for a channel that failed on an open connection."""
    if isinstance(exc, HostError):
        return exc
    if isinstance(exc, asyncssh.ChannelOpenError):
        return HostUnreachable(name, f"cannot open an SSH channel: {exc.reason or exc}")
    if isinstance(exc, asyncssh.DisconnectError):
        return HostUnreachable(name, f"SSH link lost: {exc.reason or exc}")
    if isinstance(exc, OSError):
        return HostUnreachable(name, f"SSH link lost: {exc.strerror or exc}")
    return HostUnreachable(name, f"SSH link failed: {type(exc).__name__}: {exc}")
