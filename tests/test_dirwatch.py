"""The inotify watcher of run directories (supervisor/hosts/dirwatch.py), against the real kernel.

Every wait is bounded twice: by the ``timeout`` passed to :meth:`DirWatcher.wait` and by an
``anyio.fail_after`` around the test.  Writes come from a held-open descriptor (an agent keeps its
``stdout`` open and writes line by line), from a task of the test, or from a real ``sh``.  Whether a
watch exists is read from the kernel itself: ``/proc/self/fdinfo`` lists an inotify instance's
watches, one ``inotify wd:`` line each.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import anyio
import pytest
from anyio.lowlevel import checkpoint

from supervisor.hosts.dirwatch import DirWatcher

STREAMS = ["stdout", "stderr"]
PROMPT = 5.0  # a wake-up later than this is no wake-up at all (the waits allow 30 s)


@pytest.fixture
def watcher() -> Iterator[DirWatcher]:
    w = DirWatcher()
    try:
        yield w
    finally:
        w.close()


def run_dir(parent: Path, name: str = "run") -> Path:
    """A run directory with empty ``stdout`` and ``stderr``, as the runner makes it."""
    path = parent / name
    path.mkdir()
    for stream in STREAMS:
        (path / stream).touch()
    return path


def kernel_watches(w: DirWatcher) -> int:
    """How many watches the kernel holds for the watcher's two inotify instances."""
    count = 0
    for fd in w._fds:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            count += sum(1 for line in info if line.startswith("inotify wd:"))
    return count


def append_fd(path: Path) -> int:
    """``path`` opened for appending, held open the way an agent holds its stdout."""
    return os.open(path, os.O_WRONLY | os.O_APPEND)


async def timed_wait(w: DirWatcher, wd: int, timeout: float) -> float:
    """Seconds :meth:`DirWatcher.wait` took."""
    start = time.monotonic()
    await w.wait(wd, timeout=timeout)
    return time.monotonic() - start


def block_event_loop(seconds: float) -> None:
    """Keep the event loop from running for ``seconds``: timers fall due together."""
    time.sleep(seconds)


# -- one directory ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("stream", STREAMS)
async def test_write_to_a_watched_file_wakes_the_waiter(
    watcher: DirWatcher, tmp_path: Path, stream: str
) -> None:
    directory = run_dir(tmp_path)
    wd = watcher.add(str(directory), STREAMS)
    fd = append_fd(directory / stream)
    wrote_at: list[float] = []

    async def writer() -> None:
        await anyio.sleep(0.2)
        wrote_at.append(time.monotonic())
        os.write(fd, b"hello\n")  # a write, no close: only the file watch sees it

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                elapsed = await timed_wait(watcher, wd, timeout=30)
                woke_at = time.monotonic()
    finally:
        os.close(fd)
    assert wrote_at, "the waiter returned before anything was written"
    assert elapsed >= 0.15, f"woke after {elapsed:.3f}s, before the write at 0.2s"
    assert elapsed < PROMPT
    assert woke_at - wrote_at[0] < PROMPT


@pytest.mark.anyio
async def test_subprocess_append_wakes_the_waiter(watcher: DirWatcher, tmp_path: Path) -> None:
    directory = run_dir(tmp_path)
    wd = watcher.add(str(directory), STREAMS)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                partial(
                    anyio.run_process, ["sh", "-c", "sleep 0.3; echo x >> stdout"], cwd=directory
                )
            )
            await anyio.wait_all_tasks_blocked()
            elapsed = await timed_wait(watcher, wd, timeout=30)
    assert (directory / "stdout").read_text() == "x\n"
    assert 0.2 <= elapsed < PROMPT


@pytest.mark.anyio
@pytest.mark.parametrize("arrival", ["written", "renamed in"])
async def test_a_file_arriving_in_the_directory_wakes_the_waiter(
    watcher: DirWatcher, tmp_path: Path, arrival: str
) -> None:
    """A file written in the directory (``exit``), or made outside it and renamed in (only the
    rename lands in it), wakes the directory's waiter."""
    directory = run_dir(tmp_path)
    staging = tmp_path / "pid.tmp"
    staging.write_text("123\n")
    target = directory / ("exit" if arrival == "written" else "pid")
    wd = watcher.add(str(directory), STREAMS)

    async def arrive() -> None:
        await anyio.sleep(0.2)
        if arrival == "written":
            target.write_text("0\n")
        else:
            os.rename(staging, target)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(arrive)
            elapsed = await timed_wait(watcher, wd, timeout=30)
    assert target.read_text() == ("0\n" if arrival == "written" else "123\n")
    assert 0.15 <= elapsed < PROMPT


@pytest.mark.anyio
async def test_writes_to_an_unwatched_file_wake_nobody(watcher: DirWatcher, tmp_path: Path) -> None:
    directory = run_dir(tmp_path)
    (directory / "other").touch()
    wd = watcher.add(str(directory), STREAMS)
    other = append_fd(directory / "other")
    out = append_fd(directory / "stdout")
    try:

        async def scribble() -> None:
            for _ in range(5):
                await anyio.sleep(0.03)
                os.write(other, b"not watched\n")

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(scribble)
                elapsed = await timed_wait(watcher, wd, timeout=0.3)
            assert (directory / "other").read_bytes() == b"not watched\n" * 5
            assert elapsed >= 0.25, f"woken after {elapsed:.3f}s by writes to an unwatched file"

            # The watch still works: a write to a watched file does wake it.
            os.write(out, b"watched\n")
            assert await timed_wait(watcher, wd, timeout=30) < PROMPT
    finally:
        os.close(other)
        os.close(out)


@pytest.mark.anyio
async def test_a_change_before_the_wait_is_not_lost(watcher: DirWatcher, tmp_path: Path) -> None:
    directory = run_dir(tmp_path)
    wd = watcher.add(str(directory), STREAMS)
    with open(directory / "stderr", "ab") as handle:
        handle.write(b"early\n")
    with anyio.fail_after(30):
        assert await timed_wait(watcher, wd, timeout=30) < PROMPT
        # ...and it was consumed: nothing changed since.
        assert await timed_wait(watcher, wd, timeout=0.3) >= 0.25


@pytest.mark.anyio
async def test_fifty_thousand_appends_are_one_wake_up(watcher: DirWatcher, tmp_path: Path) -> None:
    directory = run_dir(tmp_path)
    wd = watcher.add(str(directory), STREAMS)
    script = 'i=0; while [ "$i" -lt 50000 ]; do echo x; i=$((i + 1)); done >> stdout'
    with anyio.fail_after(60):
        done = await anyio.run_process(["sh", "-c", script], cwd=directory)
        assert done.returncode == 0
        assert (directory / "stdout").stat().st_size == 2 * 50000

        assert await timed_wait(watcher, wd, timeout=30) < PROMPT
        # Every event of those writes was consumed by that one wait: no stale wake-up is left.
        assert await timed_wait(watcher, wd, timeout=0.3) >= 0.25
        assert await timed_wait(watcher, wd, timeout=0.3) >= 0.25


@pytest.mark.anyio
async def test_an_event_queue_overflow_wakes_every_waiter(
    watcher: DirWatcher, tmp_path: Path
) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"max_queued_events is {limit}: overflowing it would take too long")
    busy = run_dir(tmp_path, "busy")
    idle = run_dir(tmp_path, "idle")
    busy_wd = watcher.add(str(busy), STREAMS)
    idle_wd = watcher.add(str(idle), STREAMS)
    # Writes to the output files queue one event per arm, so the directory watch is what can
    # overflow: every new file is two events (created, closed) that differ by name, which the
    # kernel cannot merge.
    for index in range(limit // 2 + 1000):
        (busy / f"f{index}").write_bytes(b"")
    with anyio.fail_after(30):
        # Nothing was ever written in ``idle``, but the dropped events might have been its.
        assert await timed_wait(watcher, idle_wd, timeout=30) < PROMPT
        assert await timed_wait(watcher, busy_wd, timeout=30) < PROMPT
        assert await timed_wait(watcher, idle_wd, timeout=0.3) >= 0.25
        assert await timed_wait(watcher, busy_wd, timeout=0.3) >= 0.25


# -- several directories ----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("first_waiter", ["one", "two"])
async def test_a_write_wakes_only_its_own_directory(
    watcher: DirWatcher, tmp_path: Path, first_waiter: str
) -> None:
    """Whichever waiter reads the events (the first to wait), each wakes for its own writes."""
    dirs = {name: run_dir(tmp_path, name) for name in ("one", "two")}
    wds = {name: watcher.add(str(path), STREAMS) for name, path in dirs.items()}
    order = [first_waiter, "two" if first_waiter == "one" else "one"]
    woke: dict[str, float] = {}
    wrote: dict[str, float] = {}
    start = time.monotonic()

    async def waiter(name: str) -> None:
        await watcher.wait(wds[name], timeout=30)
        woke[name] = time.monotonic() - start

    async def write(name: str, at: float) -> None:
        await anyio.sleep(at)
        wrote[name] = time.monotonic() - start
        with open(dirs[name] / "stdout", "ab") as handle:
            handle.write(b"line\n")

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for name in order:
                tg.start_soon(waiter, name)
                await checkpoint()
            tg.start_soon(write, "two", 0.2)
            tg.start_soon(write, "one", 0.8)
    assert wrote["two"] <= woke["two"] < wrote["two"] + PROMPT
    assert woke["two"] < wrote["one"], "two's waiter slept through its own write"
    assert wrote["one"] <= woke["one"] < wrote["one"] + PROMPT, "one woke for two's write"


@pytest.mark.anyio
async def test_the_reader_times_out_and_another_waiter_reads_on(
    watcher: DirWatcher, tmp_path: Path
) -> None:
    """The waiter that reads the events leaves (its timeout); the others are not left deaf."""
    first = run_dir(tmp_path, "first")
    second = run_dir(tmp_path, "second")
    first_wd = watcher.add(str(first), STREAMS)
    second_wd = watcher.add(str(second), STREAMS)
    times: dict[str, float] = {}

    async def wait(name: str, wd: int, timeout: float) -> None:
        await watcher.wait(wd, timeout)
        times[name] = time.monotonic() - start

    async def write_second() -> None:
        await anyio.sleep(0.6)
        times["wrote"] = time.monotonic() - start
        with open(second / "stdout", "ab") as handle:
            handle.write(b"late\n")

    start = time.monotonic()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "first", first_wd, 0.2)  # the reader, until it times out
            await checkpoint()
            tg.start_soon(wait, "second", second_wd, 30)
            tg.start_soon(write_second)
    assert 0.15 <= times["first"] < 0.5
    assert times["wrote"] <= times["second"] < times["wrote"] + PROMPT


@pytest.mark.anyio
async def test_a_handover_to_a_cancelled_waiter_leaves_no_one_deaf(
    watcher: DirWatcher, tmp_path: Path
) -> None:
    dirs = {name: run_dir(tmp_path, name) for name in ("a", "b", "c")}
    wds = {name: watcher.add(str(path), STREAMS) for name, path in dirs.items()}
    times: dict[str, float] = {}
    start = time.monotonic()

    async def wait(name: str, timeout: float) -> None:
        await watcher.wait(wds[name], timeout)
        times[name] = time.monotonic() - start

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "a", 0.1)  # the reader
            await checkpoint()
            tg.start_soon(wait, "b", 0.1)  # the one the reader hands over to
            tg.start_soon(wait, "c", 4.0)
            await anyio.wait_all_tasks_blocked()
            block_event_loop(0.3)  # a busy loop: a's and b's timeouts fire in the same pass
            await anyio.sleep(0.2)
            times["wrote"] = time.monotonic() - start
            with open(dirs["c"] / "stdout", "ab") as handle:
                handle.write(b"for c\n")
    assert times["a"] < 1.0 and times["b"] < 1.0
    assert times["c"] - times["wrote"] < 2.0, (
        f"c woke {times['c'] - times['wrote']:.2f}s after its write (its timeout: 4s)"
    )


# -- adding and removing watches --------------------------------------------------------------


@pytest.mark.anyio
async def test_remove_drops_the_kernel_watches_and_stale_events_wake_nobody(
    watcher: DirWatcher, tmp_path: Path
) -> None:
    old = run_dir(tmp_path, "old")
    old_wd = watcher.add(str(old), STREAMS)
    assert kernel_watches(watcher) == 3  # the directory and its two files
    with open(old / "stdout", "ab") as handle:
        handle.write(b"queued before the removal\n")
    watcher.remove(old_wd)
    assert kernel_watches(watcher) == 0
    watcher.remove(old_wd)  # twice: harmless

    with open(old / "stdout", "ab") as handle:  # writes after the removal raise nothing
        handle.write(b"after\n")
    (old / "exit").write_text("0\n")

    new = run_dir(tmp_path, "new")
    new_wd = watcher.add(str(new), STREAMS)
    assert new_wd != old_wd
    assert kernel_watches(watcher) == 3
    with anyio.fail_after(30):
        # The old directory's queued events (and the kernel's IN_IGNORED) are not the new one's.
        assert await timed_wait(watcher, new_wd, timeout=0.3) >= 0.25
        (new / "exit").write_text("1\n")
        assert await timed_wait(watcher, new_wd, timeout=30) < PROMPT
    watcher.remove(new_wd)
    assert kernel_watches(watcher) == 0


def test_a_missing_file_raises_and_leaves_no_watch(watcher: DirWatcher, tmp_path: Path) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "stdout").touch()  # no stderr
    with pytest.raises(OSError) as raised:
        watcher.add(str(directory), STREAMS)
    assert raised.value.errno == 2  # ENOENT
    assert kernel_watches(watcher) == 0  # neither the directory's nor stdout's

    with pytest.raises(OSError):
        watcher.add(str(tmp_path / "no-such-dir"), STREAMS)
    assert kernel_watches(watcher) == 0


@pytest.mark.anyio
async def test_after_a_failed_add_another_directory_works(
    watcher: DirWatcher, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(OSError):
        watcher.add(str(broken), ["stdout"])
    good = run_dir(tmp_path, "good")
    wd = watcher.add(str(good), STREAMS)
    assert kernel_watches(watcher) == 3
    (broken / "stdout").write_text("too late to matter\n")
    with anyio.fail_after(30):
        assert await timed_wait(watcher, wd, timeout=0.3) >= 0.25
        with open(good / "stderr", "ab") as handle:
            handle.write(b"err\n")
        assert await timed_wait(watcher, wd, timeout=30) < PROMPT


def test_close_after_remove_and_with_watches_left(tmp_path: Path) -> None:
    w = DirWatcher()
    first = w.add(str(run_dir(tmp_path, "first")), STREAMS)
    w.add(str(run_dir(tmp_path, "second")), STREAMS)
    w.remove(first)
    fds = list(w._fds)
    w.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # both inotify descriptors were closed


@pytest.mark.anyio
async def test_an_armed_watch_fires_once_per_arm(watcher: DirWatcher, tmp_path: Path) -> None:
    """Between two arms, however many writes come, one wake-up: the writers pay for no event
    while the reader is busy reading what they wrote."""
    directory = run_dir(tmp_path, "r")
    wd = watcher.add(str(directory), STREAMS)
    fd = append_fd(directory / "stdout")
    try:
        for _ in range(1000):
            os.write(fd, b"x\n")
        with anyio.fail_after(30):
            assert await timed_wait(watcher, wd, timeout=30) < PROMPT
            os.write(fd, b"not armed\n")  # the watch fired: nobody is told of this one
            assert await timed_wait(watcher, wd, timeout=0.3) >= 0.25
            watcher.arm(wd)
            assert await timed_wait(watcher, wd, timeout=0.3) >= 0.25  # armed, no write yet
            os.write(fd, b"armed\n")
            assert await timed_wait(watcher, wd, timeout=30) < PROMPT
    finally:
        os.close(fd)


@pytest.mark.anyio
async def test_arming_a_removed_file_is_harmless(watcher: DirWatcher, tmp_path: Path) -> None:
    directory = run_dir(tmp_path, "r")
    wd = watcher.add(str(directory), STREAMS)
    (directory / "stdout").unlink()
    watcher.arm(wd)  # the run directory is being cleaned up: no error for the reader
    (directory / "stderr").write_text("still watched\n")
    with anyio.fail_after(30):
        assert await timed_wait(watcher, wd, timeout=30) < PROMPT
