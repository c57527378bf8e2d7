"""The JSONL log's record schema: the one place that says what a record holds and in what order.

Every line of a shift's log (``<state_dir>/runs/<shift>/fleet.jsonl`` and its rotated segments
``fleet.jsonl.N``) is one record, a JSON object whose fields come in this order::

    {"ts", "worker", "task", "machine", "run", "stream", "seq", "line"}

with ``off`` on the last record of an output batch, written just before ``line`` (the writer
fills ``seq`` and ``off`` in one slot: that is where logs have always had it); a supervisor
event has ``fleet`` (the shift's id) right after ``ts``, and ``event`` and the event's own
fields after ``line``.  Output records do not repeat the shift's id: their file is in the
shift's directory, named for it, and a record that said it again would be a third longer
for a 100-byte line, on the path every agent line takes (logs written before this version
have ``fleet`` on output records too; readers take both).  Two kinds:

* :class:`OutputRecord` -- a line an agent printed (``stream`` ``stdout`` or ``stderr``).  The
  last record of each batch also carries ``off``, the byte offset in the run's ``stdout`` or
  ``stderr`` file just after its line: where a supervisor that adopts the run resumes reading
  (:func:`last_offsets`).  A batch reaches the file whole or not at all, so the log always ends
  with a record that ends a batch.
* :class:`EventRecord` -- something the supervisor did or saw (``stream`` ``fleet``), with
  ``event`` (``run-started``, ``crashed``, ...) and its details.

``seq`` counts the records of one worker 1, 2, 3, ... without gaps (events included), so a
reader can prove that nothing was lost or reordered.  ``ts`` is UTC with milliseconds.

**The order is part of the format.**  A log can hold gigabytes of output, of which a reader
(the report, adoption, ``logs --worker``) wants a few records: it searches the raw bytes for a
*needle* such as ``"worker":"w3",`` (:func:`needle`) and parses only the lines that hold it.
That works because every writer puts the fields in this order, writes them compactly (no
spaces) and escapes strings the way :func:`json.dumps` does with ``ensure_ascii=False``: the
fast encoder in :mod:`supervisor.logwriter` is tested to produce exactly the bytes of
:func:`encode`.  A needle is a filter, not a proof: a matching line is parsed and checked.

This module also holds what readers share about the log's files: their names and order
(:func:`log_files`) and the block search (:func:`lines_containing`).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeGuard

#: The fields every record has, in the order they are written.
FIELDS: Final = ("ts", "worker", "task", "machine", "run", "stream", "seq", "line")
#: On a supervisor event, right after ``ts``: the shift's id.
FLEET: Final = "fleet"
#: On the last record of an output batch, between ``seq`` and ``line``.
OFF: Final = "off"
#: On a supervisor event, after ``line``; the event's own fields follow it.
EVENT: Final = "event"
OUTPUT_STREAMS: Final = ("stdout", "stderr")
FLEET_STREAM: Final = "fleet"
STREAMS: Final = (*OUTPUT_STREAMS, FLEET_STREAM)
#: The fields a needle can be made for: each is followed by a comma in every record.
NEEDLE_FIELDS: Final = FIELDS[:-1]

LOG_NAME: Final = "fleet.jsonl"
_SEGMENT = re.compile(r"^fleet\.jsonl\.(\d+)$")
_SEARCH_BLOCK = 4 << 20
_SCAN_BLOCK = 1 << 20


@dataclass(frozen=True)
class Record:
    """The fields every record has (see the module's text for their meaning and order)."""

    ts: str
    worker: str
    task: int | None
    machine: str
    run: int
    stream: str
    seq: int
    line: str


@dataclass(frozen=True)
class OutputRecord(Record):
    """A line an agent printed; ``off`` only on the last record of a batch."""

    off: int | None = None


@dataclass(frozen=True)
class EventRecord(Record):
    """A supervisor event (``stream`` is always ``fleet``) and its own fields; ``fleet`` is
    the shift's id."""

    event: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    fleet: str = ""


_second_text: list[Any] = [None, ""]  # the last second formatted, and its text


def utc_timestamp(now: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-11-28T07:05:12.345Z`` (``ts``).

    Made for every block of output lines: the text up to the second is formatted once a
    second, not per block.
    """
    fraction, whole = math.modf(time.time() if now is None else now)
    micros = round(fraction * 1e6)  # as datetime.fromtimestamp rounds
    second = int(whole) + micros // 1_000_000  # (a fraction rounded up to the next second)
    millis = micros % 1_000_000 // 1000
    if _second_text[0] != second:
        moment = datetime.fromtimestamp(second, UTC)
        _second_text[:] = [second, moment.strftime("%Y-%m-%dT%H:%M:%S.")]
    return f"{_second_text[1]}{millis:03d}Z"


# -- writing (the plain, obviously correct encoder) ------------------------------------------


def as_dict(record: Record) -> dict[str, Any]:
    """The record's fields in the schema's order (event details last, never overriding one)."""
    data: dict[str, Any] = {name: getattr(record, name) for name in FIELDS[:-1]}
    if isinstance(record, EventRecord):
        data = {FIELDS[0]: data.pop(FIELDS[0]), FLEET: record.fleet, **data}
    if isinstance(record, OutputRecord) and record.off is not None:
        data[OFF] = record.off
    data[FIELDS[-1]] = record.line
    if isinstance(record, EventRecord):
        data[EVENT] = record.event
        for key, value in record.details.items():
            data.setdefault(key, value)
    return data


def encode(record: Record) -> bytes:
    """The record as one JSONL line (with its newline), exactly as the log holds it.

    Compact, ``ensure_ascii=False`` (text stays UTF-8), values JSON does not know written as
    ``str(value)``; a string that is not valid Unicode (a lone surrogate) is written with
    ``?`` in its place rather than failing the record.
    """
    text = json.dumps(as_dict(record), ensure_ascii=False, default=str, separators=(",", ":"))
    return (text + "\n").encode("utf-8", "replace")


def event_record(
    *,
    ts: str,
    fleet: str,
    worker: str,
    task: int | None,
    machine: str,
    run: int,
    seq: int,
    event: str,
    message: str,
    details: Mapping[str, Any] | None = None,
) -> EventRecord:
    """A supervisor event of ``worker``'s: ``message`` is its ``line``, for people."""
    return EventRecord(
        ts,
        worker,
        task,
        machine,
        run,
        FLEET_STREAM,
        seq,
        message,
        event,
        dict(details or {}),
        fleet,
    )


# -- reading ---------------------------------------------------------------------------------


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def from_dict(data: Mapping[str, Any]) -> Record | None:
    """The record ``data`` (a parsed JSON object) is, or None if it is not one."""
    ts, worker, task, machine, run, stream, seq, line = (data.get(n) for n in FIELDS)
    if not (
        isinstance(ts, str)
        and isinstance(worker, str)
        and (task is None or _is_int(task))
        and isinstance(machine, str)
        and _is_int(run)
        and isinstance(stream, str)
        and _is_int(seq)
        and isinstance(line, str)
    ):
        return None
    if stream == FLEET_STREAM:
        event, fleet = data.get(EVENT, ""), data.get(FLEET, "")
        details = {k: v for k, v in data.items() if k not in FIELDS and k not in (EVENT, FLEET)}
        return EventRecord(
            ts, worker, task, machine, run, stream, seq, line, str(event), details, str(fleet)
        )
    off = data.get(OFF)
    return OutputRecord(
        ts, worker, task, machine, run, stream, seq, line, off if _is_int(off) else None
    )


def parse(raw: bytes) -> Record | None:
    """The record on one line of the log (its newline may be there or not); None when the
    line is not a record (torn, foreign, or not JSON at all)."""
    try:
        data = json.loads(raw)
    except ValueError:  # UnicodeDecodeError is one
        return None
    return from_dict(data) if isinstance(data, dict) else None


def needle(name: str, value: str | int | None) -> bytes:
    """The bytes that every record whose field ``name`` is ``value`` holds, and (with the
    schema's order) no other record's fields: ``needle("worker", "w3")`` is
    ``b'"worker":"w3",'``.

    This depends on the order of :data:`FIELDS`: every field but ``line`` is followed by a
    comma, and the comma ends the value (``"task":4,`` does not match task 42).  Inside a
    ``line`` every quote is escaped, so a needle never matches an agent's text; it may match
    an event's details (an event field holding a nested object with a ``worker`` key), which
    is why a reader parses what it finds and checks the field itself.
    """
    if name not in NEEDLE_FIELDS:
        raise ValueError(f"no needle for the field {name!r}: one of {', '.join(NEEDLE_FIELDS)}")
    return f'"{name}":{json.dumps(value, ensure_ascii=False)},'.encode("utf-8", "replace")


def event_needle(event: str) -> bytes:
    """The bytes every record of the supervisor event ``event`` holds (``"event":"NAME"``:
    the quotes of a ``line`` are escaped, so an agent's text never holds them; a longer event
    name that begins with ``event`` does: parse what it finds)."""
    return f'"{EVENT}":{json.dumps(event, ensure_ascii=False)}'.encode("utf-8", "replace")


# -- the log's files -------------------------------------------------------------------------


def rotated_segments(shift_dir: Path) -> list[tuple[int, Path]]:
    """The rotated segments ``fleet.jsonl.N`` of a shift's log, oldest (smallest N) first."""
    found: list[tuple[int, Path]] = []
    try:
        with os.scandir(shift_dir) as entries:
            for entry in entries:
                match = _SEGMENT.match(entry.name)
                if match:
                    found.append((int(match.group(1)), Path(entry.path)))
    except FileNotFoundError:
        return []
    found.sort()
    return found


def log_files(shift_dir: Path) -> list[Path]:
    """Every file of a shift's log, in the order its records were written."""
    return [path for _, path in rotated_segments(shift_dir)] + [shift_dir / LOG_NAME]


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
                for index, wanted in enumerate(needles):
                    at = data.find(wanted)
                    while at >= 0:
                        start = data.rfind(b"\n", 0, at) + 1
                        end = data.find(b"\n", at) + 1
                        yield index, data[start:end]
                        at = data.find(wanted, end)


def ends_batch(record: Record | None) -> bool:
    """Whether ``record`` is the last of its batch: an event, or output with ``off``."""
    return isinstance(record, EventRecord) or (
        isinstance(record, OutputRecord) and record.off is not None
    )


def _whole_lines_backwards(fd: int, size: int) -> Iterator[tuple[int, bytes]]:
    """The newline-terminated lines of the file's first ``size`` bytes, last first, each with
    the offset just after it; bytes after the last newline are not a line (skipped)."""
    pos, buf = size, b""  # buf holds the file's bytes [pos, pos + len(buf)) not yet yielded
    trimmed = False
    while pos > 0:
        step = min(_SCAN_BLOCK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        if not trimmed:
            cut = buf.rfind(b"\n")
            if cut < 0:
                buf = b""
                continue  # torn bytes only so far
            buf, trimmed = buf[: cut + 1], True
        end = len(buf)
        while end > 0:
            start = buf.rfind(b"\n", 0, end - 1) + 1
            if start == 0:
                break  # this line may begin in the block before: read that first
            yield pos + end, buf[start:end]
            end = start
        buf = buf[:end]
    if buf:
        yield len(buf), buf  # the file's first line


def last_batch_end(fd: int, size: int) -> int:
    """The offset just after the last record of the file's first ``size`` bytes that ends a
    batch (0 if none): where a sound log ends.  Reads back from the end, one block at a time."""
    for end, line in _whole_lines_backwards(fd, size):
        if ends_batch(parse(line)):
            return end
    return 0


def records_of(paths: Iterable[Path], runs: Mapping[str, int]) -> Iterator[Record]:
    """Every record of run ``runs[worker]`` of each worker, in file order, in one pass.

    Searched by the worker's needle, then parsed and checked (worker and run).
    """
    workers = list(runs)
    needles = [needle("worker", worker) for worker in workers]
    for index, raw in lines_containing(paths, needles):
        record = parse(raw)
        worker = workers[index]
        if record is not None and record.worker == worker and record.run == runs[worker]:
            yield record


def lines_of(paths: Iterable[Path], worker: str, run: int) -> Iterator[OutputRecord]:
    """The output records (stdout and stderr) of ``worker``'s run ``run``, in order."""
    for record in records_of(paths, {worker: run}):
        if isinstance(record, OutputRecord):
            yield record


def last_lines(paths: Iterable[Path], runs: Mapping[str, int], count: int) -> dict[str, list[str]]:
    """The last ``count`` output lines of run ``runs[worker]`` of each worker (one pass over
    the log for all of them: the report's "last lines of the crashed run")."""
    tails: dict[str, deque[str]] = {worker: deque(maxlen=count) for worker in runs}
    for record in records_of(paths, runs):
        if isinstance(record, OutputRecord):
            tails[record.worker].append(record.line)
    return {worker: list(lines) for worker, lines in tails.items()}


def last_offsets(paths: Iterable[Path], worker: str, run: int) -> dict[str, int]:
    """Where the log stopped reading ``worker``'s run ``run``: the last ``off`` per stream.

    A supervisor adopting the run resumes reading its files there: nothing lost, nothing
    repeated.  An ``adopted`` event counts too (its ``offsets``): a fleet that adopted the run
    and died before logging a line of it leaves only that.  No entry for a stream means "from
    the start".
    """
    offsets: dict[str, int] = {}
    for record in records_of(paths, {worker: run}):
        if isinstance(record, OutputRecord):
            if record.off is not None and record.stream in OUTPUT_STREAMS:
                offsets[record.stream] = record.off
        elif isinstance(record, EventRecord) and record.event == "adopted":
            adopted = record.details.get("offsets")
            if isinstance(adopted, dict):
                for stream, value in adopted.items():
                    if stream in OUTPUT_STREAMS and _is_int(value):
                        offsets[stream] = value
    return offsets
