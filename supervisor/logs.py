"""Log records: every agent line and every supervisor event, tagged, numbered and multiplexed.

One record per line, always with the same fields (DESIGN.md)::

    {"ts", "fleet", "worker", "task", "machine", "run", "stream", "seq", "line"}

``stream`` is ``stdout``, ``stderr`` or ``fleet`` (a supervisor event, which also carries
``event`` and its own fields).  ``seq`` counts per worker without gaps, so a reader can prove
that nothing was lost or reordered.  The JSONL file is the source of truth (``logs -f`` reads
it); the terminal view is a rendering of the same records.

Throughput matters: an agent can print hundreds of thousands of lines a second.  Output lines
therefore take a fast path -- a block of lines becomes its records in a few C passes over its
bytes (:meth:`LogMux.output`), writes are batched and flushed by a background task -- while
supervisor events go through structlog like any other structured log.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import anyio
import structlog

_encode: Callable[[str], str] = json.encoder.encode_basestring

FLUSH_INTERVAL = 0.1
FLUSH_BYTES = 1 << 20
_SEARCH_BLOCK = 4 << 20
_IOV_MAX = 1024


LOG_NAME = "fleet.jsonl"
_SEGMENT = re.compile(r"^fleet\.jsonl\.(\d+)$")


def rotated_segments(run_dir: Path) -> list[tuple[int, Path]]:
    """The rotated segments ``fleet.jsonl.N`` of a run, oldest (smallest N) first."""
    found: list[tuple[int, Path]] = []
    try:
        with os.scandir(run_dir) as entries:
            for entry in entries:
                match = _SEGMENT.match(entry.name)
                if match:
                    found.append((int(match.group(1)), Path(entry.path)))
    except FileNotFoundError:
        return []
    found.sort()
    return found


def log_files(run_dir: Path) -> list[Path]:
    """Every file of a run's log, in the order its records were written."""
    return [path for _, path in rotated_segments(run_dir)] + [run_dir / LOG_NAME]


def lines_containing(
    paths: Iterable[Path], needles: Sequence[bytes]
) -> Iterator[tuple[int, bytes]]:
    """``(i, line)`` for every whole line of ``paths`` (in order) that contains ``needles[i]``.

    A log can hold gigabytes of output records, of which a reader (the report, orphan
    adoption) wants a handful: blocks are searched with ``bytes.find`` rather than read line by
    line.  A line that contains several needles is yielded once per needle; within one needle
    the lines come in file order.  A last line without its newline was never finished: skipped.
    """
    if not all(needles):
        raise ValueError("lines_containing: an empty needle matches everywhere")
    for path in paths:
        try:
            handle = open(path, "rb")  # noqa: SIM115
        except OSError:
            continue
        with handle:
            rest = b""
            while block := handle.read(_SEARCH_BLOCK):
                data = rest + block if rest else block
                cut = data.rfind(b"\n") + 1
                data, rest = data[:cut], data[cut:]
                for index, needle in enumerate(needles):
                    at = data.find(needle)
                    while at >= 0:
                        start = data.rfind(b"\n", 0, at) + 1
                        end = data.find(b"\n", at) + 1
                        yield index, data[start:end]
                        at = data.find(needle, end)


def utc_timestamp(now: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-11-28T07:05:12.345Z``."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# -- turning bytes into lines -------------------------------------------------------------


def _utf8_cut(data: bytes, limit: int) -> int:
    """The largest cut <= ``limit`` that does not split a UTF-8 character."""
    cut = limit
    while cut > limit - 4 and cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > 0 else limit


class LineSplitter:
    """Splits one stream's bytes into lines, never holding more than ``max_bytes``.

    Lines come back as one block of bytes (the lines joined by newlines, without the last
    one): the record encoder turns a whole block into records with a handful of C passes, so
    no line ever becomes a Python object of its own.  A line longer than ``max_bytes`` is
    emitted in pieces cut on UTF-8 character boundaries.  ``offset`` is the byte offset just
    after the last emitted line: the point from which a re-attached reader must resume to lose
    and repeat nothing.  Bytes are passed on as they came; invalid UTF-8 is the encoder's
    business.
    """

    def __init__(self, max_bytes: int = 65536, offset: int = 0) -> None:
        self.max_bytes = max_bytes
        self.offset = offset
        self._pending = b""

    def feed(self, data: bytes) -> bytes | None:
        """The complete lines ``data`` finishes, as a block; ``None`` when it finishes none."""
        buf = self._pending + data if self._pending else data
        end = buf.rfind(b"\n")
        block: bytes | None = None
        if end < 0:
            self._pending = buf
        else:
            block = buf[:end]
            self._pending = buf[end + 1 :]
            if len(block) > self.max_bytes and self._has_long_line(block):
                block = b"\n".join(
                    piece for line in block.split(b"\n") for piece in self._pieces(line)
                )
            self.offset += end + 1
        if len(self._pending) > self.max_bytes:
            # A line still without its newline: emit all but a short tail now (bounded memory).
            pieces = self._pieces(self._pending)
            self._pending = pieces.pop()
            self.offset += sum(map(len, pieces))
            cut = b"\n".join(pieces)
            block = cut if block is None else block + b"\n" + cut
        return block

    def _has_long_line(self, block: bytes) -> bool:
        """Whether a line of ``block`` is longer than ``max_bytes`` (a few ``rfind`` calls,
        each skipping up to ``max_bytes`` ahead, rather than one step per line)."""
        limit = self.max_bytes
        start = 0
        while len(block) - start > limit:
            newline = block.rfind(b"\n", start, start + limit + 1)
            if newline < 0:
                return True  # no newline among the line's first limit + 1 bytes
            start = newline + 1
        return False

    def _pieces(self, line: bytes) -> list[bytes]:
        """``line`` cut into pieces of at most ``max_bytes``, the last one possibly shorter."""
        out: list[bytes] = []
        while len(line) > self.max_bytes:
            cut = _utf8_cut(line, self.max_bytes)
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
        return out

    def finish(self) -> bytes | None:
        """Whatever is left when the stream ends, as a last line (it had no newline)."""
        if not self._pending:
            return None
        rest, self._pending = self._pending, b""
        self.offset += len(rest)
        return rest


# -- record encoding ------------------------------------------------------------------------

_RECORD_END = b'"}\n'
_LINE_KEY = b',"line":"'
_SEQ_SLOTS = b"%s%s"  # a record's seq, in two parts: see _seq_args
#: Deleting these from a block leaves the bytes JSON escapes (control characters, the quote
#: and the backslash), and the newlines between lines.
_ORDINARY = bytes(b for b in range(0x20, 0x100) if b not in b'"\\')
#: How JSON writes each byte it escapes (as the C encoder does); the backslash goes first.
_JSON_ESCAPES = {
    b: _encode(chr(b))[1:-1].encode() for b in (0x5C, 0x22, *range(0x20)) if b != 0x0A
}
#: Seq numbers are ``high`` followed by three ``low`` digits: ``low`` comes from these tables,
#: so that a block of records needs no number formatted per line.
_SEQ_GROUP = 1000
_SEQ_PLAIN = [b"%d" % n for n in range(_SEQ_GROUP)]
_SEQ_PADDED = [b"%03d" % n for n in range(_SEQ_GROUP)]


def _json_contents(block: bytes) -> tuple[bytes, bytes, int]:
    """``block`` made valid UTF-8 (U+FFFD for what is not), the same JSON-escaped with its
    newlines kept as they are, and its number of lines.

    Most output needs no escaping at all; one ``translate`` shows which bytes do (all of them
    are ASCII, and UTF-8 never uses ASCII bytes inside a multi-byte character), and one
    ``replace`` per such byte escapes the whole block.
    """
    if not block.isascii():
        try:
            block.decode("utf-8")
        except UnicodeDecodeError:
            block = block.decode("utf-8", "replace").encode("utf-8")
    special = block.translate(None, _ORDINARY)
    count = special.count(b"\n") + 1
    escaped = block
    if len(special) >= count:  # more than the newlines between lines
        present = set(special)
        for byte, replacement in _JSON_ESCAPES.items():  # the backslash first
            if byte in present:
                escaped = escaped.replace(bytes((byte,)), replacement)
    return block, escaped, count


def _seq_args(first: int, count: int, last: bytes) -> tuple[bytes, ...]:
    """The ``%s%s`` arguments of ``count`` records numbered from ``first``: the high digits and
    the low three (from the tables), the last record's pair replaced by ``b"", last``."""
    args: list[bytes] = [b""] * (2 * count)
    done = 0
    while done < count:
        high, low = divmod(first + done, _SEQ_GROUP)
        size = min(count - done, _SEQ_GROUP - low)
        at = 2 * done
        if high:
            args[at : at + 2 * size : 2] = [b"%d" % high] * size
            args[at + 1 : at + 2 * size : 2] = _SEQ_PADDED[low : low + size]
        else:
            args[at + 1 : at + 2 * size : 2] = _SEQ_PLAIN[low : low + size]
        done += size
    args[-2] = b""
    args[-1] = last
    return tuple(args)


# -- sinks ----------------------------------------------------------------------------------


_COLOURS = ("36", "33", "35", "32", "34", "31", "96", "93", "95", "92", "94", "91")


def use_colour(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass(frozen=True)
class Tag:
    """Who a record is about: the fields every record of one worker's run shares."""

    worker: str
    task: int | None
    machine: str
    run: int


class ConsoleRenderer:
    """Renders records as ``w2 #42 │ line`` with a colour per worker, aligned."""

    def __init__(self, out: TextIO, *, colour: bool | None = None, width: int = 10) -> None:
        self.out = out
        self.colour = use_colour(out) if colour is None else colour
        self.width = width
        self._colour_of: dict[str, str] = {}

    def prefix(self, worker: str, task: int | None, stream: str) -> str:
        label = f"{worker} #{task}" if task is not None else worker
        bar = {"stdout": "│", "stderr": "┃", "fleet": "┆"}.get(stream, "│")
        text = f"{label:<{self.width}} {bar} "
        if not self.colour:
            return text
        code = self._colour_of.setdefault(worker, _COLOURS[len(self._colour_of) % len(_COLOURS)])
        if worker == "fleet":
            code = "1"
        return f"\x1b[{code}m{text}\x1b[0m"

    def render(self, worker: str, task: int | None, stream: str, lines: Iterable[str]) -> str:
        return self.render_text(worker, task, stream, "\n".join(lines))

    def render_text(self, worker: str, task: int | None, stream: str, text: str) -> str:
        """``text``'s lines (joined by newlines), each behind the worker's prefix."""
        prefix = self.prefix(worker, task, stream)
        if stream == "fleet" and self.colour:
            prefix += "\x1b[2m"
            return prefix + text.replace("\n", "\x1b[0m\n" + prefix) + "\x1b[0m\n"
        return prefix + text.replace("\n", "\n" + prefix) + "\n"


class LogMux:
    """The one place records are made: numbers them, writes JSONL, renders the terminal view."""

    def __init__(
        self,
        fleet: str,
        jsonl_path: Path,
        console: ConsoleRenderer | None,
        *,
        rotate_bytes: int = 0,
    ) -> None:
        self.fleet = fleet
        self.jsonl_path = jsonl_path
        self.rotate_bytes = rotate_bytes
        jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(jsonl_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size
        self._segments = len(list(jsonl_path.parent.glob(jsonl_path.name + ".*")))
        self._console = console
        self._seq: dict[str, int] = {}
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._console_pending: list[str] = []
        self._fleet_json = _encode(fleet)
        self.records = 0
        self.last_output: dict[str, float] = {}
        self._wanted: anyio.Event | None = None  # made by the flusher, inside the event loop

    # records ---------------------------------------------------------------------------

    def seq(self, worker: str) -> int:
        """The last ``seq`` given to ``worker`` (0 when none)."""
        return self._seq.get(worker, 0)

    def resume_seq(self, worker: str, seq: int) -> None:
        """Continue ``worker``'s numbering after ``seq`` (used when a run is re-adopted)."""
        self._seq[worker] = max(self._seq.get(worker, 0), seq)

    def _head(self, tag: Tag, stream: str, ts: str) -> bytes:
        """Every field of an output record up to ``"seq":``, as a ``%`` format (``%%``)."""
        task = "null" if tag.task is None else str(tag.task)
        head = (
            f'{{"ts":"{ts}","fleet":{self._fleet_json},"worker":{_encode(tag.worker)},'
            f'"task":{task},"machine":{_encode(tag.machine)},"run":{tag.run},'
            f'"stream":"{stream}","seq":'
        )
        return head.encode("utf-8", "replace").replace(b"%", b"%%")

    def output(self, tag: Tag, stream: str, block: bytes, end_offset: int) -> None:
        """Record a block of agent output lines (fast path): ``block`` is the lines joined by
        newlines, as :class:`LineSplitter` gives them.

        The last record of the batch also carries ``off``, the byte offset in the run's
        ``stream`` file just after these lines.  Batches reach the file whole (one ``write``),
        so after a crash the last ``off`` in the log says exactly where a re-adopting
        supervisor must resume reading: nothing lost, nothing repeated.

        An agent can print a million lines a second, so no line becomes a Python object: the
        records of a block differ only in ``seq`` and ``line``, so the block (escaped by
        :func:`_json_contents`) becomes one ``%`` format by turning each newline into the end
        of one record and the start of the next, and the seqs come from tables
        (:func:`_seq_args`).  That is a few C passes over the block, whatever its line count.
        """
        now = time.time()
        text, escaped, count = _json_contents(block)
        if b"%" in escaped:
            escaped = escaped.replace(b"%", b"%%")
        head = self._head(tag, stream, utc_timestamp(now))
        starts = head + _SEQ_SLOTS + _LINE_KEY
        form = starts + escaped.replace(b"\n", _RECORD_END + starts) + _RECORD_END
        seq = self._seq.get(tag.worker, 0)
        last = b'%d,"off":%d' % (seq + count, end_offset)
        self._seq[tag.worker] = seq + count
        self.last_output[tag.worker] = now
        self._append(form % _seq_args(seq + 1, count, last), count)
        if self._console is not None:
            self._console_pending.append(
                self._console.render_text(tag.worker, tag.task, stream, text.decode("utf-8"))
            )

    def event(self, tag: Tag, event: str, message: str, fields: Mapping[str, Any]) -> None:
        """Record a supervisor event (stream ``fleet``)."""
        seq = self._seq.get(tag.worker, 0) + 1
        self._seq[tag.worker] = seq
        record: dict[str, Any] = {
            "ts": utc_timestamp(),
            "fleet": self.fleet,
            "worker": tag.worker,
            "task": tag.task,
            "machine": tag.machine,
            "run": tag.run,
            "stream": "fleet",
            "seq": seq,
            "line": message,
            "event": event,
        }
        for key, value in fields.items():
            record.setdefault(key, value)
        line = json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":"))
        self._append((line + "\n").encode("utf-8", "replace"), 1)
        if self._console is not None:
            self._console_pending.append(
                self._console.render(tag.worker, tag.task, "fleet", [message])
            )
            self.flush()

    def _append(self, batch: bytes, records: int) -> None:
        """Queue whole records (a batch stays whole: one segment, one write)."""
        self._pending.append(batch)
        self.records += records
        self._pending_bytes += len(batch)
        if self._wanted is not None and not self._wanted.is_set():
            self._wanted.set()
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()

    # writing ---------------------------------------------------------------------------

    def flush(self) -> None:
        if self._pending:
            batches = self._pending
            self._pending = []
            self._pending_bytes = 0
            group: list[bytes] = []
            size = self._size
            for batch in batches:
                if self.rotate_bytes and size and size + len(batch) > self.rotate_bytes:
                    self._write(group)
                    group = []
                    self._rotate()
                    size = 0
                group.append(batch)
                size += len(batch)
            self._write(group)
        if self._console_pending and self._console is not None:
            try:
                self._console.out.write("".join(self._console_pending))
                self._console.out.flush()
            except (BrokenPipeError, ValueError):
                self._console = None  # the terminal went away; the JSONL still has everything
            self._console_pending.clear()

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
        """Append whole batches with one ``writev`` (no copy into one buffer first)."""
        if not batches:
            return
        total = sum(map(len, batches))
        written = os.writev(self._fd, batches) if len(batches) <= _IOV_MAX else 0
        if written < total:  # a full disk or a signal; a regular file takes it all otherwise
            view = memoryview(b"".join(batches))[written:]
            while view:
                view = view[os.write(self._fd, view) :]
        self._size += total

    def _rotate(self) -> None:
        """``fleet.jsonl`` → ``fleet.jsonl.N`` (N = 1, 2, … oldest first), then a new file.

        Only ever between whole batches, so a reader that finishes the renamed file and then
        opens the new one sees every record once.
        """
        self._segments += 1
        os.rename(self.jsonl_path, f"{self.jsonl_path}.{self._segments}")
        os.close(self._fd)
        self._fd = os.open(self.jsonl_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = 0

    def close(self) -> None:
        self.flush()
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


def terminal_console() -> ConsoleRenderer:
    """The terminal view on standard output."""
    return ConsoleRenderer(sys.stdout)
