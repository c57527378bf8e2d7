"""Running ``supervisor/sh`` scripts with plain ``sh`` (dash) against local run directories.

The scripts are run exactly as a remote machine runs them (``sh -c TEXT sh ARGS...``, the text
from :func:`supervisor.sh.script`), without sshd; every process a test starts is killed by pid
in the :func:`procs` fixture.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import sh
from supervisor.hosts import runfiles

TIMEOUT = 30


def run_script(
    name: str, *args: str, input: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``sh -c SCRIPT sh ARGS...`` to its end."""
    return subprocess.run(
        ["sh", "-c", sh.script(name), "sh", *args],
        input=input,
        capture_output=True,
        timeout=TIMEOUT,
        env=env,
        check=False,
    )


def ticks(pid: int) -> int:
    found = runfiles.read_start_ticks(pid)
    assert found is not None, f"no process {pid}"
    return found


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def pair(proc: subprocess.Popen[bytes], *, off_by: int = 0) -> str:
    """``PID TICKS\\n`` of ``proc`` (``off_by`` makes it name a process that is not it)."""
    return f"{proc.pid} {ticks(proc.pid) + off_by}\n"


class Procs:
    """Processes a test starts, each in a session of its own, SIGKILLed (session and all) at
    teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self.sessions: list[int] = []

    def sleeper(self, seconds: float = 60) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["sleep", str(seconds)], start_new_session=True, stdin=subprocess.DEVNULL
        )
        self.started.append(proc)
        return proc

    def gone(self) -> subprocess.Popen[bytes]:
        """A process that has ended and been reaped (its pid names nothing, or another)."""
        proc = subprocess.Popen(["true"])
        proc.wait(timeout=TIMEOUT)
        return proc

    def watch_session(self, sid: int) -> None:
        self.sessions.append(sid)

    def kill_all(self) -> None:
        for sid in self.sessions:
            for pid in session_members(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=TIMEOUT)


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.getsid(int(name)) != sid:
                continue
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2 :].split()[0] != b"Z":
            found.append(int(name))
    return found


@pytest.fixture(name="procs")
def procs_fixture() -> Iterator[Procs]:
    made = Procs()
    try:
        yield made
    finally:
        made.kill_all()
