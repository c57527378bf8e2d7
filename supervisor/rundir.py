"""The state directory: one lock, one control socket, and a directory per fleet run.

::

    <state_dir>/
        lock                 flock(2)-held by the running ``up``; holds its pid
        control.sock         the running fleet's control socket (mode 0600)
        runs/<run-id>/
            fleet.jsonl      every record (rotated to fleet.jsonl.1, .2, … at a size)
            state.json       written atomically on every state change while it runs
            summary.json     written when it ends (absent: it is running, or it died)
            agents/…         local runs' wrapper files (pid, exit, stdout, stderr, lease)

Only one ``up`` per state directory at a time: the lock is an ``flock`` on ``lock``, so it is
released by the kernel when its holder dies however it dies, and a stale pid in the file
never blocks a new run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOCKET_NAME = "control.sock"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux


class FleetLocked(Exception):
    """Another ``up`` holds the state directory's lock."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"another agentize-fleet run ({who}) is already running on {state_dir}; "
            f"stop it with `agentize-fleet down` or wait for it to end"
        )
        self.pid = pid


class RunLock:
    """The held lock; release it (or let the process die) to let the next ``up`` in."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def acquire_lock(state_dir: Path, name: str = "lock") -> RunLock:
    """Take the directory's lock without waiting, or raise :class:`FleetLocked`.

    ``name`` lets the workspace root carry a lock of its own (``.agentize-fleet.lock``): two
    fleets with different state directories must not share worktrees either.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FleetLocked(state_dir, lock_holder(state_dir, name)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return RunLock(path, fd)


def lock_holder(state_dir: Path, name: str = "lock") -> int | None:
    """The pid of the running ``up`` on ``state_dir``, or None when none holds the lock."""
    path = state_dir / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def socket_path(state_dir: Path) -> Path:
    """Where the control socket lives (a short path in the temp dir if the natural one is long)."""
    natural = state_dir / SOCKET_NAME
    if len(str(natural)) <= _MAX_SOCKET_PATH:
        return natural
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"agentize-fleet-{digest}.sock"


@dataclass(frozen=True)
class RunInfo:
    """One fleet run found in the state directory."""

    run_id: str
    path: Path
    state: dict[str, Any] | None
    summary: dict[str, Any] | None

    @property
    def ended(self) -> bool:
        return self.summary is not None


def read_json(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return None


def list_runs(state_dir: Path) -> list[RunInfo]:
    """Every fleet run under ``state_dir``, oldest first."""
    runs = state_dir / "runs"
    if not runs.is_dir():
        return []
    found = []
    for path in sorted(p for p in runs.iterdir() if p.is_dir()):
        state, summary = read_json(path / "state.json"), read_json(path / "summary.json")
        found.append(RunInfo(path.name, path, state, summary))
    return found


def unfinished_runs(state_dir: Path) -> list[RunInfo]:
    """Runs that never wrote their summary (running, or their supervisor died), oldest first.

    Only their state files are read: a state directory keeps every past run, and parsing the
    summaries of all of them at each start would grow with the directory's age.
    """
    runs = state_dir / "runs"
    if not runs.is_dir():
        return []
    found = []
    for path in sorted(p for p in runs.iterdir() if p.is_dir()):
        if not (path / "summary.json").exists():
            found.append(RunInfo(path.name, path, read_json(path / "state.json"), None))
    return found


def find_run(state_dir: Path, run_id: str | None) -> RunInfo | None:
    """The run named by ``run_id`` (a unique prefix will do), or the latest one."""
    runs = list_runs(state_dir)
    if run_id is None:
        return runs[-1] if runs else None
    matches = [r for r in runs if r.run_id.startswith(run_id)]
    return matches[0] if len(matches) == 1 else None
