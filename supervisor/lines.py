"""The line path: a run's output, as read from its files, becomes blocks of whole lines, and
those become records.

Every line an agent prints passes here, up to millions a second, so nothing here makes a Python
object per line: :class:`LineSplitter` hands on a *block* of whole lines (bytes joined by
newlines) and :meth:`supervisor.logwriter.LogMux.output` turns a block into its records in a few C
passes.  :func:`pump_output` is the loop that drives them for one run (``Worker._pump`` calls
it), and the place where reading waits while the log cannot be written.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

from supervisor.logwriter import LogMux, Tag


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
        pending = self._pending
        end = data.rfind(b"\n")
        block: bytes | None = None
        if end < 0:
            self._pending = pending + data if pending else data
        else:
            # One copy of the lines, whether or not a line began in an earlier read.
            block = b"".join((pending, memoryview(data)[:end])) if pending else data[:end]
            self._pending = data[end + 1 :]
            if len(block) > self.max_bytes and self._has_long_line(block):
                block = b"\n".join(
                    piece for line in block.split(b"\n") for piece in self._pieces(line)
                )
            self.offset += len(pending) + end + 1
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


# -- the loop ------------------------------------------------------------------------------------


_S = TypeVar("_S", bound=str)
_S_co = TypeVar("_S_co", bound=str, covariant=True)


class Chunk(Protocol[_S_co]):
    """Bytes read from one of a run's output files (``supervisor.hosts.base.Chunk``)."""

    @property
    def stream(self) -> _S_co: ...

    @property
    def data(self) -> bytes: ...


async def pump_output(
    mux: LogMux,
    tag: Tag,
    chunks: AsyncIterable[Chunk[_S]],
    offsets: Mapping[_S, int],
    max_line_bytes: int,
    *,
    on_block: Callable[[_S, bytes], object] | None = None,
    pause: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Turn a run's output, as it is read from ``offsets`` on, into records until it ends.

    The line path of the whole fleet: each chunk is split into a block of whole lines
    (:class:`LineSplitter`, one per stream, its offset starting at the stream's) and recorded
    (:meth:`LogMux.output`); ``on_block`` sees every block too (the worker keeps the last ones
    for its limit scan).  While the log cannot be written, reading waits in ``pause`` (default
    :meth:`LogMux.writable`; the worker's stops waiting when the fleet stops): the output waits
    in the run's own files, not in memory, and is caught up from there.
    """
    splitters: dict[_S, LineSplitter] = {}
    wait = mux.writable if pause is None else pause
    async for chunk in chunks:
        if mux.fault is not None:
            await wait()
        stream = chunk.stream
        splitter = splitters.get(stream)
        if splitter is None:
            splitter = splitters[stream] = LineSplitter(max_line_bytes, offsets.get(stream, 0))
        block = splitter.feed(chunk.data)
        if block is not None:
            mux.output(tag, stream, block, splitter.offset)
            if on_block is not None:
                on_block(stream, block)
    for stream, splitter in splitters.items():
        rest = splitter.finish()
        if rest is not None:
            mux.output(tag, stream, rest, splitter.offset)
            if on_block is not None:
                on_block(stream, rest)
