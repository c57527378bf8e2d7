"""Records for people: the ``w2 #42 │ line`` rendering, and a terminal that can never stall us.

Two jobs that meet at the terminal:

* **Rendering** (:class:`ConsoleRenderer`, :func:`render_record`): a record's line behind its
  worker's label, aligned, a colour per worker (and :func:`text_table`, the layout of the
  commands' tables).  The live view of ``up`` and the ``logs``
  command share it, so a line looks the same in both.  Agents that print stream-json (Claude
  Code, Codex, Gemini) can have their events made readable by a ``line_renderer``
  (``supervisor.agents.render.render_line``): it gets each stdout line and returns the text to
  show, or None to leave the line out of the view.  The JSONL log keeps every line as printed.
* **Writing** (:class:`ConsoleSink`): the supervisor keeps leases and watchdogs alive from one
  event loop, so it must never wait for a terminal.  ``up | less`` with the pager not reading,
  a terminal paused with Ctrl-S, a pipe into a program that stopped reading: a plain ``write``
  then blocks the whole fleet, leases go stale and watchdogs kill healthy agents.  The sink
  hands text to a writer thread through a bounded buffer; when the terminal is slower than the
  fleet, whole chunks are dropped and the view says how many lines it missed (the JSONL log, not
  the terminal, is the record).  A terminal or pipe that went away ends the view quietly, and
  standard output is pointed at ``/dev/null`` so that nothing later (the summary table,
  Python's flush at exit) fails on it either.

Why a thread, not ``O_NONBLOCK``: the non-blocking flag belongs to the open file description,
which a terminal shares with the shell that started us (and with anything else on it).  Set on
our stdout it is set on the shell's terminal too -- the shell's next read fails with ``EAGAIN``
and interactive shells exit on that -- and a supervisor killed with SIGKILL never clears it.  A
thread blocked in ``write`` costs nothing and harms no one; at exit it is abandoned (a daemon)
after a bounded wait.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any, Final, TextIO

from supervisor.records import Record

#: Text waiting for the terminal beyond this much is dropped (and counted) instead.
BUFFER_LIMIT: Final = 1 << 20
#: How long the end of a view waits for a slow terminal before giving up on it.
CLOSE_GRACE: Final = 5.0
_EAGAIN_WAIT_MS: Final = 1000

_COLOURS: Final = ("36", "33", "35", "32", "34", "31", "96", "93", "95", "92", "94", "91")
_BARS: Final = {"stdout": "│", "stderr": "┃", "fleet": "┆"}

#: Turns one line an agent printed into the text to show, or None to show nothing.
LineRenderer = Callable[[str], str | None]


def use_colour(stream: IO[Any]) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- rendering -------------------------------------------------------------------------------


class ConsoleRenderer:
    """Renders records as ``w2 #42 │ line`` with a colour per worker, aligned.

    Colours are handed out in order of first appearance (``logs`` seeds that order so that a
    worker keeps the live view's colour whatever its filters hide).  ``out`` is the stream the
    view is for: it decides the colour default; writing is the caller's (or a
    :class:`ConsoleSink`'s) business.
    """

    def __init__(
        self,
        out: IO[Any],
        *,
        colour: bool | None = None,
        width: int = 10,
        line_renderer: LineRenderer | None = None,
    ) -> None:
        self.out = out
        self.colour = use_colour(out) if colour is None else colour
        self.width = width
        self.line_renderer = line_renderer
        self._colour_of: dict[str, str] = {}

    def prefix(self, worker: str, task: int | None, stream: str) -> str:
        """The label in front of each of a worker's lines (with its colour codes)."""
        label = f"{worker} #{task}" if task is not None else worker
        text = f"{label:<{self.width}} {_BARS.get(stream, '│')} "
        if not self.colour:
            return text
        code = self._colour_of.setdefault(worker, _COLOURS[len(self._colour_of) % len(_COLOURS)])
        if worker == "fleet":
            code = "1"
        return f"\x1b[{code}m{text}\x1b[0m"

    def render(self, worker: str, task: int | None, stream: str, lines: Iterable[str]) -> str:
        """``lines``, each behind the worker's prefix, each ending in a newline."""
        return self.render_text(worker, task, stream, "\n".join(lines))

    def render_text(self, worker: str, task: int | None, stream: str, text: str) -> str:
        """``text``'s lines (joined by newlines), each behind the worker's prefix; empty when
        the line renderer leaves every line out."""
        if self.line_renderer is not None and stream == "stdout":
            shown = [s for s in map(self.line_renderer, text.split("\n")) if s is not None]
            if not shown:
                return ""
            text = "\n".join(shown)
        prefix = self.prefix(worker, task, stream)
        if stream == "fleet" and self.colour:
            prefix += "\x1b[2m"
            return prefix + text.replace("\n", "\x1b[0m\n" + prefix) + "\x1b[0m\n"
        return prefix + text.replace("\n", "\n" + prefix) + "\n"


def render_record(renderer: ConsoleRenderer, record: Record) -> str:
    """One record as the live view shows it (the ``logs`` command's rendering)."""
    return renderer.render_text(record.worker, record.task, record.stream, record.line)


def text_table(rows: Sequence[Sequence[str]], *, rule: bool = False) -> str:
    """Rows of cells as an aligned text table, the one layout of every table a command prints
    (``status``, ``shifts``, ``check``, the end of ``up``): columns two spaces apart, each as
    wide as its widest cell, no trailing blanks; ``rule``: a line of dashes under the header
    (the first row)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- writing ---------------------------------------------------------------------------------


def dropped_note(lines: int) -> str:
    """What the view says where it left lines out."""
    return (
        f"… {lines:,} console lines dropped: the terminal is behind; "
        "`agentize-fleet logs` has every line\n"
    )


def _silence(fd: int) -> None:
    """Point ``fd`` at ``/dev/null``: whatever writes there later (a summary, Python's flush at
    exit) neither blocks nor fails.  The writer thread, if stuck in a write, keeps the old file
    open and stays stuck harmlessly until the process exits."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)


def _reader_gone(fd: int) -> bool:
    """Whether nobody can read ``fd`` any more (a pipe whose reader closed it, a hung-up
    terminal): poll reports ``POLLERR``/``POLLHUP`` on such a descriptor without writing."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return True


class ConsoleSink:
    """A bounded, non-blocking writer of text to a stream (see the module's text for why).

    :meth:`write` never blocks: it queues the text for a writer thread, or drops it when more
    than ``limit`` characters wait already, and counts the dropped lines; the next text that
    fits is preceded by a note saying how many.  A stream without a file descriptor (a
    ``StringIO`` in a test) is written to directly: it cannot block.  A stream that fails (a
    closed pipe, a hung-up terminal) ends the sink quietly: everything after is discarded.
    """

    def __init__(self, out: IO[Any], *, limit: int = BUFFER_LIMIT) -> None:
        self.limit = limit
        self.dropped = 0  # lines dropped in all
        self.broken: OSError | None = None
        self._out = out
        self._unsaid = 0  # lines dropped since the last note
        self._pending: list[str] = []
        self._size = 0
        self._closing = False
        self._abandoned = False  # given up at close: the descriptor is no longer ours to touch
        self._cond = threading.Condition()
        self._fd: int | None
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is one
            self._fd = None
            self._thread: threading.Thread | None = None
            return
        with contextlib.suppress(OSError, ValueError):
            out.flush()  # what went through ``out`` itself comes first
        self._fd = fd
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()

    # the event loop's side ----------------------------------------------------------------

    def write(self, text: str) -> None:
        """Queue ``text`` (whole lines) for the terminal; drop it if the terminal is behind."""
        if not text:
            return
        if self._fd is None:
            self._write_direct(text)
            return
        with self._cond:
            if self.broken is not None or self._closing:
                return
            if self._size + len(text) > self.limit:
                lines = text.count("\n")
                self.dropped += lines
                self._unsaid += lines
                return
            if self._unsaid:
                note = dropped_note(self._unsaid)
                self._unsaid = 0
                self._pending.append(note)
                self._size += len(note)
            self._pending.append(text)
            self._size += len(text)
            self._cond.notify()

    def _write_direct(self, text: str) -> None:
        if self.broken is not None:
            return
        try:
            self._out.write(text)
            self._out.flush()
        except (OSError, ValueError) as exc:
            self.broken = exc if isinstance(exc, OSError) else OSError(errno.EBADF, str(exc))

    def close(self, timeout: float = CLOSE_GRACE) -> bool:
        """Write what waits (and the note of lines dropped last), for at most ``timeout``
        seconds.  True if everything reached the stream; False if the stream is broken or
        still stalled, in which case standard output is silenced (see :func:`_silence`)."""
        if self._fd is None:
            if self._unsaid:
                self._write_direct(dropped_note(self._unsaid))
                self._unsaid = 0
            return self.broken is None
        with self._cond:
            if self._unsaid and self.broken is None:
                self._pending.append(dropped_note(self._unsaid))
                self._unsaid = 0
            self._closing = True
            self._cond.notify()
        assert self._thread is not None
        self._thread.join(timeout)
        with self._cond:
            self._abandoned = True
        if self._thread.is_alive() or self.broken is not None or _reader_gone(self._fd):
            _silence(self._fd)
            return False
        return True

    # the writer thread's side -------------------------------------------------------------

    def _run(self) -> None:
        assert self._fd is not None
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                text = "".join(self._pending)
                self._pending.clear()
                self._size = 0
            try:
                self._write_all(self._fd, text.encode("utf-8", "replace"))
            except OSError as exc:
                with self._cond:
                    self.broken = exc
                    self._pending.clear()
                    if not self._abandoned:  # else the number may name another file by now
                        _silence(self._fd)
                return

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                # Someone else made the descriptor non-blocking: wait until it takes more.
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                poller.poll(_EAGAIN_WAIT_MS)


def write_final(text: str, out: TextIO | None = None, timeout: float = CLOSE_GRACE) -> bool:
    """Write a command's last words (``up``'s summary table) to ``out`` (standard output),
    waiting at most ``timeout`` for a slow terminal; a closed one is no error.  True if the
    text got through."""
    sink = ConsoleSink(sys.stdout if out is None else out)
    sink.write(text)
    return sink.close(timeout)
