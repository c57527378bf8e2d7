"""Bytes to lines: UTF-8 repair, bounded line length, and resumable offsets."""

from __future__ import annotations

from supervisor.logs import LineSplitter


def test_lines_and_offsets() -> None:
    s = LineSplitter(100)
    assert s.feed(b"one\ntw") == ["one"]
    assert s.offset == 4
    assert s.feed(b"o\nthree\n") == ["two", "three"]
    assert s.offset == 14
    assert s.finish() == []


def test_invalid_utf8_and_split_characters() -> None:
    s = LineSplitter(100)
    e = "é".encode()
    assert s.feed(b"bad \xff\n" + e[:1]) == ["bad \ufffd"]
    assert s.feed(e[1:] + b"!\n") == ["é!"]


def test_long_line_is_cut_on_character_boundaries_never_buffered_unbounded() -> None:
    s = LineSplitter(1024)
    data = ("x" + "é" * 3000).encode()
    pieces = s.feed(data)
    assert all(len(p.encode()) <= 1024 for p in pieces)
    pieces += s.feed(b"\n")
    assert "".join(pieces) == "x" + "é" * 3000
    assert s.offset == len(data) + 1
    assert len(s._pending) == 0


def test_trailing_text_without_newline_is_flushed_at_the_end() -> None:
    s = LineSplitter(100, offset=10)
    assert s.feed(b"tail") == []
    assert s.finish() == ["tail"]
    assert s.offset == 14
