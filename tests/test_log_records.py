"""Output records built in bulk (``LogMux.output``), the block search of the log
(``lines_containing``) and the tail of a stream kept for the limit scan (``OutputTail``).

Records are read back from the real JSONL file with ``json.loads``: whatever the fast paths
skip or batch, every line must come back exactly, numbered without gaps.
"""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

import supervisor.records
from supervisor.console import ConsoleRenderer
from supervisor.limits import OutputTail
from supervisor.logwriter import LogMux, Tag
from supervisor.records import lines_containing

TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
FIELDS = {"ts", "worker", "task", "machine", "run", "stream", "seq", "line"}

CLEAN = ["plain output", "", "é 漢字 🎉 naïve", "x" * 300, "~!@#$%^&*()_+{}|:<>?`-=[];',./"]
QUOTES_AND_CONTROLS = [
    'say "hi"',
    "tab\there",
    "carriage\rreturn",
    "bell\x07 nul\x00 esc\x1b[31mred\x1b[0m unit\x1f",
    "form\x0cfeed back\x08space",
    "",
    "del\x7f and U+2028\u2028 U+2029\u2029",
    '"',
    'quote then n: "n and tab then n: \tn and cr then n: \rn',
]
BACKSLASHES = [
    "back\\slash",
    "literal \\n in the middle",
    "\\",
    "ends with backslash\\",
    "n",  # after a line ending in a backslash: joined, they read "\\\nn"
    "\\n",
    '\\"',
    'mixed "q" \\ \t é 漢字 \\u0041',
]
BATCHES = [CLEAN, QUOTES_AND_CONTROLS, BACKSLASHES, ["one"], [""], ["é"], ["\t"]]

# Every test here runs with each record encoder (the C one and the Python fast path).
pytestmark = pytest.mark.usefixtures("each_encoder")


def block(lines: list[str]) -> bytes:
    """Lines as :class:`~supervisor.lines.LineSplitter` gives them: one block of bytes."""
    return "\n".join(lines).encode("utf-8")


def read_records(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    records = []
    for raw in data.split(b"\n")[:-1]:
        records.append(json.loads(raw.decode("utf-8")))  # strict UTF-8: nothing replaced
    return records


def check_batches(
    records: list[dict[str, Any]],
    batches: list[tuple[Tag, str, list[str], int]],
) -> None:
    """``records`` are exactly ``batches`` (tag, stream, lines, end offset), in order."""
    assert len(records) == sum(len(lines) for _, _, lines, _ in batches)
    seqs: dict[str, int] = {}
    at = 0
    for tag, stream, lines, end_offset in batches:
        batch = records[at : at + len(lines)]
        at += len(lines)
        for index, (record, line) in enumerate(zip(batch, lines, strict=True)):
            last = index == len(lines) - 1
            assert record["line"] == line
            seqs[tag.worker] = seqs.get(tag.worker, 0) + 1
            assert record["seq"] == seqs[tag.worker]
            assert set(record) == (FIELDS | {"off"} if last else FIELDS), record
            if last:
                assert record["off"] == end_offset
            assert record["worker"] == tag.worker
            assert record["task"] == tag.task
            assert record["machine"] == tag.machine
            assert record["run"] == tag.run
            assert record["stream"] == stream
            assert TS.match(record["ts"]), record["ts"]
        assert len({record["ts"] for record in batch}) == 1  # one timestamp per batch


# -- LogMux.output ----------------------------------------------------------------------------


def test_batches_come_back_exactly_with_gapless_seq(tmp_path: Path) -> None:
    fleet = 'e2e "fleet" é'
    tag = Tag(worker="w1", task=42, machine="local", run=3)
    other = Tag(worker='w"2é', task=None, machine="host\\b", run=1)
    mux = LogMux(fleet, tmp_path / "fleet.jsonl", None)
    written: list[tuple[Tag, str, list[str], int]] = []
    offsets = {tag.worker: 0, other.worker: 0}
    for round_ in range(3):
        for number, lines in enumerate(BATCHES):
            who = other if (round_ + number) % 3 == 0 else tag
            stream = "stderr" if number % 2 else "stdout"
            offsets[who.worker] += sum(len(line.encode()) + 1 for line in lines)
            mux.output(who, stream, block(lines), offsets[who.worker])
            written.append((who, stream, list(lines), offsets[who.worker]))
    mux.close()
    check_batches(read_records(tmp_path / "fleet.jsonl"), written)


def test_seq_continues_across_batches_after_flushes(tmp_path: Path) -> None:
    tag = Tag(worker="w1", task=7, machine="local", run=2)
    mux = LogMux("f", tmp_path / "fleet.jsonl", None)
    written: list[tuple[Tag, str, list[str], int]] = []
    for number in range(20):
        lines = [f"batch {number} line {i}" for i in range(number + 1)]
        if number % 3 == 0:
            lines.append('needs "escaping"\t')
        mux.output(tag, "stdout", block(lines), 100 * number)
        written.append((tag, "stdout", lines, 100 * number))
        if number % 4 == 0:
            mux.flush()
    mux.close()
    records = read_records(tmp_path / "fleet.jsonl")
    check_batches(records, written)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert [r["off"] for r in records if "off" in r] == [100 * n for n in range(20)]


@pytest.mark.parametrize(
    "lines",
    [
        ["a\\nb", "c", "d\\n"],
        ["x\\", "n"],
        ["\\n\\n\\n"],
        ["first", "\\n", "", "\\", "last\\n"],
        ['"\\n"', "tab\t\\n"],
    ],
)
def test_a_literal_backslash_n_is_not_a_line_break(tmp_path: Path, lines: list[str]) -> None:
    tag = Tag(worker="w", task=1, machine="m", run=1)
    mux = LogMux("f", tmp_path / "fleet.jsonl", None)
    mux.output(tag, "stdout", block(lines), 50)
    mux.close()
    records = read_records(tmp_path / "fleet.jsonl")
    assert [r["line"] for r in records] == lines
    assert [r["seq"] for r in records] == list(range(1, len(lines) + 1))
    assert [r.get("off") for r in records] == [None] * (len(lines) - 1) + [50]


def test_a_large_random_batch(tmp_path: Path) -> None:
    alphabet = ["a", "b", " ", '"', "\\", "n", "\t", "\r", "\x00", "\x1b", "é", "漢", "🎉", "\\n"]
    rng = random.Random(1234)
    lines = ["".join(rng.choices(alphabet, k=rng.randrange(0, 40))) for _ in range(5000)]
    clean = ["".join(rng.choices("abcdefgh é漢🎉", k=rng.randrange(0, 40))) for _ in range(5000)]
    tag = Tag(worker="w", task=3, machine="m", run=4)
    mux = LogMux("f", tmp_path / "fleet.jsonl", None)
    mux.output(tag, "stdout", block(lines), 1)
    mux.output(tag, "stderr", block(clean), 2)
    mux.close()
    records = read_records(tmp_path / "fleet.jsonl")
    check_batches(records, [(tag, "stdout", lines, 1), (tag, "stderr", clean, 2)])


@pytest.mark.parametrize("resume", [0, 995, 9_990, 999_998, 123_456_789])
def test_seq_is_right_across_every_digit_boundary(tmp_path: Path, resume: int) -> None:
    """Seqs come from tables of three-digit groups: the numbers around group and digit-count
    changes (999 → 1000, 9999 → 10000, ...) must read as plain JSON integers, in order."""
    tag = Tag(worker="w", task=1, machine="m", run=1)
    mux = LogMux("f", tmp_path / "fleet.jsonl", None)
    mux._seq["w"] = resume  # as if ``resume`` records of w's came before
    sizes = [1, 2, 3, 997, 1000, 1001, 2500, 7]
    written = []
    for number, size in enumerate(sizes):
        lines = [f"{number}:{i}" for i in range(size)]
        mux.output(tag, "stdout", block(lines), number)
        written.append((tag, "stdout", lines, number))
    mux.close()
    raw = (tmp_path / "fleet.jsonl").read_bytes()
    records = read_records(tmp_path / "fleet.jsonl")
    assert [r["seq"] for r in records] == list(range(resume + 1, resume + 1 + sum(sizes)))
    assert re.search(rb'"seq":0\d', raw) is None  # no leading zeros: strict JSON numbers
    assert [r["line"] for r in records] == [line for _, _, lines, _ in written for line in lines]


def test_percent_signs_anywhere_are_kept(tmp_path: Path) -> None:
    """Records are built by ``%`` formatting: a ``%`` in a line or in a name is only text."""
    tag = Tag(worker="w%s", task=1, machine="m%d%%", run=1)
    mux = LogMux("100% fleet %s", tmp_path / "fleet.jsonl", None)
    lines = ["%s", "%%", "50% done", "%", "%(name)s %d %b", "end %"]
    mux.output(tag, "stdout", block(lines), 10)
    mux.close()
    check_batches(read_records(tmp_path / "fleet.jsonl"), [(tag, "stdout", lines, 10)])


def test_invalid_utf8_becomes_the_replacement_character(tmp_path: Path) -> None:
    tag = Tag(worker="w", task=1, machine="m", run=1)
    mux = LogMux("f", tmp_path / "fleet.jsonl", None)
    data = b'bad \xff byte\n\xc3 cut "\xe6\xbc"\nfine \xc3\xa9\n\xed\xa0\x80 surrogate'
    mux.output(tag, "stdout", data, len(data))
    mux.close()
    records = read_records(tmp_path / "fleet.jsonl")
    assert [r["line"] for r in records] == data.decode("utf-8", "replace").split("\n")


def test_random_bytes_come_back_as_their_lenient_decoding(tmp_path: Path) -> None:
    rng = random.Random(99)
    pieces = [
        b"a",
        b" ",
        b'"',
        b"\\",
        b"\t",
        b"\x00",
        b"\x1b",
        b"%",
        b"\xc3\xa9",
        b"\xff",
        b"\xe6\xbc\xa2",
        b"\xf0\x9f\x8e\x89",
        b"\xc3",
        b"\n",
        b"\r",
        b"\x7f",
    ]
    tag = Tag(worker="w", task=1, machine="m", run=1)
    mux = LogMux("f", tmp_path / "fleet.jsonl", None)
    expected: list[str] = []
    for number in range(200):
        data = b"".join(rng.choices(pieces, k=rng.randrange(0, 300)))
        mux.output(tag, "stdout", data, number)
        expected += data.decode("utf-8", "replace").split("\n")
    mux.close()
    assert [r["line"] for r in read_records(tmp_path / "fleet.jsonl")] == expected


@pytest.mark.parametrize("colour", [False, True])
def test_console_shows_each_line_behind_its_prefix(tmp_path: Path, colour: bool) -> None:
    out = io.StringIO()
    console = ConsoleRenderer(out, colour=colour)
    mux = LogMux("f", tmp_path / "fleet.jsonl", console)
    tag = Tag(worker="w1", task=7, machine="m", run=1)
    mux.output(tag, "stdout", "one\n\ntwo é".encode(), 9)
    mux.close()
    prefix = console.prefix("w1", 7, "stdout")
    assert out.getvalue() == f"{prefix}one\n{prefix}\n{prefix}two é\n"
    assert console.render("w1", 7, "fleet", ["a", "b"]) == "".join(
        console.render_text("w1", 7, "fleet", line) for line in ["a", "b"]
    )


# -- lines_containing -------------------------------------------------------------------------


def expected_hits(contents: list[bytes], needles: list[bytes]) -> dict[int, list[bytes]]:
    """The whole (newline-terminated) lines of each file containing each needle, plainly."""
    found: dict[int, list[bytes]] = {i: [] for i in range(len(needles))}
    for data in contents:
        lines = data.split(b"\n")[:-1]  # the part after the last newline is unfinished
        for index, needle in enumerate(needles):
            found[index] += [line + b"\n" for line in lines if needle in line]
    return found


def by_needle(hits: list[tuple[int, bytes]], count: int) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {i: [] for i in range(count)}
    for index, line in hits:
        out[index].append(line)
    return out


@pytest.mark.parametrize("block", [1, 7, 64, 4 << 20])
def test_lines_containing_across_blocks_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(supervisor.records, "_SEARCH_BLOCK", block)
    needles = [b"alpha", b'"worker":"w2",']
    first = b"".join(
        [
            b"alpha at the start\n",
            b"nothing here\n",
            b"x" * 150 + b" a long line whose needle comes late: alpha\n",
            b'{"worker":"w2","line":"alpha twice: alpha"}\n',
            b"\n",
            b'{"worker":"w1","line":"not w2"}\n',
            b"ALPHA is not alpha's case... but this line has it\n",
            b"the unfinished line has alpha and no newline",
        ]
    )
    second = b"".join([b"tail of nothing\n", b'{"worker":"w2",' + b"y" * 200 + b"}\n", b"alpha\n"])
    third = b"alpha only, unfinished"
    paths = [tmp_path / "a.jsonl", tmp_path / "missing.jsonl", tmp_path / "b.jsonl"]
    paths.append(tmp_path / "c.jsonl")
    paths[0].write_bytes(first)
    paths[2].write_bytes(second)
    paths[3].write_bytes(third)

    hits = list(lines_containing(paths, needles))
    got = by_needle(hits, len(needles))
    assert got == expected_hits([first, second, third], needles)
    assert got[0] == [
        b"alpha at the start\n",
        b"x" * 150 + b" a long line whose needle comes late: alpha\n",
        b'{"worker":"w2","line":"alpha twice: alpha"}\n',  # once, though it holds two
        b"ALPHA is not alpha's case... but this line has it\n",
        b"alpha\n",
    ]
    assert got[1] == [
        b'{"worker":"w2","line":"alpha twice: alpha"}\n',
        b'{"worker":"w2",' + b"y" * 200 + b"}\n",
    ]
    # An unfinished line is never glued to the next file's first line.
    assert all(b"newlinetail" not in line for _, line in hits)


@pytest.mark.parametrize("block", [1, 13, 64, 1000])
def test_lines_containing_matches_a_plain_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(supervisor.records, "_SEARCH_BLOCK", block)
    rng = random.Random(block)
    words = [b"foo", b"bar", b"baz", b"fo", b"o", b" ", b"\xc3\xa9", b"x" * 70]
    needles = [b"foo", b"bar", b"foob"]
    contents = []
    paths = []
    for number in range(3):
        lines = [b"".join(rng.choices(words, k=rng.randrange(0, 12))) for _ in range(300)]
        data = b"\n".join(lines) + (b"\n" if number != 1 else b"")  # file 1 ends unfinished
        path = tmp_path / f"{number}.jsonl"
        path.write_bytes(data)
        contents.append(data)
        paths.append(path)
    got = by_needle(list(lines_containing(paths, needles)), len(needles))
    want = expected_hits(contents, needles)
    assert got == want
    assert all(want.values()), "every needle occurs: the comparison is not vacuous"


def test_lines_containing_empty_and_missing(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "unfinished").write_bytes(b"needle")
    paths = [tmp_path / "nope", tmp_path / "empty", tmp_path / "unfinished", tmp_path]
    assert list(lines_containing(paths, [b"needle"])) == []  # a directory is skipped too
    assert list(lines_containing([], [b"needle"])) == []


# -- OutputTail -------------------------------------------------------------------------------


def test_output_tail_is_empty_until_something_is_said() -> None:
    tail = OutputTail(keep=10)
    assert tail.text() == ""
    tail.add(b"a")
    tail.add(b"b\nc")
    assert tail.text() == "a\nb\nc"
    tail.add(b"bad \xff")
    assert tail.text().endswith("bad \ufffd")  # read back as text, invalid UTF-8 replaced


@pytest.mark.parametrize("keep", [1, 100, 1000, 5000])
def test_output_tail_keeps_the_last_whole_batches(keep: int) -> None:
    rng = random.Random(keep)
    tail = OutputTail(keep=keep)
    batches: list[str] = []
    for number in range(400):
        lines = [f"b{number}l{i} " + "z" * rng.randrange(0, 30) for i in range(rng.randrange(1, 8))]
        text = "\n".join(lines)
        tail.add(text.encode())
        batches.append(text)

        # The fewest whole last batches that hold at least ``keep`` characters, newlines
        # included (all of them while fewer were said), joined by newlines.
        first = len(batches) - 1
        while first > 0 and len("\n".join(batches[first:])) < keep:
            first -= 1
        assert tail.text() == "\n".join(batches[first:])

        kept = len("\n".join(batches[first:]))
        if len("\n".join(batches)) >= keep:
            assert kept >= keep
        assert kept <= keep + len(batches[first])  # old batches are dropped (+1: a newline)
    assert tail.text().endswith(batches[-1])


def test_output_tail_is_bounded_for_empty_lines() -> None:
    tail = OutputTail(keep=100)
    tail.add(b"said once")
    for _ in range(10_000):
        tail.add(b"")  # an agent printing blank lines, one read at a time
    assert len(tail.text()) < 1000
