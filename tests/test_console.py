"""The terminal view: how records are rendered for people, and a terminal that cannot stall the
fleet -- a pipe nobody reads, a pipe closed early -- with real pipes, in-process and around a
real ``agentize-fleet up``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from supervisor.console import ConsoleRenderer, ConsoleSink, dropped_note, render_record
from supervisor.logwriter import LogMux, Tag
from supervisor.records import OutputRecord
from tests.conftest import ROOT, Harness, read_jsonl, task, wait_for
from tests.fleet_helpers import request

# -- rendering ------------------------------------------------------------------------------


def test_lines_are_aligned_behind_their_worker_and_coloured_per_worker() -> None:
    plain = ConsoleRenderer(io.StringIO(), colour=False, width=8)
    assert plain.render_text("w2", 42, "stdout", "a\n\nb") == (
        "w2 #42   │ a\nw2 #42   │ \nw2 #42   │ b\n"
    )
    assert plain.render("fleet", None, "fleet", ["started"]) == "fleet    ┆ started\n"
    assert plain.render_text("w1", 1, "stderr", "oops").startswith("w1 #1    ┃ ")
    coloured = ConsoleRenderer(io.StringIO(), colour=True, width=8)
    first, second = coloured.prefix("w1", 1, "stdout"), coloured.prefix("w2", 2, "stdout")
    assert first.startswith("\x1b[36m") and second.startswith("\x1b[33m")
    assert coloured.prefix("w1", 1, "stderr").startswith("\x1b[36m")  # w1 keeps its colour
    event = coloured.render_text("w1", 1, "fleet", "a\nb")
    assert event.count("\x1b[2m") == 2 and event.endswith("\x1b[0m\n")


def test_a_record_renders_as_its_line_does() -> None:
    renderer = ConsoleRenderer(io.StringIO(), colour=False)
    record = OutputRecord("t", "w3", 7, "m", 1, "stderr", 5, "boom", 40)
    assert render_record(renderer, record) == renderer.render_text("w3", 7, "stderr", "boom")


def test_a_line_renderer_rewrites_or_hides_stdout_lines_only() -> None:
    def readable(line: str) -> str | None:
        if line.startswith("{"):
            text = json.loads(line).get("text")
            return None if text is None else f"» {text}"
        return line

    renderer = ConsoleRenderer(io.StringIO(), colour=False, width=4, line_renderer=readable)
    block = '{"type":"system"}\n{"text":"hello"}\nplain'
    assert renderer.render_text("w1", None, "stdout", block) == "w1   │ » hello\nw1   │ plain\n"
    assert renderer.render_text("w1", None, "stdout", '{"type":"ping"}') == ""
    assert renderer.render_text("w1", None, "stderr", '{"text":"x"}') == 'w1   ┃ {"text":"x"}\n'


# -- the sink, in-process --------------------------------------------------------------------


@pytest.fixture
def pipe() -> Iterator[tuple[int, io.TextIOWrapper]]:
    """A real pipe: its read end (nobody reads it unless the test does) and its write end as a
    text stream, both closed after the test whatever happens."""
    read_end, write_end = os.pipe()
    out = open(write_end, "w", encoding="utf-8", closefd=True)  # noqa: SIM115
    try:
        yield read_end, out
    finally:
        for close in (out.close, lambda: os.close(read_end)):
            with contextlib.suppress(OSError):
                close()


def fd_target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.anyio
async def test_the_event_loop_keeps_ticking_while_nobody_reads_the_terminal(
    tmp_path: Path, pipe: tuple[int, io.TextIOWrapper]
) -> None:
    """A flood of output into a console pipe nobody reads: every ``output`` and ``flush``
    returns at once (a timer task sees no gap), the JSONL gets every line, the console drops
    what does not fit and says how many."""
    read_end, out = pipe
    mux = LogMux("f", tmp_path / "fleet.jsonl", ConsoleRenderer(out, colour=False))
    tag = Tag("w1", 1, "local", 1)
    gaps: list[float] = []
    lines = 0

    async def timer() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(timer)
            for number in range(200):  # ~20 MB of console text, 300 times a pipe's buffer
                block = b"\n".join(
                    b"line %d of batch %d " % (i, number) + b"x" * 60 for i in range(1000)
                )
                mux.output(tag, "stdout", block, number)
                lines += 1000
                mux.flush()
                await anyio.lowlevel.checkpoint()
            await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
    assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f}s"
    sink = mux._sink
    assert sink is not None and sink.dropped > 0
    # The JSONL is the record: every line is there.
    drained: list[bytes] = []
    reader = threading.Thread(target=lambda: drained.append(_read_all(read_end)), daemon=True)
    reader.start()
    mux.close()
    out.close()
    reader.join(10)
    assert not reader.is_alive()
    text = drained[0].decode()
    assert (tmp_path / "fleet.jsonl").read_bytes().count(b"\n") == lines
    shown = text.count("│ line ")
    assert shown + sink.dropped == lines
    assert "console lines dropped: the terminal is behind" in text


def _read_all(fd: int) -> bytes:
    chunks = []
    while data := os.read(fd, 1 << 16):
        chunks.append(data)
    return b"".join(chunks)


def test_a_stalled_terminal_is_given_up_at_close_within_the_grace(
    pipe: tuple[int, io.TextIOWrapper],
) -> None:
    _, out = pipe
    fd = out.fileno()
    sink = ConsoleSink(out, limit=1 << 22)
    sink.write("x" * (1 << 20) + "\n")  # far more than the pipe holds: the writer blocks
    began = time.monotonic()
    assert sink.close(timeout=0.5) is False
    assert time.monotonic() - began < 3
    assert fd_target(fd) == "/dev/null"  # later writes (a summary, the exit flush) cannot block
    os.write(fd, b"not blocked\n")


def test_a_closed_pipe_ends_the_view_quietly(pipe: tuple[int, io.TextIOWrapper]) -> None:
    read_end, out = pipe
    fd = out.fileno()
    os.close(read_end)
    sink = ConsoleSink(out)
    sink.write("nobody reads this\n")
    wait_for(lambda: sink.broken is not None, 5, "the writer to find the pipe closed")
    assert isinstance(sink.broken, BrokenPipeError)
    sink.write("dropped without a word\n")
    assert sink.close(timeout=1) is False
    assert fd_target(fd) == "/dev/null"
    print("and stdout-like writes go on", file=out, flush=True)  # no BrokenPipeError


def test_dropped_lines_are_noted_where_they_were_left_out() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out)  # no descriptor: written directly (a StringIO cannot block)
    sink.write("a\n")
    assert sink.close() is True
    assert out.getvalue() == "a\n"
    assert dropped_note(1234) == (
        "… 1,234 console lines dropped: the terminal is behind; "
        "`agentize-fleet logs` has every line\n"
    )


def test_the_note_comes_before_the_next_text_that_fits(
    pipe: tuple[int, io.TextIOWrapper],
) -> None:
    read_end, out = pipe
    sink = ConsoleSink(out, limit=100)
    with sink._cond:  # hold the writer thread back so the buffer fills deterministically
        sink._pending.append("x" * 90 + "\n")
        sink._size = 91
    sink.write("one\ntwo\nthree\n")  # 14 more do not fit: dropped
    sink.write("four\n")  # 5 fit
    data = b""
    end = time.monotonic() + 10
    while not data.endswith(b"four\n") and time.monotonic() < end:
        if select.select([read_end], [], [], 0.5)[0]:
            data += os.read(read_end, 4096)
    assert data.decode() == "x" * 90 + "\n" + dropped_note(3) + "four\n"
    assert sink.dropped == 3
    assert sink.close(timeout=5) is True


# -- a real fleet ------------------------------------------------------------------------------


def start_up(fleet: Harness, config: Path, stdout: int, stderr: int) -> subprocess.Popen[bytes]:
    """``agentize-fleet up`` with its stdout and stderr on the descriptors given (the fleet
    fixture kills it and everything it started after the test)."""
    popen = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "up", "-c", str(config)],
        cwd=ROOT,
        env=fleet.env(),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )
    fleet.popens.append(popen)
    return popen


def only_log(fleet: Harness) -> list[dict[str, object]]:
    (path,) = (fleet.state_dir / "runs").glob("*/fleet.jsonl")
    return read_jsonl(path)


def test_up_goes_on_while_nobody_reads_its_stdout(fleet: Harness) -> None:
    """``up | a-reader-that-stopped``: the supervisor keeps answering, keeps its leases fresh
    (a 2 s lease: a stalled supervisor would have its agents killed by their watchdogs) and
    ends on its own, every line in the JSONL."""
    config = fleet.write(
        fleet.config(
            [task(1, "flood:30000"), task(2, "sleep:4+finish"), task(3, "flood:20000")],
            lease_timeout=2,
        )
    )
    read_end, write_end = os.pipe()
    err = open(fleet.tmp / "up.stderr", "wb")  # noqa: SIM115
    try:
        popen = start_up(fleet, config, write_end, err.fileno())
        os.close(write_end)
        # The pipe fills within moments (3 MB of rendered lines into 64 KiB); the fleet's
        # loop must go on answering all along.
        answered = 0
        end = time.monotonic() + 60
        while popen.poll() is None and time.monotonic() < end:
            try:
                answer = request(fleet.state_dir, {"cmd": "status"}, timeout=5)
            except (OSError, TimeoutError, ValueError):
                answer = {}
            answered += bool(answer.get("ok"))
            time.sleep(0.3)
        assert popen.wait(timeout=30) == 0, (fleet.tmp / "up.stderr").read_text()
        assert answered >= 3  # the loop answered while the pipe was full
    finally:
        err.close()
        os.close(read_end)
    records = only_log(fleet)
    floods = {1: 30000, 3: 20000}
    for issue, count in floods.items():
        out = [
            r
            for r in records
            if r["task"] == issue and r["stream"] == "stdout" and " l0" in str(r["line"])
        ]
        assert len(out) == count
    assert records[-1]["event"] == "fleet-ended" and records[-1]["exit_code"] == 0
    assert "Traceback" not in (fleet.tmp / "up.stderr").read_text()


@pytest.mark.parametrize("also_stderr", [False, True])
def test_a_stdout_closed_early_is_no_error(fleet: Harness, also_stderr: bool) -> None:
    """``up | head -1``: the reader goes after one line; the fleet runs to its end, exits 0
    with no traceback (its summary table goes nowhere), and the JSONL says so."""
    config = fleet.write(fleet.config([task(1, "flood:5000"), task(2)]))
    read_end, write_end = os.pipe()
    err_read, err_write = os.pipe() if also_stderr else (-1, -1)
    err_file = open(fleet.tmp / "up.stderr", "wb")  # noqa: SIM115
    try:
        popen = start_up(fleet, config, write_end, err_write if also_stderr else err_file.fileno())
        os.close(write_end)
        if also_stderr:
            os.close(err_write)
            os.close(err_read)
        first = os.read(read_end, 100)
        assert first
        os.close(read_end)
        read_end = -1
        code = popen.wait(timeout=60)
    finally:
        err_file.close()
        if read_end >= 0:
            os.close(read_end)
    assert code == 0, (fleet.tmp / "up.stderr").read_text()
    assert (fleet.tmp / "up.stderr").read_text() == ""
    records = only_log(fleet)
    assert records[-1]["event"] == "fleet-ended" and records[-1]["exit_code"] == 0
    assert (
        len(
            [
                r
                for r in records
                if r["task"] == 1 and r["stream"] == "stdout" and " l0" in str(r["line"])
            ]
        )
        == 5000
    )
