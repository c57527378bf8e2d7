"""Bytes to lines: blocks of whole lines, bounded line length, and resumable offsets."""

from __future__ import annotations

import random

import pytest

from supervisor.lines import LineSplitter


def test_lines_and_offsets() -> None:
    s = LineSplitter(100)
    assert s.feed(b"one\ntw") == b"one"
    assert s.offset == 4
    assert s.feed(b"o\nthree\n") == b"two\nthree"
    assert s.offset == 14
    assert s.feed(b"\n") == b""  # one empty line
    assert s.offset == 15
    assert s.feed(b"no newline yet") is None
    assert s.finish() == b"no newline yet"
    assert s.finish() is None


def test_characters_split_across_reads_are_joined_again() -> None:
    s = LineSplitter(100)
    e = "é".encode()
    assert s.feed(b"bad \xff\n" + e[:1]) == b"bad \xff"  # bytes pass as they came
    assert s.feed(e[1:] + b"!\n") == "é!".encode()


def test_long_line_is_cut_on_character_boundaries_never_buffered_unbounded() -> None:
    s = LineSplitter(1024)
    data = ("x" + "é" * 3000).encode()
    block = s.feed(data)
    assert block is not None
    assert len(s._pending) <= 1024
    rest = s.feed(b"\n")
    assert rest is not None
    pieces = block.split(b"\n") + rest.split(b"\n")
    assert all(len(p) <= 1024 for p in pieces)
    assert "".join(p.decode() for p in pieces) == "x" + "é" * 3000  # no character cut
    assert s.offset == len(data) + 1
    assert len(s._pending) == 0


@pytest.mark.parametrize("limit", [1, 7, 64, 100])
def test_every_line_is_within_the_limit_and_nothing_is_lost(limit: int) -> None:
    """Random line lengths around the limit, fed in random reads: the pieces, re-joined,
    are the input exactly, and ``offset`` always points just after the last emitted byte."""
    rng = random.Random(limit)
    lines = [
        b"y" * rng.choice([0, 1, limit - 1, limit, limit + 1, 3 * limit + 2]) for _ in range(300)
    ]
    data = b"".join(line + b"\n" for line in lines)
    s = LineSplitter(limit)
    emitted: list[bytes] = []
    at = 0
    while at < len(data):
        step = rng.randrange(1, 4 * limit + 3)
        block = s.feed(data[at : at + step])
        at += step
        if block is not None:
            emitted += block.split(b"\n")
        assert s.offset <= min(at, len(data))
    assert s.finish() is None
    assert s.offset == len(data)
    assert all(len(piece) <= limit for piece in emitted)
    assert b"".join(emitted) == b"".join(lines)
    assert len(emitted) >= len(lines)


def test_trailing_text_without_newline_is_flushed_at_the_end() -> None:
    s = LineSplitter(100, offset=10)
    assert s.feed(b"tail") is None
    assert s.finish() == b"tail"
    assert s.offset == 14
