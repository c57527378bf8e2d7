"""Machines reached over SSH (asyncssh): ``target.py`` (the target, errors, the frame),
``connection.py`` (the pool, commands, the watcher's channel), ``follow.py`` (the one watcher
per machine: output and ends of its runs), ``batch.py`` (one command for many runs: probe,
fetch), ``host.py`` (:class:`SSHHost`), ``run.py`` (:class:`SSHRunHandle`)."""

from supervisor.hosts.ssh.connection import Connections
from supervisor.hosts.ssh.host import SSHHost
from supervisor.hosts.ssh.run import SSHRunHandle
from supervisor.hosts.ssh.target import (
    FramingError,
    LinkLost,
    Output,
    SSHHostKeyError,
    SSHLoginError,
    SSHTarget,
)

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
