"""Machines reached over SSH (asyncssh): ``connection.py`` (target, errors, the pool, framed
commands), ``follow.py`` (the one watcher per machine: output and ends of its runs),
``host.py`` (:class:`SSHHost`), ``run.py`` (:class:`SSHRunHandle`)."""

from supervisor.hosts.ssh.connection import (
    Connections,
    FramingError,
    LinkLost,
    Output,
    SSHHostKeyError,
    SSHLoginError,
    SSHTarget,
)
from supervisor.hosts.ssh.host import SSHHost
from supervisor.hosts.ssh.run import SSHRunHandle

__all__ = [
    "Connections",
    "FramingError",
    "LinkLost",
    "Output",
    "SSHHost",
    "SSHHostKeyError",
    "SSHLoginError",
    "SSHRunHandle",
    "SSHTarget",
]
