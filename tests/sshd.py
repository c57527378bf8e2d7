"""Real OpenSSH sshd instances for the SSH host tests.

Each :class:`SSHD` is one "machine": ``/usr/sbin/sshd -D -e -f CFG`` listening on a free port of
127.0.0.1 (or 127.0.0.2, 127.0.0.3, ...), with a host key made for it, a client key authorized
through a test ``AuthorizedKeysFile`` and a ``known_hosts`` file for the client.  It logs in as
the user running the tests, so the daemon must be started as root (it has to switch users and
chroot for privilege separation).

Without root or without ``/usr/sbin/sshd`` the fixtures skip, except under CI (``CI=true``) where
they fail: a CI run that silently skipped every SSH test would prove nothing.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.hosts.ssh import SSHTarget

SSHD_BINARY = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
START_TIMEOUT = 10.0


def sshd_unavailable_reason() -> str | None:
    """Why real sshd instances cannot be run here, or None when they can."""
    if not os.path.exists(SSHD_BINARY):
        return f"{SSHD_BINARY} is missing (run scripts/install-system-deps as root)"
    if os.geteuid() != 0:
        return "sshd test instances need root (privilege separation and logging in)"
    return None


def require_sshd() -> None:
    """Skip the calling test when sshd cannot run here; under CI fail instead."""
    reason = sshd_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"SSH tests cannot run under CI: {reason}")
    pytest.skip(reason)


def keygen(path: Path, comment: str = "agentize-fleet-test") -> Path:
    """Make an unencrypted ed25519 key pair at ``path`` (and ``path.pub``)."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    return path


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


def known_hosts_line(address: str, port: int, pubkey_file: Path) -> str:
    kind, blob = pubkey_file.read_text().split()[:2]
    host = address if port == 22 else f"[{address}]:{port}"
    return f"{host} {kind} {blob}\n"


@dataclass
class SSHD:
    """One running sshd: a test "machine"."""

    address: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    host_key: Path
    client_key: Path
    known_hosts: Path
    log: Path
    user: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def target(self, name: str = "m1", **overrides: Any) -> SSHTarget:
        """An :class:`SSHTarget` that logs in to this sshd with the test key."""
        fields: dict[str, Any] = {
            "name": name,
            "host": self.address,
            "port": self.port,
            "user": self.user,
            "identity_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "connect_timeout": 5.0,
        }
        fields.update(overrides)
        return SSHTarget(**fields)

    def connection_processes(self) -> list[psutil.Process]:
        """The sshd processes serving connections (every sshd descendant of the listener)."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if child.name() == "sshd" or child.name().startswith("sshd"):
                    found.append(child)
        return found

    def kill_connections(self) -> int:
        """SIGKILL every process serving a connection: the client sees its links drop."""
        procs = self.connection_processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=5)
        return len(procs)

    def stop(self) -> None:
        """Stop the listener and whatever still serves a connection, by pid."""
        with contextlib.suppress(psutil.Error):
            self.kill_connections()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout=5)

    def restart(self) -> None:
        """Start the daemon again after :meth:`stop`, on the same port with the same host key
        and config: the machine is back."""
        assert self.process.poll() is not None, "sshd is still running"
        self.process = _spawn(self.directory / "sshd_config", self.log)
        _wait_listening(self)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def run_sshd(
    directory: Path,
    *,
    address: str = "127.0.0.1",
    client_key: Path | None = None,
    extra_config: str = "",
) -> Iterator[SSHD]:
    """Start an sshd on a free port of ``address``; stop it (by pid) when the block ends."""
    require_sshd()
    directory.mkdir(parents=True, exist_ok=True)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    host_key = keygen(directory / "host_ed25519", "test-host-key")
    if client_key is None:
        client_key = keygen(directory / "client_ed25519", "test-client-key")
    authorized = directory / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    port = free_port(address)
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(known_hosts_line(address, port, Path(f"{host_key}.pub")))
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                f"ListenAddress {address}",
                f"HostKey {host_key}",
                f"PidFile {directory / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "AuthenticationMethods publickey",
                "PrintMotd no",
                "UseDNS no",
                "MaxStartups 100",
                "LogLevel VERBOSE",
                extra_config,
                "",
            ]
        )
    )
    log = directory / "sshd.log"
    process = _spawn(config, log)
    server = SSHD(
        address=address,
        port=port,
        directory=directory,
        process=process,
        host_key=host_key,
        client_key=client_key,
        known_hosts=known_hosts,
        log=log,
        user=getpass.getuser(),
    )
    try:
        _wait_listening(server)
        yield server
    finally:
        server.stop()


def _spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as log_file:
        return subprocess.Popen(
            [SSHD_BINARY, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def _wait_listening(server: SSHD) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"sshd exited with {server.process.returncode}:\n{server.log_text()}"
            )
        try:
            with socket.create_connection((server.address, server.port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"sshd did not listen on {server.address}:{server.port} within "
                    f"{START_TIMEOUT}s:\n{server.log_text()}"
                ) from None
            time.sleep(0.05)


def noisy_login(directory: Path, *, stdout: str = "", stderr: str = "") -> str:
    """sshd config lines for a login shell that prints before every command, as a ``.bashrc``
    warning, ``pyenv: cannot rehash`` or a banner would: a ``ForceCommand`` wrapper that prints,
    then runs the command it was sent."""
    wrapper = directory / "noisy-login"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"printf '%s' {shlex.quote(stdout)}\n"
        f"printf '%s' {shlex.quote(stderr)} >&2\n"
        'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n'
    )
    wrapper.chmod(0o755)
    return f"ForceCommand {wrapper}"


def remote_helpers(server: SSHD) -> list[str]:
    """The command lines of the live processes under ``server`` that are not sshd itself: what
    the supervisor runs there besides the runs (a run's wrapper is started detached, and so
    is reparented away from sshd once its start command has ended)."""
    found = []
    try:
        below = psutil.Process(server.pid).children(recursive=True)
    except psutil.Error:
        return []
    for proc in below:
        with contextlib.suppress(psutil.Error):
            if proc.name().startswith("sshd") or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found.append(" ".join(proc.cmdline())[:100])
    return found


def hanging_login(directory: Path, flag: Path) -> str:
    """sshd config lines for logins that hang while ``flag`` exists (an overloaded machine, a
    login shell stuck on a network home): a ``ForceCommand`` wrapper that waits, then runs the
    command it was sent.  Connections and the channels already open work on meanwhile."""
    wrapper = directory / "hanging-login"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"while [ -e {shlex.quote(str(flag))} ]; do sleep 0.1; done\n"
        'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n'
    )
    wrapper.chmod(0o755)
    return f"ForceCommand {wrapper}"


def kill_sessions(session_ids: list[int]) -> None:
    """SIGKILL every local process whose session id is one of ``session_ids``."""
    wanted = {sid for sid in session_ids if sid > 1}
    if not wanted:
        return
    victims = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in wanted:
                proc.kill()
                victims.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    psutil.wait_procs(victims, timeout=5)


def session_processes(sid: int) -> list[int]:
    """Pids of live (non-zombie) local processes in session ``sid``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_sshd()
    return keygen(tmp_path_factory.mktemp("client") / "id_ed25519")


@pytest.fixture
def sshd(tmp_path: Path, client_key: Path) -> Iterator[SSHD]:
    """A machine on 127.0.0.1."""
    with run_sshd(tmp_path / "sshd1", address="127.0.0.1", client_key=client_key) as server:
        yield server


@pytest.fixture
def sshd2(tmp_path: Path, client_key: Path) -> Iterator[SSHD]:
    """A second machine, on 127.0.0.2."""
    with run_sshd(tmp_path / "sshd2", address="127.0.0.2", client_key=client_key) as server:
        yield server


@pytest.fixture
def session_reaper() -> Iterator[list[int]]:
    """Append the session ids (run pids) of started runs; they are SIGKILLed at teardown."""
    sids: list[int] = []
    yield sids
    kill_sessions(sids)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.3 where nothing listens."""
    return free_port("127.0.0.3")
