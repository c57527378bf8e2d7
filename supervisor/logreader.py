"""Reading a shift's JSONL log: finding it, filtering records, following it across rotation.

The machinery behind ``agentize-fleet logs`` (:mod:`supervisor.logcmd`, the command itself).

Where the log lives: ``<state_dir>/runs/<shift-id>/fleet.jsonl``.  The writer
(:mod:`supervisor.logwriter`) may rotate it by renaming it to ``fleet.jsonl.N`` (N = 1, 2, ...;
the oldest segment has the smallest N) and opening a new ``fleet.jsonl``; renames happen only
between whole records.  The reader:

- reads the rotated segments in order, then ``fleet.jsonl``;
- identifies files by (device, inode), never by name: when following, a ``fleet.jsonl`` whose
  inode is no longer the open file's means the open file was rotated away; the reader drains
  the open file to its end, then continues with the next file from its start, so that no record
  is lost or repeated across a rotation;
- holds back a partially written last line (no newline yet) until it is complete;
- reads in 1 MiB blocks with ``os.read``; with ``--json`` and no filter the blocks are written
  out as they are, never parsed (only a block holding the bytes ``fleet-ended`` is looked at);
- polls every 0.1 s at the end of the file.

Following (:func:`follow`) ends by itself when the fleet has ended: a ``fleet-ended`` record was
read; or ``summary.json`` exists, nothing more arrived for a short grace period and the
supervisor is not known to be alive (the summary is written before the report and
``fleet-ended``); or the supervisor named in ``shift.json`` (``state.json`` in shift directories
of older versions) is gone (pid dead, or reused by a process started later) and the log is
drained.

``start_at_last(N)`` positions the reader at the last N matching records: the files are scanned
backwards from the end, so ``logs -n 100`` is immediate on any size of log.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from supervisor.exitcodes import EXIT_NOTHING, EXIT_OK, EXIT_USAGE
from supervisor.hosts.runfiles import read_start_ticks
from supervisor.records import LOG_NAME, event_needle, log_files, needle, rotated_segments
from supervisor.rundir import UnknownShift, find_shift, read_json

SUMMARY_NAME = "summary.json"
SHIFT_NAME = "shift.json"  # written once at a shift's start: id, pid, pid_ticks, host, ...
STATE_NAME = "state.json"  # what shifts of older versions wrote instead (and kept rewriting)
BLOCK = 1 << 20
POLL_INTERVAL = 0.1
SUMMARY_GRACE = 2.0
LIVENESS_INTERVAL = 1.0
ENDED_MARK = event_needle("fleet-ended")


Ident = tuple[int, int]


class LogsError(Exception):
    """A problem the user can fix; the message is one line, ``code`` the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# -- which shift ----------------------------------------------------------------------------


def find_run(state_dir: Path, run: str | None) -> Path:
    """The shift's directory: ``run`` (an id, a unique prefix of one, or a path), else the
    latest (the rule is :func:`supervisor.rundir.find_shift`'s)."""
    if run is not None and os.sep in run and (Path(run) / LOG_NAME).exists():
        return Path(run)
    try:
        info = find_shift(state_dir, None, run)
    except UnknownShift as exc:
        raise LogsError(str(exc)) from None
    except OSError as exc:
        raise LogsError(f"cannot list {state_dir / 'runs'}: {exc.strerror}") from None
    if info is None:
        raise LogsError(f"no shift found in {state_dir / 'runs'}", EXIT_NOTHING)
    return info.path


def segments(run_dir: Path) -> list[tuple[int, Path]]:
    """The rotated segments ``fleet.jsonl.N`` of a run, oldest (smallest N) first."""
    try:
        return rotated_segments(run_dir)
    except OSError as exc:
        raise LogsError(f"cannot list {run_dir}: {exc.strerror}") from None


def log_paths(run_dir: Path) -> list[Path]:
    """Every file of a run's log, in the order its records were written
    (:func:`supervisor.records.log_files`)."""
    try:
        return log_files(run_dir)
    except OSError as exc:
        raise LogsError(f"cannot list {run_dir}: {exc.strerror}") from None


# -- filters --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordFilter:
    """Which records to show; every given condition must hold (repeated options: any of)."""

    tasks: frozenset[int] | None = None
    machines: frozenset[str] | None = None
    streams: frozenset[str] | None = None
    workers: frozenset[str] | None = None
    since: str | None = None
    grep: re.Pattern[str] | None = None
    runs: frozenset[tuple[int, int]] | None = None  # (task, run): an agent session's runs

    def __call__(self, record: dict[str, Any]) -> bool:
        if self.tasks is not None and record.get("task") not in self.tasks:
            return False
        if self.runs is not None and (record.get("task"), record.get("run")) not in self.runs:
            return False
        if self.machines is not None and record.get("machine") not in self.machines:
            return False
        if self.streams is not None and record.get("stream") not in self.streams:
            return False
        if self.workers is not None and record.get("worker") not in self.workers:
            return False
        if self.since is not None:
            ts = record.get("ts")
            if not isinstance(ts, str) or ts < self.since:
                return False
        if self.grep is not None:
            line = record.get("line")
            if not isinstance(line, str) or self.grep.search(line) is None:
                return False
        return True

    @property
    def empty(self) -> bool:
        return (
            self.tasks is None
            and self.machines is None
            and self.streams is None
            and self.workers is None
            and self.since is None
            and self.grep is None
            and self.runs is None
        )


@dataclass(frozen=True)
class RawPrefilter:
    """Cheap tests on raw JSONL that every line a :class:`RecordFilter` accepts passes.

    Most lines of other tasks, workers, machines or streams are skipped without being parsed
    (a block without any of the wanted values at all is skipped whole); the lines that pass are
    still parsed and checked.  The needles are the schema's (:func:`supervisor.records.needle`).
    """

    needle_sets: tuple[tuple[bytes, ...], ...]

    @classmethod
    def of(cls, record_filter: RecordFilter) -> RawPrefilter | None:
        wanted: list[tuple[str, Iterable[str | int] | None]] = [
            ("worker", record_filter.workers),
            ("machine", record_filter.machines),
            ("stream", record_filter.streams),
            ("task", record_filter.tasks),
        ]
        sets = [tuple(needle(name, v) for v in values) for name, values in wanted if values]
        return cls(tuple(sets)) if sets else None

    def __call__(self, data: bytes) -> bool:
        """False if no line of ``data`` (a line, or a block of lines) can match."""
        return all(any(n in data for n in needles) for needles in self.needle_sets)


def load_record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _is_ended(line: bytes) -> bool:
    if ENDED_MARK not in line:
        return False
    record = load_record(line)
    return record is not None and record.get("event") == "fleet-ended"


# -- reading --------------------------------------------------------------------------------


@dataclass
class _Source:
    fd: int
    ident: Ident
    name: str


def _lines_backwards(fd: int, end: int, *, keep_partial: bool) -> Iterator[tuple[int, bytes]]:
    """The lines of ``fd[0:end]``, last first, as ``(offset of the line, line without "\\n")``.

    A last line without its newline is left out unless ``keep_partial``.
    """
    pos = end
    buf = b""  # the file's bytes [pos, pos + len(buf)) not yet yielded
    while pos > 0:  # find the end of the last complete line
        size = min(BLOCK, pos)
        pos -= size
        buf = os.pread(fd, size, pos) + buf
        cut = buf.rfind(b"\n")
        if cut >= 0:
            if cut + 1 < len(buf) and keep_partial:
                yield pos + cut + 1, buf[cut + 1 :]
            buf = buf[: cut + 1]
            break
    else:
        if buf and keep_partial:
            yield 0, buf
        return
    while True:
        j = len(buf)  # buf[j - 1] is the newline ending the next line to yield
        while j > 0:
            i = buf.rfind(b"\n", 0, j - 1)
            if i < 0:
                break
            yield pos + i + 1, buf[i + 1 : j - 1]
            j = i + 1
        buf = buf[:j]
        if pos == 0:
            if j > 0:
                yield 0, buf[: j - 1]
            return
        size = min(BLOCK, pos)
        pos -= size
        buf = os.pread(fd, size, pos) + buf


class LogReader:
    """Reads one run's log, rotated segments first, following renames by inode."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.live = run_dir / LOG_NAME
        self.queue: list[_Source] = []  # opened files, in order; queue[0] is being read
        self.done: set[Ident] = set()
        self.pending = b""  # a partial last line of queue[0]
        self.ended = False  # a fleet-ended record has been read

    # files ----------------------------------------------------------------------------------

    def _known(self, ident: Ident) -> bool:
        return ident in self.done or any(s.ident == ident for s in self.queue)

    def _open(self, path: Path) -> _Source | None:
        try:
            st = os.stat(path)
            if self._known((st.st_dev, st.st_ino)):
                return None
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LogsError(f"cannot read {path}: {exc.strerror}") from None
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        if self._known(ident):  # renamed between the stat and the open
            os.close(fd)
            return None
        return _Source(fd, ident, path.name)

    def _unread_segment(self) -> bool:
        for _, path in segments(self.run_dir):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if not self._known((st.st_dev, st.st_ino)):
                return True
        return False

    def _next_file(self) -> _Source | None:
        """Open the oldest file not read yet: a rotated segment, else ``fleet.jsonl``."""
        while True:
            for _, path in segments(self.run_dir):
                source = self._open(path)
                if source is not None:
                    return source
            source = self._open(self.live)
            if source is None:
                return None
            # A rotation between listing the segments and opening fleet.jsonl would make the
            # renamed file look read: list again, and take the segment first if one appeared.
            if not self._unread_segment():
                return source
            os.close(source.fd)

    def _is_live(self, source: _Source) -> bool:
        try:
            st = os.stat(self.live)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == source.ident

    def close(self) -> None:
        for source in self.queue:
            os.close(source.fd)
        self.queue.clear()

    # positioning --------------------------------------------------------------------------

    def open_all(self) -> None:
        """Open every file there is now, oldest first."""
        while True:
            source = self._next_file()
            if source is None:
                return
            self.queue.append(source)

    def start_at_last(self, count: int, match: Callable[[bytes], bool] | None) -> None:
        """Position the reader at the last ``count`` lines that ``match`` (all: None)."""
        self.open_all()
        if not self.queue:
            return
        start: tuple[int, int] | None = None
        found = 0
        last_index = len(self.queue) - 1
        for index in range(last_index, -1, -1):
            source = self.queue[index]
            size = os.fstat(source.fd).st_size
            for offset, line in _lines_backwards(source.fd, size, keep_partial=index < last_index):
                if not self.ended and _is_ended(line):
                    self.ended = True
                if count == 0:
                    start = (index, offset + len(line) + 1)
                    break
                if match is None or match(line):
                    found += 1
                    if found >= count:
                        start = (index, offset)
                        break
            if start is not None:
                break
        if start is None:
            if count > 0:
                return  # fewer matches than asked for: read everything
            start = (0, 0)  # nothing complete in any file
        index, offset = start
        for source in self.queue[:index]:
            os.close(source.fd)
            self.done.add(source.ident)
        del self.queue[:index]
        os.lseek(self.queue[0].fd, offset, os.SEEK_SET)

    # reading ------------------------------------------------------------------------------

    def _consume(self, chunk: bytes, emit: Callable[[bytes], None]) -> None:
        if not self.ended and ENDED_MARK in chunk:
            self.ended = any(_is_ended(line) for line in chunk.split(b"\n") if ENDED_MARK in line)
        emit(chunk)

    def _drain(self, source: _Source, emit: Callable[[bytes], None]) -> bool:
        """Read ``source`` to its current end; emit complete lines.  True if anything was read."""
        got = False
        while True:
            data = os.read(source.fd, BLOCK)
            if not data:
                return got
            got = True
            buf = self.pending + data if self.pending else data
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                self.pending = buf
                continue
            self.pending = buf[cut:]
            self._consume(buf[:cut] if cut < len(buf) else buf, emit)

    def _finish(self, source: _Source, emit: Callable[[bytes], None]) -> None:
        """Done with a rotated file: its last line was whole even without a newline."""
        if self.pending:
            rest, self.pending = self.pending, b""
            self._consume(rest + b"\n", emit)
        os.close(source.fd)
        self.done.add(source.ident)
        self.queue.pop(0)

    def pump(self, emit: Callable[[bytes], None]) -> bool:
        """Emit every complete line there is now, across rotations.  True if anything was read."""
        progressed = False
        while True:
            if not self.queue:
                source = self._next_file()
                if source is None:
                    return progressed
                self.queue.append(source)
            source = self.queue[0]
            progressed |= self._drain(source, emit)
            if self._is_live(source):
                return progressed
            # Rotated away (or a segment): move on once the next file is there, after reading
            # whatever reached the old file before its rename.
            if len(self.queue) < 2:
                following = self._next_file()
                if following is None:
                    return progressed  # the new fleet.jsonl is not there yet
                self.queue.append(following)
            progressed |= self._drain(source, emit)
            self._finish(source, emit)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class ShiftInfo:
    """What a shift's directory says about it: who supervised it, its workers and machines.

    Read from ``shift.json`` (written once when the shift starts), else from ``state.json``
    (what older versions wrote and rewrote at every change); ``summary.json``, when the shift
    has ended, adds the workers added while it ran.
    """

    pid: int | None = None
    pid_ticks: int | None = None  # the supervisor's start time, /proc/PID/stat field 22
    started_at: float | None = None
    host: str | None = None
    workers: tuple[tuple[str, int | None, str | None], ...] = ()  # (worker, task, machine)
    machines: frozenset[str] = frozenset()

    @classmethod
    def read(cls, run_dir: Path) -> ShiftInfo:
        shift = read_json(run_dir / SHIFT_NAME) or {}
        state = {} if shift else read_json(run_dir / STATE_NAME) or {}
        summary = read_json(run_dir / SUMMARY_NAME) or {}
        head = shift or state
        started = head.get("started_at")
        ticks = head.get("pid_ticks", head.get("pid_start_ticks", head.get("start_ticks")))
        config = head.get("config")
        workers: list[tuple[str, int | None, str | None]] = []
        for source in (summary.get("workers"), state.get("workers")):
            if isinstance(source, list) and not workers:
                for w in source:
                    if isinstance(w, dict) and isinstance(w.get("worker"), str):
                        machine = w.get("machine")
                        workers.append(
                            (
                                w["worker"],
                                _int(w.get("task")),
                                machine if isinstance(machine, str) else None,
                            )
                        )
        machines: set[str] = {m for _, _, m in workers if m}
        if isinstance(config, dict):
            if not workers:
                workers = [
                    (f"w{i}", issue, None) for i, issue in enumerate(_config_issues(config), 1)
                ]
            for m in config.get("machines") or []:
                if isinstance(m, dict) and isinstance(m.get("name"), str):
                    machines.add(m["name"])
        host = head.get("host")
        return cls(
            pid=_int(head.get("pid")),
            pid_ticks=_int(ticks),
            started_at=float(started) if isinstance(started, int | float) else None,
            host=host if isinstance(host, str) else None,
            workers=tuple(workers),
            machines=frozenset(machines),
        )


def _config_issues(config: dict[str, Any]) -> list[int | None]:
    """The issue numbers of a config as a shift recorded it (``tasks`` a list, or a table
    with ``items``)."""
    tasks = config.get("tasks")
    items = tasks.get("items") if isinstance(tasks, dict) else tasks
    if not isinstance(items, list):
        return []
    return [_int(t.get("issue")) for t in items if isinstance(t, dict)]


# -- the end of a fleet -----------------------------------------------------------------------


def _supervisor_state(run_dir: Path) -> tuple[int | None, bool | None]:
    """``(pid, alive)`` of the shift's supervisor; ``alive`` None when it cannot be told
    (nothing recorded, or it ran on another host)."""
    info = ShiftInfo.read(run_dir)
    pid = info.pid
    if pid is None or pid <= 0:
        return None, None
    if info.host is not None and info.host != socket.gethostname():
        return pid, None
    if info.pid_ticks is not None:
        return pid, read_start_ticks(pid) == info.pid_ticks
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return pid, False
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return pid, False
    except psutil.Error:
        return pid, None
    if info.started_at is not None and created > info.started_at + 1.0:
        return pid, False  # the pid now names a process started after the shift
    return pid, True


def supervisor_alive(run_dir: Path) -> bool:
    """Whether the shift's supervisor is known to be running still (its pid, not a reuse)."""
    return _supervisor_state(run_dir)[1] is True


def supervisor_gone(run_dir: Path) -> int | None:
    """The pid of the shift's supervisor if it is known to be dead (or its pid reused)."""
    pid, alive = _supervisor_state(run_dir)
    return pid if alive is False else None


def follow(
    reader: LogReader,
    emit: Callable[[bytes], None],
    *,
    forever: bool,
    on_gone: Callable[[int], None] | None = None,
) -> int:
    """Emit what is there; with ``forever``, keep emitting until the fleet has ended.

    ``on_gone(pid)`` is told when following ended because the supervisor died without writing
    its summary (the command says so on stderr).
    """
    idle_since: float | None = None
    next_liveness = 0.0
    while True:
        if reader.pump(emit):
            idle_since = None
            continue
        if not forever or reader.ended:
            return EXIT_OK
        now = time.monotonic()
        if idle_since is None:
            idle_since = now
        if (reader.run_dir / SUMMARY_NAME).exists():
            # The summary comes before the report, the notifications and `fleet-ended`: while
            # the supervisor still lives, those are still to come.
            if now - idle_since >= SUMMARY_GRACE and not supervisor_alive(reader.run_dir):
                return EXIT_OK
        elif now >= next_liveness:
            next_liveness = now + LIVENESS_INTERVAL
            pid = supervisor_gone(reader.run_dir)
            if pid is not None:
                reader.pump(emit)
                if (
                    on_gone is not None
                    and not reader.ended
                    and not (reader.run_dir / SUMMARY_NAME).exists()
                ):
                    on_gone(pid)
                return EXIT_OK
        time.sleep(POLL_INTERVAL)
