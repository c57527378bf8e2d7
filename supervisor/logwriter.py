"""The log's writer: every agent line and every supervisor event, numbered, as JSONL records.

What a record holds, and in what order, is :mod:`supervisor.records`' (the schema); this module
writes records fast and keeps writing them when the disk does not cooperate.

**Fast.**  An agent can print hundreds of thousands of lines a second.  Output lines therefore
take a fast path -- a block of lines becomes its records in a few C passes over its bytes
(:meth:`LogMux.output`), writes are batched and flushed by a background task -- while supervisor
events go through structlog and the schema's plain encoder (:func:`supervisor.records.encode`).
The fast path is tested to produce exactly the plain encoder's bytes for any input.

**Whole records only, whatever the disk does.**  A batch of records (one output block, or one
event) reaches the file whole or not at all: a write cut short (``ENOSPC`` in the middle of a
``writev``) is truncated back to where it began and the batch is kept to be written again.  A
file opened with a torn tail -- a last line without its newline, or records of a batch without
its last record, from a crash or power cut in the middle of a write -- is truncated back to its
last whole batch (:func:`repair_torn_tail`; why truncate rather than terminate: see there).

**A disk that is full or unwritable is a state, not a crash.**  The records the writer cannot
write wait in memory (up to :data:`HOLD_BYTES`; output beyond that is dropped and counted, its
lines stay in the runs' own files) and are retried every :data:`RETRY_INTERVAL`; the log says
once when writing started failing and once when it works again; ``on_fault`` tells the fleet
(to hold new starts), and :meth:`LogMux.writable` lets readers of agent output pause meanwhile,
so that output waits in the agents' own files rather than in the supervisor's memory
(:func:`supervisor.lines.pump_output` does).

**Private.**  The log and its rotated segments are created ``0600``: agent output holds code,
prompts and whatever tokens a tool printed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import structlog

from supervisor import recordenc
from supervisor.console import ConsoleRenderer, ConsoleSink
from supervisor.records import (
    FIELDS,
    encode,
    event_record,
    last_batch_end,
    rotated_segments,
    utc_timestamp,
)

FLUSH_INTERVAL: Final = 0.1
FLUSH_BYTES: Final = 1 << 20
#: While the log cannot be written, at most this much of records waits in memory.
HOLD_BYTES: Final = 64 << 20
#: While the log cannot be written, a write is tried again this often.
RETRY_INTERVAL: Final = 1.0
LOG_MODE: Final = 0o600
_IOV_MAX: Final = 1024
_HEADS_KEPT: Final = 4096


class LogUnwritable(Exception):
    """The log file cannot be created or opened at all (at start: the state directory is not
    writable, its file system is read-only or full).  The message names the file, the cause and
    the fix."""

    def __init__(self, path: Path, error: OSError) -> None:
        self.path = path
        self.error = error
        name = errno.errorcode.get(error.errno or 0, "error")
        super().__init__(
            f"cannot write the fleet's log {path}: {error.strerror or error} ({name}); fix: "
            "make the state directory writable by this user and give its file system room "
            "(or choose another state_dir)"
        )


# -- the file ----------------------------------------------------------------------------------


def repair_torn_tail(fd: int) -> int:
    """Cut a log file back to its last whole batch; the number of bytes removed.

    A crash or power cut in the middle of a write can leave a last line without its newline,
    and before it records of a batch whose last record (the one with ``off``) never made it.
    Truncated away, rather than terminated with a newline: the torn line is not JSON, and a
    log whose every line is a record is what readers (``jq``, ``logs --json``, scripts) can
    rely on; and nothing is lost by it, because the lines of a batch that did not end come
    after the last ``off`` of their run, which is exactly where an adopting supervisor resumes
    reading the run's own files.  Cheap on a sound file: one read of its last block.
    """
    size = os.fstat(fd).st_size
    keep = last_batch_end(fd, size)
    if keep < size:
        os.ftruncate(fd, keep)
    return size - keep


# -- the writer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tag:
    """Who a record is about: the fields every record of one worker's run shares."""

    worker: str
    task: int | None
    machine: str
    run: int


def repair_dead_log(path: Path) -> int:
    """Cut a dead shift's log back to its last whole batch (see :func:`repair_torn_tail`);
    the number of bytes removed, 0 when there is no such file or it cannot be repaired.

    The shift that wrote it was killed, maybe in the middle of a batch: the records of that
    batch came after the last ``off`` of their run, which is where the adopter resumes reading
    the run's own files, so left in place they would be logged twice.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return repair_torn_tail(fd)
    except OSError:
        return 0
    finally:
        os.close(fd)


def _open_log(path: Path) -> int:
    """Open (or create, ``0600``) a log file for appending, its torn tail repaired (read and
    write: the repair reads the file's end)."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_MODE)
    try:
        if os.fstat(fd).st_size:
            os.fchmod(fd, LOG_MODE)  # a file an older version made 0644
            repair_torn_tail(fd)
    except OSError:
        os.close(fd)
        raise
    return fd


def _describe(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0, "error")
    return f"{error.strerror or error} ({name})"


class LogMux:
    """The one place records are made: numbers them, writes JSONL, feeds the terminal view.

    ``on_fault`` is called with the error when writing the log starts failing and with None
    when it works again (the fleet holds new starts meanwhile).  ``clock`` gives ``ts`` (tests
    fix it).
    """

    def __init__(
        self,
        fleet: str,
        jsonl_path: Path,
        console: ConsoleRenderer | None,
        *,
        rotate_bytes: int = 0,
        on_fault: Callable[[OSError | None], None] | None = None,
        hold_bytes: int = HOLD_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fleet = fleet
        self.jsonl_path = jsonl_path
        self.rotate_bytes = rotate_bytes
        self.hold_bytes = hold_bytes
        self.on_fault = on_fault
        self._clock = clock
        try:
            jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = _open_log(jsonl_path)
        except OSError as exc:
            raise LogUnwritable(jsonl_path, exc) from None
        self._size = os.fstat(self._fd).st_size
        self._segments = max([n for n, _ in rotated_segments(jsonl_path.parent)], default=0)
        self._renamed = False  # rotated away, the new file not yet opened (see _rotate)
        self._rotation_error: OSError | None = None
        self._torn = False  # a cut record could not be truncated away (see _write)
        self._writing = False
        self._renderer = console
        self._sink = ConsoleSink(console.out) if console is not None else None
        self._console_pending: list[str] = []
        self._seq: dict[str, int] = {}
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._heads: dict[tuple[Tag, str], bytes] = {}
        self.last_output: dict[str, float] = {}
        self._wanted: anyio.Event | None = None  # made by the flusher, inside the event loop
        # faults
        self.fault: OSError | None = None
        self._fault_since = 0.0
        self._next_try = 0.0
        self._dropped = 0
        self._waiters: list[anyio.Event] = []

    # records ---------------------------------------------------------------------------

    def _head(self, tag: Tag, stream: str, ts: str) -> bytes:
        """Every field of an output record up to ``"seq":``.

        The fields after ``ts`` are the same for every block of one worker's run and stream:
        made once (by ``json``, in the schema's order), kept.
        """
        rest = self._heads.get((tag, stream))
        if rest is None:
            fields = dict(
                zip(
                    FIELDS[1:-2],
                    (tag.worker, tag.task, tag.machine, tag.run, stream),
                    strict=True,
                )
            )
            text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
            rest = ("," + text[1:-1] + ',"seq":').encode("utf-8", "replace")
            if len(self._heads) > _HEADS_KEPT:
                self._heads.clear()  # runs that ended long ago
            self._heads[(tag, stream)] = rest
        return b'{"ts":"' + ts.encode() + b'"' + rest

    def output(self, tag: Tag, stream: str, block: bytes, end_offset: int) -> None:
        """Record a block of agent output lines (fast path): ``block`` is the lines joined by
        newlines, as :class:`supervisor.lines.LineSplitter` gives them.

        The last record of the batch also carries ``off``, the byte offset in the run's
        ``stream`` file just after these lines.  Batches reach the file whole (one ``write``),
        so after a crash the last ``off`` in the log says exactly where a re-adopting
        supervisor must resume reading: nothing lost, nothing repeated.

        An agent can print a million lines a second: a block becomes its records in one call
        of :data:`supervisor.recordenc.encode_lines`, whatever its line count.
        """
        now = self._clock()
        text = recordenc.valid_utf8(block)
        seq = self._seq.get(tag.worker, 0)
        head = self._head(tag, stream, utc_timestamp(now))
        batch, count = recordenc.encode_lines(text, head, seq + 1, b',"off":%d' % end_offset)
        self._seq[tag.worker] = seq + count
        self.last_output[tag.worker] = now
        self._append(batch, output=True)
        if self._renderer is not None:
            self._console_pending.append(
                self._renderer.render_text(tag.worker, tag.task, stream, text.decode("utf-8"))
            )

    def event(self, tag: Tag, event: str, message: str, fields: Mapping[str, Any]) -> None:
        """Record a supervisor event (stream ``fleet``), and show it at once."""
        seq = self._seq.get(tag.worker, 0) + 1
        self._seq[tag.worker] = seq
        record = event_record(
            ts=utc_timestamp(self._clock()),
            fleet=self.fleet,
            worker=tag.worker,
            task=tag.task,
            machine=tag.machine,
            run=tag.run,
            seq=seq,
            event=event,
            message=message,
            details=fields,
        )
        self._append(encode(record), output=False)
        if self._renderer is not None:
            self._console_pending.append(
                self._renderer.render_text(tag.worker, tag.task, "fleet", message)
            )
        self.flush()

    def _append(self, batch: bytes, *, output: bool) -> None:
        """Queue whole records (a batch stays whole: one segment, one write).

        While the log cannot be written, output beyond :attr:`hold_bytes` is dropped (counted;
        its lines stay in the run's own files); events are always kept (they are few).
        """
        if self.fault is not None and output and self._pending_bytes >= self.hold_bytes:
            self._dropped += 1
            return
        self._pending.append(batch)
        self._pending_bytes += len(batch)
        if self._wanted is not None and not self._wanted.is_set():
            self._wanted.set()
        if self._pending_bytes >= FLUSH_BYTES and self.fault is None:
            self.flush()

    # faults ----------------------------------------------------------------------------

    async def writable(self) -> None:
        """Return once the log can be written (at once when it can): a reader of agent output
        waits here while the disk is full, so the output waits in the run's own files."""
        while self.fault is not None:
            waiter = anyio.Event()
            self._waiters.append(waiter)
            await waiter.wait()

    def _failing(self, error: OSError) -> None:
        """A write failed: try again in a while; the first time, tell the fleet and log it."""
        now = time.time()
        self._next_try = time.monotonic() + RETRY_INTERVAL
        if self.fault is not None:
            self.fault = error
            return
        self.fault, self._fault_since = error, now
        self._dropped = 0
        if self.on_fault is not None:
            self.on_fault(error)
        self.event(
            Tag("fleet", None, "-", 0),
            "log-unwritable",
            f"✗ cannot write the log {self.jsonl_path}: {_describe(error)}; records wait in "
            f"memory (up to {self.hold_bytes >> 20} MiB) and are written again every "
            f"{RETRY_INTERVAL:g}s; no new runs meanwhile, running agents go on (their output "
            "waits in their own files)",
            {"error": _describe(error), "errno": error.errno},
        )

    def _recovered(self, held: int) -> None:
        """Writing works again: wake the readers that wait, tell the fleet, log it once."""
        error, since = self.fault, self._fault_since
        assert error is not None
        self.fault = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.set()
        lost = (
            f"; {self._dropped:,} output batches beyond the memory bound were not logged "
            "(their lines are in the runs' stdout/stderr files)"
            if self._dropped
            else ""
        )
        self.event(
            Tag("fleet", None, "-", 0),
            "log-writable",
            f"✓ the log {self.jsonl_path} can be written again after "
            f"{time.time() - since:.0f}s ({_describe(error)}); {held:,} bytes of records that "
            f"waited were written{lost}",
            {"error": _describe(error), "waited_bytes": held, "dropped_batches": self._dropped},
        )
        # After the line above, so that what the fleet logs follows it; unless writing that
        # line failed again (then the fleet has been told of the new fault already).
        if self.on_fault is not None and self.fault is None:
            self.on_fault(None)

    # writing ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what waits: records to the log (unless it is failing and the next try is not
        due), rendered lines to the terminal view (never waiting for it)."""
        if self._pending and (self.fault is None or time.monotonic() >= self._next_try):
            self._write_pending()
        if self._console_pending:
            if self._sink is not None:
                self._sink.write("".join(self._console_pending))
            self._console_pending.clear()

    def _write_pending(self) -> None:
        """Write every waiting batch, rotating between batches; on an error keep the batches
        not written (in order) and enter the failing state."""
        if self._writing:
            return  # an event logged while rotating: written by the next flush
        self._writing = True
        batches, self._pending = self._pending, []
        held, self._pending_bytes = self._pending_bytes, 0
        group: list[bytes] = []
        done = 0  # batches written
        try:
            size = self._size
            for batch in batches:
                if self.rotate_bytes and size and size + len(batch) > self.rotate_bytes:
                    self._write(group)
                    done += len(group)
                    group = []
                    self._rotate()
                    size = self._size
                group.append(batch)
                size += len(batch)
            self._write(group)
        except OSError as exc:
            self._pending = batches[done:] + self._pending
            self._pending_bytes = sum(map(len, self._pending))
            self._writing = False
            self._failing(exc)
            return
        self._writing = False
        if self.fault is not None:
            self._recovered(held)

    async def flush_periodically(self, interval: float = FLUSH_INTERVAL) -> None:
        """Flush batched writes at most ``interval`` seconds after they were made, until
        cancelled; an idle fleet costs no wake-ups at all."""
        while True:
            self._wanted = anyio.Event()
            if not self._pending and not self._console_pending:
                await self._wanted.wait()
            await anyio.sleep(interval)
            self.flush()

    def _write(self, batches: list[bytes]) -> None:
        """Append whole batches with one ``writev`` (no copy into one buffer first), or none.

        A write cut short (a full disk) is truncated back to where it began, and the error
        raised: the caller keeps the batches and writes them again later.  Should even the
        truncation fail, the cut record is ended with a newline before the next write (a line
        readers skip: it is not a record), never glued to the next record.
        """
        if not batches:
            return
        if self._torn:
            self._mend()
        before = self._size
        total = sum(map(len, batches))
        try:
            written = os.writev(self._fd, batches) if len(batches) <= _IOV_MAX else 0
            if written < total:  # a full disk or a signal; a regular file takes it all otherwise
                view = memoryview(b"".join(batches))[written:]
                while view:
                    view = view[os.write(self._fd, view) :]
        except OSError:
            try:
                if os.fstat(self._fd).st_size != before:
                    os.ftruncate(self._fd, before)
            except OSError:
                self._torn = True
            raise
        self._size = before + total

    def _mend(self) -> None:
        """After a cut record could not be truncated: try again, else end it with a newline."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            os.write(self._fd, b"\n")  # raises while the disk is still full: tried again later
            self._size = os.fstat(self._fd).st_size
        self._torn = False

    def _rotate(self) -> None:
        """``fleet.jsonl`` → ``fleet.jsonl.N`` (N = 1, 2, … oldest first), then a new file.

        Only ever between whole batches, so a reader that finishes the renamed file and then
        opens the new one sees every record once.  If the directory refuses (read-only,
        permissions, no inodes), the log goes on in the file it has -- a renamed one included:
        readers that follow by inode finish it before they take the next -- and rotation is
        tried again at the next batch; the log says so once.
        """
        try:
            if not self._renamed:
                os.rename(self.jsonl_path, f"{self.jsonl_path}.{self._segments + 1}")
                self._segments += 1
                self._renamed = True
            fd = _open_log(self.jsonl_path)
        except OSError as exc:
            if self._rotation_error is None:
                self._rotation_error = exc
                self.event(
                    Tag("fleet", None, "-", 0),
                    "log-rotation-failed",
                    f"⚠ cannot rotate the log {self.jsonl_path}: {_describe(exc)}; it grows "
                    "past log_rotate_bytes until rotation works again",
                    {"error": _describe(exc)},
                )
            return
        os.close(self._fd)
        self._fd, self._size = fd, 0
        self._renamed = False
        self._rotation_error = None

    def close(self) -> None:
        """Write what waits (one last try if the log is failing), end the terminal view."""
        if self.fault is not None:
            self._next_try = 0.0
        self.flush()
        if self._pending:
            note = (
                f"✗ {len(self._pending):,} batches of records could not be written to "
                f"{self.jsonl_path} ({_describe(self.fault or OSError())}); their lines are in "
                "the runs' own stdout/stderr files\n"
            )
            if self._sink is not None:
                self._sink.write(note)
            else:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(note)
        if self._sink is not None:
            self._sink.close()
        os.close(self._fd)

    # structlog ---------------------------------------------------------------------------

    def logger(self, tag: Tag) -> structlog.typing.FilteringBoundLogger:
        """A structlog logger whose events become ``fleet`` records of ``tag``'s worker."""
        mux = self

        def sink(
            _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
        ) -> Mapping[str, Any]:
            event = str(event_dict.pop("event", ""))
            message = str(event_dict.pop("msg", event))
            worker_tag = Tag(
                worker=str(event_dict.pop("worker", tag.worker)),
                task=event_dict.pop("task", tag.task),
                machine=str(event_dict.pop("machine", tag.machine)),
                run=int(event_dict.pop("run", tag.run)),
            )
            mux.event(worker_tag, event, message, event_dict)
            raise structlog.DropEvent

        logger: structlog.typing.FilteringBoundLogger = structlog.wrap_logger(
            None,
            processors=[structlog.processors.add_log_level, sink],
            wrapper_class=structlog.make_filtering_bound_logger(0),
        )
        return logger


def route_structlog(mux: LogMux) -> None:
    """Send every other structlog event of this process (the hosts' warnings, say) into the
    fleet's log as ``fleet`` records, so that nothing bypasses the JSONL or the terminal view."""

    def forward(
        _logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> Mapping[str, Any]:
        event = str(event_dict.pop("event", ""))
        machine = str(event_dict.pop("machine", "-"))
        details = " ".join(f"{k}={v}" for k, v in event_dict.items() if k != "level")
        where = f"{machine}: " if machine != "-" else ""
        text = f"{where}{method}: {event}" + (f" ({details})" if details else "")
        mux.event(Tag("fleet", None, machine, 0), event.replace(" ", "-"), text, event_dict)
        raise structlog.DropEvent

    structlog.configure(
        processors=[structlog.processors.add_log_level, forward],
        wrapper_class=structlog.make_filtering_bound_logger(20),
        cache_logger_on_first_use=False,
    )
