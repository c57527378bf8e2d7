"""The state directory: private, one lock, one control socket, the ledger, a directory per shift.

::

    <state_dir>/             mode 0700: agent output holds code, prompts, tokens tools printed
        lock                 flock(2)-held by the running ``up``; holds its pid
        control.sock         the running fleet's control socket (mode 0600)
        ledger.sqlite3       the ledger (:mod:`supervisor.ledger`): tasks, runs, shifts
        runs/<shift-id>/
            shift.json       written once when the shift starts: id, pid (and its start
                             ticks), host, config; whether its supervisor lives
            fleet.jsonl      every record (rotated to fleet.jsonl.1, .2, … at a size)
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
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.ledger import Ledger, ShiftRecord

SOCKET_NAME = "control.sock"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux


class StateDirUnusable(Exception):
    """The state directory cannot be used (not a directory, not writable, another user's)."""

    def __init__(
        self, path: Path, problem: str, fix: str, what: str = "the state directory"
    ) -> None:
        super().__init__(f"{what} {path} {problem}; fix: {fix}")
        self.path = path


def prepare_state_dir(path: Path) -> None:
    """Make the state directory if needed, private (0700), and check that it is usable.

    Checked before anything is written into it, so that a bad ``state_dir`` is one clear
    message at start (exit 2) rather than a traceback from the first file written.
    """
    other = "point state_dir (or --state-dir) at a directory of your own"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise StateDirUnusable(path, "is not a directory", other) from None
    except OSError as exc:
        raise StateDirUnusable(
            path,
            f"cannot be made ({exc.strerror})",
            "make its parent directory writable by you, or " + other,
        ) from None
    try:
        info = os.stat(path)
    except OSError as exc:
        raise StateDirUnusable(path, f"cannot be read ({exc.strerror})", other) from None
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirUnusable(path, "is not a directory", other)
    if info.st_uid != os.geteuid():
        raise StateDirUnusable(
            path,
            f"belongs to another user (uid {info.st_uid}): its files could be read or "
            "replaced by them",
            other,
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            raise StateDirUnusable(
                path, f"cannot be made private ({exc.strerror})", other
            ) from None
    probe = path / f".probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StateDirUnusable(
            path,
            f"is not writable ({exc.strerror})",
            f"`chmod u+rwx {path}` (and free some disk space), or " + other,
        ) from None


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
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
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
    """Where the control socket lives: in the state directory, unless that path is too long
    for a socket address (108 bytes); then in a directory private to this user (never a
    predictable path in a shared one, where another user could put a socket of their own):
    ``$XDG_RUNTIME_DIR`` (private by its specification), else ``<tmp>/agentize-fleet-UID``,
    which :func:`prepare_socket_dir` makes 0700 and refuses when it is not ours."""
    natural = state_dir / SOCKET_NAME
    if len(str(natural)) <= _MAX_SOCKET_PATH:
        return natural
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/"):
        base = Path(runtime)
    else:
        base = Path(tempfile.gettempdir()) / f"agentize-fleet-{os.geteuid()}"
    return base / f"agentize-fleet-{digest}.sock"


def prepare_socket_dir(state_dir: Path) -> Path:
    """The control socket's path, its directory made and checked private (``up`` only)."""
    path = socket_path(state_dir)
    folder = path.parent
    if folder == state_dir:
        return path
    fix = "remove it (or set XDG_RUNTIME_DIR to a private directory of yours)"
    what = "the control socket's directory"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        raise StateDirUnusable(folder, f"cannot be made ({exc.strerror})", fix, what) from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise StateDirUnusable(folder, "is not a directory of yours", fix, what)
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise StateDirUnusable(folder, "is open to other users", fix, what)
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the new one, never half; on an
    error (a full disk, a directory that refuses) the file is left as it was and the error
    raised, with no temporary file left behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON, atomically (:func:`write_text_atomic`)."""
    text = json.dumps(data, default=str, separators=(",", ":"))  # the C encoder: fast
    write_text_atomic(path, text + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return None


@dataclass(frozen=True)
class ListedShift:
    """One shift found in the state directory: its ledger row and its ``summary.json``."""

    shift_id: str
    path: Path
    record: ShiftRecord | None
    summary: dict[str, Any] | None


def list_shifts(state_dir: Path, ledger: Ledger | None) -> list[ListedShift]:
    """Every shift under ``state_dir``, oldest first: those the ledger knows, and directories
    of shifts from before the ledger (their ``summary.json`` is all there is)."""
    known = {r.id: r for r in ledger.shifts()} if ledger is not None else {}
    runs = state_dir / "runs"
    names = set(known)
    if runs.is_dir():
        names |= {p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return [
        ListedShift(name, runs / name, known.get(name), read_json(runs / name / "summary.json"))
        for name in sorted(names)
    ]


class UnknownShift(Exception):
    """A shift name (``--shift NAME``) that matches no shift, or several."""


def find_shift(state_dir: Path, ledger: Ledger | None, name: str | None) -> ListedShift | None:
    """The shift ``name`` names (its id, or a unique prefix of one), else the latest; None when
    there is no shift at all.  A name that matches none or several raises :class:`UnknownShift`
    with a message that says what there is."""
    shifts = list_shifts(state_dir, ledger)
    if not shifts:
        return None
    if name is None:
        return shifts[-1]
    exact = [s for s in shifts if s.shift_id == name]
    matches = exact or [s for s in shifts if s.shift_id.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UnknownShift(
            f"no shift {name!r} in {state_dir} (latest: {shifts[-1].shift_id}); "
            "`agentize-fleet shifts` lists them"
        )
    shown = ", ".join(s.shift_id for s in matches[:5]) + (", ..." if len(matches) > 5 else "")
    raise UnknownShift(f"--shift {name!r} is ambiguous: it matches {len(matches)} shifts ({shown})")
