"""Machines reached over SSH (asyncssh): ``target.py`` (the target, errors, the frame),
``connection.py`` (the pool, commands, the watcher's channel), ``watcher.py`` (the one watcher
per machine as the host sees it), ``follow.py`` (output and ends of the machine's runs, fed by
the watcher), ``batch.py`` (many runs at once: probe, fetch), ``host.py`` (:class:`SSHHost`),
``run.py`` (:class:`SSHRunHandle`)."""

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
