"""Log records: every agent line and every supervisor event, tagged, numbered and multiplexed.

One record per line, always with the same fields (DESIGN.md)::

    {"ts", "fleet", "worker", "task", "machine", "run", "stream", "seq", "line"}

``stream`` is ``stdout``, ``stderr`` or ``fleet`` (a supervisor event, which also carries
``event`` and its own fields).  ``seq`` counts per worker without gaps, so a reader can prove
that nothing was lost or reordered.  The JSONL file is the source of truth (``logs -f`` reads
it); the terminal view is a rendering of the same records.

Throughput matters: an agent can print hundreds of thousands of lines a second.  Output lines
therefore take a fast path -- the record prefix is formatted once per chunk, the line is
escaped by the C JSON encoder, writes are batched and flushed by a background task -- while
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
    """Splits one stream's bytes into text lines, never holding more than ``max_bytes``.

    Invalid UTF-8 becomes U+FFFD; a line longer than ``max_bytes`` is emitted in pieces (cut on
    character boundaries).  ``offset`` is the byte offset just after the last emitted line: the
    point from which a re-attached reader must resume to lose and repeat nothing.
    """

    def __init__(self, max_bytes: int = 65536, offset: int = 0) -> None:
        self.max_bytes = max_bytes
        self.offset = offset
        self._pending = b""
        #: After :meth:`feed`: the returned lines joined with newlines, when the decoder had
        #: them as one block already (saves the callers joining them again); else None.
        self.text: str | None = None

    def feed(self, data: bytes) -> list[str]:
        buf = self._pending + data if self._pending else data
        end = buf.rfind(b"\n")
        lines: list[str] = []
        self.text = None
        if end < 0:
            self._pending = buf
        else:
            complete = buf[:end]
            self._pending = buf[end + 1 :]
            text = complete.decode("utf-8", "replace")
            lines = text.split("\n")
            # A line has at most as many characters as bytes (exactly as many when ASCII), so
            # only a chunk with a line of more than max_bytes/4 characters needs the bytes.
            if len(complete) > self.max_bytes and max(map(len, lines)) > (
                self.max_bytes if text.isascii() else self.max_bytes // 4
            ):
                lines = []
                for part in complete.split(b"\n"):
                    lines.extend(self._pieces(part, final=True))
            else:
                self.text = text
            self.offset += end + 1
        if len(self._pending) > self.max_bytes:
            self.text = None
            lines.extend(self._pieces(self._pending, final=False))
        return lines

    def _pieces(self, part: bytes, *, final: bool) -> list[str]:
        """Cut an over-long line into pieces; keep a short tail pending unless ``final``."""
        out: list[str] = []
        while len(part) > self.max_bytes:
            cut = _utf8_cut(part, self.max_bytes)
            out.append(part[:cut].decode("utf-8", "replace"))
            part = part[cut:]
            if not final:
                self.offset += cut
        if final:
            out.append(part.decode("utf-8", "replace"))
        else:
            self._pending = part
        return out

    def finish(self) -> list[str]:
        """Whatever is left when the stream ends, as a last line (it had no newline)."""
        if not self._pending:
            return []
        rest, self._pending = self._pending, b""
        self.offset += len(rest)
        return [rest.decode("utf-8", "replace")]


# -- record encoding ------------------------------------------------------------------------

_RECORD_END = '"}\n'
_LINE_KEY = ',"line":"'
#: The bytes JSON strings escape: the control characters, the quote and the backslash.
_ESCAPED_BYTES = bytes([*range(0x20), 0x22, 0x5C])


def _escaped(lines: list[str], text: str) -> list[str]:
    """``lines`` as JSON string contents (no quotes); ``text`` is them joined by newlines.

    Most output needs no escaping at all; whether a batch does is one C pass over its UTF-8
    bytes (all the escaped characters are ASCII, and UTF-8 never uses ASCII bytes inside a
    multi-byte character): the batch is clean when deleting them removes only its newlines.
    """
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) - len(raw.translate(None, _ESCAPED_BYTES)) == len(lines) - 1:
        return lines
    if "\\" not in text:
        # One C call escapes the whole batch; with no backslash in it, every escaped newline
        # is a line boundary.
        pieces = _encode(text)[1:-1].split("\\n")
        if len(pieces) == len(lines):
            return pieces
    return [_encode(line)[1:-1] for line in lines]


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
        prefix = self.prefix(worker, task, stream)
        if stream == "fleet" and self.colour:
            return "".join(f"{prefix}\x1b[2m{line}\x1b[0m\n" for line in lines)
        return "".join(f"{prefix}{line}\n" for line in lines)


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
        self._pending: list[str] = []
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

    def _head(self, tag: Tag, stream: str, ts: str) -> str:
        task = "null" if tag.task is None else str(tag.task)
        return (
            f'{{"ts":"{ts}","fleet":{self._fleet_json},"worker":{_encode(tag.worker)},'
            f'"task":{task},"machine":{_encode(tag.machine)},"run":{tag.run},'
            f'"stream":"{stream}",'
        )

    def output(
        self, tag: Tag, stream: str, lines: list[str], end_offset: int, text: str | None = None
    ) -> None:
        """Record agent output lines (fast path).

        ``text``, when given, is ``lines`` joined with newlines (the splitter has it already).
        The last record of the batch also carries ``off``, the byte offset in the run's
        ``stream`` file just after these lines.  Batches reach the file whole (one ``write``),
        so after a crash the last ``off`` in the log says exactly where a re-adopting
        supervisor must resume reading: nothing lost, nothing repeated.

        The records of a batch differ only in ``seq`` and ``line``, so they are built with
        one ``join`` over a list filled by slice assignments from C iterators, not with one
        format call per line; and lines that hold nothing JSON escapes (checked for the whole
        batch by one ``bytes.translate``) go in as they are.
        """
        count = len(lines)
        if not count:
            return
        now = time.time()
        head = self._head(tag, stream, utc_timestamp(now)) + '"seq":'
        seq = self._seq.get(tag.worker, 0)
        parts = [_RECORD_END + head] * (4 * count)
        parts[0::4] = map(str, range(seq + 1, seq + count + 1))
        parts[1::4] = [_LINE_KEY] * count
        parts[2::4] = _escaped(lines, "\n".join(lines) if text is None else text)
        parts[-4] = f'{seq + count},"off":{end_offset}'
        parts[-1] = _RECORD_END
        self._seq[tag.worker] = seq + count
        self.last_output[tag.worker] = now
        self._append([head + "".join(parts)], count)
        if self._console is not None:
            self._console_pending.append(self._console.render(tag.worker, tag.task, stream, lines))

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
        self._append([line + "\n"])
        if self._console is not None:
            self._console_pending.append(
                self._console.render(tag.worker, tag.task, "fleet", [message])
            )
            self.flush()

    def _append(self, parts: list[str], records: int | None = None) -> None:
        batch = "".join(parts)  # one batch stays whole in one segment and one write
        self._pending.append(batch)
        self.records += len(parts) if records is None else records
        self._pending_bytes += len(batch)
        if self._wanted is not None and not self._wanted.is_set():
            self._wanted.set()
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()

    # writing ---------------------------------------------------------------------------

    def flush(self) -> None:
        if self._pending:
            batches = [b.encode("utf-8", "replace") for b in self._pending]
            self._pending.clear()
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
