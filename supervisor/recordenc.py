"""A block of agent lines becomes its output records: the writer's fast path.

What a record holds is :mod:`supervisor.records`' (the schema, and its plain encoder, which
makes one record at a time); this module makes the records of a whole block at once, the line
path's one step that is per byte: :data:`encode_lines` is the C encoder
(``supervisor/_recordenc.c``, built at install where a C compiler is) or, without it,
:func:`encode_lines_py`.  Both give exactly :func:`supervisor.records.encode`'s bytes for any
input (``tests/test_records.py`` runs with each).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

from supervisor.records import FIELDS

_encode: Callable[[str], str] = json.encoder.encode_basestring  # json.dumps's, ensure_ascii=False
# The fast path fills in the two last fields of the schema itself, in this order.
assert FIELDS[-2:] == ("seq", "line"), "the encoders write seq (and off), then line"
_RECORD_END = b'"}\n'
_LINE_KEY = b',"line":"'
#: The bytes JSON escapes (control characters, the quote, the backslash) but the newline:
#: ``byte in block`` with an int is one ``memchr`` (vectorised), and looking for each of them
#: in turn takes less time than one ``translate`` (a byte at a time): 34 against 41 ns for a
#: line of 100 bytes.  (With one-byte ``bytes`` instead of ints, ``in`` first fails to read
#: the argument as an int -- an exception raised and cleared per byte -- and takes 70.)
_SPECIALS = tuple(b for b in (0x22, 0x5C, *range(0x20)) if b != 0x0A)
#: Deleting these from a block leaves the bytes JSON escapes, and the newlines.
_ORDINARY = bytes(b for b in range(0x20, 0x100) if b not in b'"\\')
#: How JSON writes each byte it escapes (as ``json``'s own encoder does); the backslash first.
_JSON_ESCAPES = {b: _encode(chr(b))[1:-1].encode() for b in (0x5C, 0x22, *range(0x20)) if b != 0x0A}
#: Seq numbers are ``high`` digits followed by four ``low`` ones: ``low`` comes from these
#: tables, so that a block of records needs no number formatted per line (see :func:`_seq_args`).
_SEQ_GROUP = 10_000


@functools.cache
def _seq_tables() -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """The low digits, plain and padded: made when the Python encoder is first used (the C
    encoder counts in place and needs none; 20,000 small objects are a megabyte)."""
    plain = tuple(b"%d" % n for n in range(_SEQ_GROUP))
    return plain, tuple(b"%04d" % n for n in range(_SEQ_GROUP))


def valid_utf8(block: bytes) -> bytes:
    """``block`` made valid UTF-8 (U+FFFD for what is not): the same object when it is."""
    if not block.isascii():
        try:
            block.decode("utf-8")
        except UnicodeDecodeError:
            block = block.decode("utf-8", "replace").encode("utf-8")
    return block


def _json_escaped(text: bytes) -> bytes:
    """``text`` (valid UTF-8) JSON-escaped with its newlines kept as they are.

    Most output needs no escaping at all; a ``memchr`` for each byte JSON escapes tells (all of
    them are ASCII, and UTF-8 never uses ASCII bytes inside a multi-byte character); when some
    are there, the deleting ``translate`` shows which, and one ``replace`` per such byte escapes
    the block.
    """
    if not any(map(text.__contains__, _SPECIALS)):
        return text
    escaped = text
    present = set(text.translate(None, _ORDINARY))
    for byte, replacement in _JSON_ESCAPES.items():  # the backslash first
        if byte in present:
            escaped = escaped.replace(bytes((byte,)), replacement)
    return escaped


def _seq_args(first: int, count: int, tail: bytes) -> tuple[bytes, ...]:
    """The ``%s%s`` arguments of ``count`` records numbered from ``first``: each record's high
    digits and its low four (from the tables), ``tail`` (``,"off":N``) after the last one's."""
    plain, padded = _seq_tables()
    pairs: list[bytes] = [b""] * (2 * count)
    done = 0
    while done < count:
        high, low = divmod(first + done, _SEQ_GROUP)
        size = min(count - done, _SEQ_GROUP - low)
        at = 2 * done
        if high:
            pairs[at : at + 2 * size : 2] = [b"%d" % high] * size
            pairs[at + 1 : at + 2 * size : 2] = padded[low : low + size]
        else:
            pairs[at + 1 : at + 2 * size : 2] = plain[low : low + size]
        done += size
    pairs[-1] += tail
    return tuple(pairs)


def encode_lines_py(text: bytes, head: bytes, first: int, tail: bytes) -> tuple[bytes, int]:
    """The output records of a block of lines, and how many: the fast path in Python.

    ``text`` is the lines joined by newlines (valid UTF-8), ``head`` every field of a record
    up to ``"seq":``, ``first`` the first record's seq, ``tail`` what follows the last
    record's seq (``,"off":N``).  No line becomes a Python object: the records of a block
    differ only in ``seq`` and ``line``, so the escaped block (:func:`_json_escaped`) becomes
    one ``%`` format by turning each newline into the end of one record and the start of the
    next (which also counts the lines: each newline grows the block by the same number of
    bytes), and the seqs come from tables (:func:`_seq_args`).  A few C passes over the block,
    whatever its line count; ``supervisor/_recordenc.c`` does the same in one.
    """
    escaped = _json_escaped(text)
    if b"%" in escaped:
        escaped = escaped.replace(b"%", b"%%")
    if b"%" in head:
        head = head.replace(b"%", b"%%")
    between = _RECORD_END + head + b"%s%s" + _LINE_KEY
    body = escaped.replace(b"\n", between)
    count = (len(body) - len(escaped)) // (len(between) - 1) + 1
    form = b"".join((between[len(_RECORD_END) :], body, _RECORD_END))
    return form % _seq_args(first, count, tail), count


EncodeLines = Callable[[bytes, bytes, int, bytes], tuple[bytes, int]]


def c_encoder() -> EncodeLines | None:
    """The C encoder, if it was built (the install had a C compiler)."""
    try:
        from supervisor._recordenc import encode
    except ImportError:
        return None
    return encode


#: The encoder the writer uses: the C one (``supervisor/_recordenc.c``), else
#: :func:`encode_lines_py`; both give exactly the schema's bytes (tested for any input).
encode_lines: EncodeLines = c_encoder() or encode_lines_py
