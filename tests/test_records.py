"""The record schema (``supervisor/records.py``) and the fast encoder held against it.

The fast path of ``LogMux.output`` builds records with a few C passes over a block of lines; the
schema's plain encoder builds one record with ``json.dumps``.  For any bytes an agent may print
-- invalid UTF-8, control characters, ``\\r``, quotes, backslashes, ``%``, lines longer than the
splitter's limit, seqs crossing thousands -- the two must give the same bytes, because readers
find records by byte needles that depend on exactly that form.  The inputs come from a seeded
random generator (many cases, reproducible from the seed in the test's id) rather than a
property-testing library: the project adds no dependency for it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from supervisor import records
from supervisor.lines import LineSplitter
from supervisor.logwriter import LogMux, Tag
from supervisor.records import (
    FIELDS,
    EventRecord,
    OutputRecord,
    encode,
    event_record,
    last_lines,
    last_offsets,
    lines_of,
    needle,
    parse,
)

NOW = 1_796_000_000.123  # a fixed clock: 2026-11-29T...Z
TS = records.utc_timestamp(NOW)

#: Pieces of agent output: every kind of byte JSON escapes, invalid and cut UTF-8, ``%``.
PIECES = [
    b"a",
    b"word ",
    b" ",
    b'"',
    b"\\",
    b"\\n",
    b"\t",
    b"\r",
    b"\x00",
    b"\x1b[31m",
    b"\x7f",
    b"\x0b\x0c\x08",
    b"\x1f",
    b"%",
    b"%s",
    b"%%",
    b"%(x)d",
    b"\xc3\xa9",
    b"\xe6\xbc\xa2",
    b"\xf0\x9f\x8e\x89",
    b"\xff",
    b"\xc3",
    b"\xe6\xbc",
    b"\xed\xa0\x80",
    b"\xe2\x80\xa8",
    b"\n",
    b"\n",
    b"\n",
    b"\r\n",
    b"x" * 70,
    b'{"json":"inside"}',
]
NAMES = ["w1", 'w"2', "w\\3", "w%s", "wé", "w\x01", "100% fleet %d"]

# Every test here runs with each record encoder (the C one and the Python fast path).
pytestmark = pytest.mark.usefixtures("each_encoder")


def random_output(rng: random.Random, size: int) -> bytes:
    return b"".join(rng.choices(PIECES, k=size))


def slow_records(
    fleet: str, tag: Tag, stream: str, block: bytes, first_seq: int, end_offset: int
) -> bytes:
    """What the schema says a block of lines becomes, one record at a time."""
    lines = block.decode("utf-8", "replace").split("\n")
    out = b""
    for index, line in enumerate(lines):
        last = index == len(lines) - 1
        record = OutputRecord(
            TS,
            tag.worker,
            tag.task,
            tag.machine,
            tag.run,
            stream,
            first_seq + index,
            line,
            end_offset if last else None,
        )
        out += encode(record)
    return out


def fast_mux(path: Path, fleet: str = "20261128-070712-345-c8") -> LogMux:
    return LogMux(fleet, path, None, clock=lambda: NOW)


@pytest.mark.parametrize("seed", range(40))
def test_the_fast_encoder_writes_the_schemas_bytes(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    fleet = rng.choice(["20261128-070712-345-c8", *NAMES])
    path = tmp_path / "fleet.jsonl"
    mux = fast_mux(path, fleet)
    expected = b""
    seqs: dict[str, int] = {}
    for _ in range(rng.randrange(1, 12)):
        tag = Tag(
            rng.choice(NAMES),
            rng.choice([None, 0, 7, 123456]),
            rng.choice(NAMES),
            rng.randrange(0, 1000),
        )
        if tag.worker not in seqs:  # start some workers just short of a thousand boundary
            seqs[tag.worker] = rng.choice([0, 0, 995, 9_990, 999_999, 123_456_700])
            mux._seq[tag.worker] = seqs[tag.worker]
        stream = rng.choice(["stdout", "stderr"])
        block = random_output(rng, rng.choice([1, 5, 50, 400, 3000]))
        end_offset = rng.randrange(0, 1 << 40)
        mux.output(tag, stream, block, end_offset)
        expected += slow_records(fleet, tag, stream, block, seqs[tag.worker] + 1, end_offset)
        seqs[tag.worker] += block.count(b"\n") + 1
    mux.close()
    got = path.read_bytes()
    if got != expected:  # show the first record that differs, not two megabytes
        for mine, theirs in zip(got.split(b"\n"), expected.split(b"\n"), strict=False):
            assert mine == theirs
    assert got == expected


@pytest.mark.parametrize("seed", range(10))
def test_lines_cut_by_the_splitter_are_encoded_as_the_schema_says(
    tmp_path: Path, seed: int
) -> None:
    """Very long lines, cut into pieces by ``LineSplitter`` (on UTF-8 boundaries), read in
    random amounts: every piece is a record of its own, with the schema's bytes."""
    rng = random.Random(seed)
    limit = rng.choice([16, 100, 1000])
    data = b"".join(
        random_output(rng, rng.randrange(0, 8))
        + (b"y" * rng.randrange(0, 4 * limit))
        + rng.choice([b"\xc3\xa9" * limit, b"", b"\n"])
        + b"\n"
        for _ in range(200)
    )
    path = tmp_path / "fleet.jsonl"
    mux = fast_mux(path)
    tag = Tag("w1", 1, "local", 1)
    splitter = LineSplitter(limit)
    expected = b""
    seq = 0
    at = 0
    while at < len(data):
        step = rng.randrange(1, 3 * limit)
        block = splitter.feed(data[at : at + step])
        at += step
        if block is not None:
            assert all(len(piece) <= limit for piece in block.split(b"\n"))
            mux.output(tag, "stdout", block, splitter.offset)
            expected += slow_records(mux.fleet, tag, "stdout", block, seq + 1, splitter.offset)
            seq += block.count(b"\n") + 1
    assert splitter.finish() is None  # the data ends with a newline
    mux.close()
    assert path.read_bytes() == expected
    assert splitter.offset == len(data)


def test_events_are_written_with_the_schemas_encoder(tmp_path: Path) -> None:
    path = tmp_path / "fleet.jsonl"
    mux = fast_mux(path)
    tag = Tag("w2", 42, "local", 3)
    mux.output(tag, "stdout", b"one\ntwo", 8)
    mux.event(
        tag,
        "crashed",
        'run 3 crashed: "exit 1"',
        {"code": 1, "ts": "not this one", "path": Path("/x")},
    )
    mux.close()
    lines = path.read_bytes().splitlines(keepends=True)
    assert lines[2] == encode(
        event_record(
            ts=TS,
            fleet=mux.fleet,
            worker="w2",
            task=42,
            machine="local",
            run=3,
            seq=3,
            event="crashed",
            message='run 3 crashed: "exit 1"',
            details={"code": 1, "path": "/x"},
        )
    )
    event = parse(lines[2])
    assert isinstance(event, EventRecord)
    assert event.event == "crashed" and event.details == {"code": 1, "path": "/x"}
    assert event.ts == TS  # a detail never overrides a schema field


def test_field_order_is_the_schemas(tmp_path: Path) -> None:
    path = tmp_path / "fleet.jsonl"
    mux = fast_mux(path)
    mux.output(Tag("w1", None, "m", 1), "stderr", b"a\nb", 4)
    mux.event(Tag("w1", None, "m", 1), "ended", "done", {"extra": [1, 2]})
    mux.close()
    keys = [list(json.loads(line)) for line in path.read_bytes().splitlines()]
    event_fields = [FIELDS[0], "fleet", *FIELDS[1:], "event", "extra"]
    assert keys == [list(FIELDS), [*FIELDS[:-1], "off", "line"], event_fields]


# -- parse ----------------------------------------------------------------------------------


def test_parse_gives_the_kind_and_refuses_what_is_no_record() -> None:
    out = OutputRecord(TS, "w1", None, "m", 2, "stdout", 9, "é \x00", 77)
    assert parse(encode(out)) == out
    assert parse(encode(out).rstrip(b"\n")) == out
    event = EventRecord(TS, "fleet", None, "-", 0, "fleet", 1, "hi", "started", {"n": 1}, "f")
    assert parse(encode(event)) == event
    torn = encode(out)[:-10]
    for raw in [
        torn,
        b"",
        b"[1,2]",
        b"not json",
        b'{"ts":1}',
        b"\xff\xfe",
        encode(out).replace(b'"run":2', b'"run":"2"'),
        encode(out).replace(b'"seq":9', b'"seq":true'),
    ]:
        assert parse(raw) is None, raw


# -- needles and the readers built on them ----------------------------------------------------


def test_needles_match_exactly_their_field(tmp_path: Path) -> None:
    assert needle("worker", "w3") == b'"worker":"w3",'
    assert needle("task", None) == b'"task":null,'
    assert needle("task", 4) == b'"task":4,'
    path = tmp_path / "fleet.jsonl"
    mux = fast_mux(path)
    # w3's needle must not match w31, nor text that mentions it, escaped or not.
    mux.output(Tag("w31", 4, "m", 1), "stdout", b'"worker":"w3",\n\\"worker\\":\\"w3\\",', 1)
    mux.output(Tag("w3", 42, "m", 1), "stdout", b"mine", 2)
    mux.close()
    data = path.read_bytes().splitlines()
    assert [line for line in data if needle("worker", "w3") in line] == [data[2]]
    assert [line for line in data if needle("task", 4) in line] == data[:2]
    with pytest.raises(ValueError):
        needle("line", "x")


def test_lines_of_last_lines_and_last_offsets(tmp_path: Path) -> None:
    path = tmp_path / "fleet.jsonl"
    mux = fast_mux(path)
    w1r1, w1r2, w2r1 = Tag("w1", 1, "m", 1), Tag("w1", 1, "m", 2), Tag("w2", 2, "m", 1)
    mux.output(w1r1, "stdout", b"old run", 8)
    mux.output(w1r2, "stdout", b"a\nb", 4)
    mux.output(w2r1, "stdout", b"other worker", 13)
    mux.output(w1r2, "stderr", b"err", 4)
    mux.event(w1r2, "note", "an event is no line", {})
    mux.output(w1r2, "stdout", b"c", 6)
    mux.close()
    segment = tmp_path / "fleet.jsonl.1"  # readers take several files, in order
    path.rename(segment)
    mux = fast_mux(path)
    mux._seq["w1"] = 6
    mux.output(w1r2, "stdout", b"d\ne", 10)
    mux.close()
    files = [segment, path]
    assert [(r.stream, r.line) for r in lines_of(files, "w1", 2)] == [
        ("stdout", "a"),
        ("stdout", "b"),
        ("stderr", "err"),
        ("stdout", "c"),
        ("stdout", "d"),
        ("stdout", "e"),
    ]
    assert last_lines(files, {"w1": 2, "w2": 1}, 3) == {
        "w1": ["c", "d", "e"],
        "w2": ["other worker"],
    }
    assert last_offsets(files, "w1", 2) == {"stdout": 10, "stderr": 4}
    assert last_offsets(files, "w1", 1) == {"stdout": 8}
    assert last_offsets(files, "w3", 1) == {}


def test_an_adopted_event_counts_as_an_offset(tmp_path: Path) -> None:
    path = tmp_path / "fleet.jsonl"
    mux = fast_mux(path)
    tag = Tag("w1", 5, "m", 3)
    mux.output(tag, "stdout", b"before", 7)
    mux.event(tag, "adopted", "adopted", {"offsets": {"stdout": 100, "stderr": 5}})
    mux.close()
    assert last_offsets([path], "w1", 3) == {"stdout": 100, "stderr": 5}


def test_timestamps_are_datetimes_rounding_in_milliseconds() -> None:
    """``ts`` is formatted once a second and completed per block: the same text as formatting
    ``datetime.fromtimestamp`` every time, its rounding to the microsecond included."""
    from datetime import UTC, datetime

    rng = random.Random(7)
    moments = [0.0, 1.5, 1e-7, 0.9999999, 1796000000.9999996, 1796000001.0]
    moments += [rng.uniform(0, 4e9) for _ in range(20_000)]
    moments += [1796000000 + n / 1000 + rng.choice([0, 4e-7, 5e-7, 6e-7]) for n in range(3000)]
    for now in moments:
        moment = datetime.fromtimestamp(now, UTC)
        expected = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
        assert records.utc_timestamp(now) == expected, now
