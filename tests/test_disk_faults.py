"""The log's writer when the disk does not cooperate: full (a real, small tmpfs), read-only,
immutable (``chattr +i``), unwritable for the user (a child process running as ``nobody``), and
files left torn by a crash.  What must hold: never a cut record, every record written once
when the disk has room again, one line when writing starts failing and one when it recovers,
the fleet told (``on_fault``), memory bounded, and logs created ``0600``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import supervisor.logwriter
from supervisor.hosts.base import RunSpec
from supervisor.hosts.local import LocalHost
from supervisor.lines import pump_output
from supervisor.logwriter import LogMux, LogUnwritable, Tag
from supervisor.records import EventRecord, OutputRecord, log_files, parse
from tests.conftest import AGENT, clean_env

NOBODY = 65534
TAG = Tag("w1", 1, "local", 1)


def mount_tmpfs(where: Path, size: str, *options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            ",".join([f"size={size}", "mode=0755", *options]),
            "tmpfs",
            str(where),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def unmount(where: Path) -> None:
    for argv in (["umount", str(where)], ["umount", "-l", str(where)]):
        if subprocess.run(argv, capture_output=True, timeout=30).returncode == 0:
            return


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted after the test whatever happens (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "16m")
    try:
        yield disk
    finally:
        unmount(disk)


def fill(disk: Path, leave: int) -> Path:
    """A file that takes all of ``disk`` but about ``leave`` bytes."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


def read_log(paths: list[Path]) -> list[Any]:
    """Every line of the files as a record; fails on a line that is not one (a cut record)."""
    out = []
    for path in paths:
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path} ends in the middle of a record"
        for raw in data.split(b"\n")[:-1]:
            record = parse(raw)
            assert record is not None, raw[:200]
            out.append(record)
    return out


def flood_block(start: int, count: int) -> bytes:
    return b"\n".join(b"line %09d " % n + b"y" * 80 for n in range(start, start + count))


def assert_lines_once(records: list[Any], total: int) -> None:
    lines = [r.line for r in records if isinstance(r, OutputRecord) and r.stream == "stdout"]
    assert [int(line.split()[1]) for line in lines] == list(range(total))
    seqs = [r.seq for r in records if r.worker == "w1"]
    assert seqs == list(range(1, len(seqs) + 1))


def events(records: list[Any]) -> list[str]:
    return [r.event for r in records if isinstance(r, EventRecord)]


# -- a full disk -------------------------------------------------------------------------------


def test_a_full_disk_keeps_records_whole_and_writes_them_when_there_is_room(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor.logwriter, "RETRY_INTERVAL", 0.05)
    filler = fill(small_disk, 300_000)
    faults: list[OSError | None] = []
    path = small_disk / "fleet.jsonl"
    mux = LogMux("f", path, None, on_fault=faults.append)
    sent = 0
    while not faults:  # batches of ~250 KB: the first that does not fit is cut by the disk
        mux.output(TAG, "stdout", flood_block(sent, 1000), sent + 1000)
        sent += 1000
        mux.flush()
    assert isinstance(faults[0], OSError) and faults[0].errno == 28  # ENOSPC
    on_disk = read_log([path])  # whole records only, though the disk took part of a batch
    assert on_disk and isinstance(on_disk[-1], OutputRecord) and on_disk[-1].off is not None
    for _ in range(3):  # held in memory meanwhile, retried (and failing) meanwhile
        mux.output(TAG, "stderr", b"more", 1)
        time.sleep(0.06)
        mux.flush()
    assert read_log([path]) == on_disk
    filler.unlink()
    time.sleep(0.06)
    mux.flush()
    assert faults == [faults[0], None]
    mux.close()
    records = read_log([path])
    assert_lines_once(records, sent)
    assert events(records) == ["log-unwritable", "log-writable"]
    unwritable = next(r for r in records if isinstance(r, EventRecord))
    assert "No space left on device (ENOSPC)" in unwritable.line
    # It comes after the batch that could not be written (made before the failure was known).
    assert records.index(unwritable) == len(on_disk) + 1000
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_beyond_the_memory_bound_output_is_dropped_and_counted(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor.logwriter, "RETRY_INTERVAL", 0.05)
    filler = fill(small_disk, 0)
    path = small_disk / "fleet.jsonl"
    mux = LogMux("f", path, None, hold_bytes=50_000)
    for number in range(20):
        mux.output(TAG, "stdout", flood_block(number * 100, 100), number)
        mux.flush()
    assert mux.fault is not None
    assert mux._pending_bytes < 50_000 + 40_000  # the bound (and the batch that crossed it)
    filler.unlink()
    time.sleep(0.06)
    mux.close()
    records = read_log([path])
    (recovered,) = [r for r in records if isinstance(r, EventRecord) and r.event == "log-writable"]
    kept = len([r for r in records if isinstance(r, OutputRecord)])
    assert recovered.details["dropped_batches"] == 20 - kept // 100 > 0
    assert "not logged (their lines are in the runs' stdout/stderr files)" in recovered.line


async def _pump_one_run(mux: LogMux, run_dir: Path, lines: int) -> None:
    host = LocalHost("local")
    try:
        handle = await host.start(
            RunSpec(
                argv=[str(AGENT)],
                cwd=str(run_dir.parent),
                run_dir=str(run_dir),
                lease_path=str(run_dir.parent / "lease"),
                lease_timeout=0,
                env={"FAKE_AGENT_PLAN": f"flood:{lines}", **clean_env()},
            )
        )
        await pump_output(mux, TAG, handle.output({}), {}, 65536)
        await handle.wait()
    finally:
        await host.aclose()


@pytest.mark.anyio
async def test_reading_pauses_while_the_disk_is_full_and_catches_up(
    small_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real agent's output pumped into a log on a full disk: reading stops (the output waits
    in the run's own file, not in memory), and every line is logged once the disk has room."""
    monkeypatch.setattr(supervisor.logwriter, "RETRY_INTERVAL", 0.05)
    filler = fill(small_disk, 2 << 20)
    faults: list[OSError | None] = []
    mux = LogMux("f", small_disk / "fleet.jsonl", None, on_fault=faults.append)
    run_dir = tmp_path / "run"
    lines = 50_000  # 5 MB of output, 12 MB of records: the disk is full half way
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(mux.flush_periodically)
            async with anyio.create_task_group() as runs:
                runs.start_soon(_pump_one_run, mux, run_dir, lines)
                while not faults:  # noqa: ASYNC110  (on_fault is a plain callback)
                    await anyio.sleep(0.01)
                await anyio.sleep(0.3)
                held = mux._pending_bytes
                await anyio.sleep(0.5)
                assert mux._pending_bytes == held  # paused: nothing more read meanwhile
                assert (run_dir / "stdout").stat().st_size > lines * 100  # all in its file
                filler.unlink()
            tg.cancel_scope.cancel()
    mux.close()
    assert faults[-1] is None
    records = read_log([small_disk / "fleet.jsonl"])
    out = [r.line for r in records if isinstance(r, OutputRecord) and " l0" in r.line]
    assert [int(line.split()[1][1:]) for line in out] == list(range(lines))
    assert events(records) == ["log-unwritable", "log-writable"]


# -- permissions -----------------------------------------------------------------------------


def test_a_read_only_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "ro"
    mount_tmpfs(disk, "1m", "ro")
    try:
        with pytest.raises(LogUnwritable) as caught:
            LogMux("f", disk / "runs" / "x" / "fleet.jsonl", None)
    finally:
        unmount(disk)
    message = str(caught.value)
    assert str(disk / "runs") in message and "(EROFS)" in message and "fix:" in message


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[list[Path]]:
    """Files made immutable by the test are made mutable again after it, whatever happens."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    made: list[Path] = []
    try:
        yield made
    finally:
        for path in made:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True, timeout=30)


def chattr(path: Path, flag: str) -> None:
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"chattr {flag} does not work here: {done.stderr.strip()}")


def test_an_immutable_log_is_a_fault_until_it_is_writable_again(
    tmp_path: Path, immutable: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``chattr +i`` refuses writes even to root (EPERM): the same state as a full disk."""
    monkeypatch.setattr(supervisor.logwriter, "RETRY_INTERVAL", 0.05)
    path = tmp_path / "fleet.jsonl"
    faults: list[OSError | None] = []
    mux = LogMux("f", path, None, on_fault=faults.append)
    mux.output(TAG, "stdout", flood_block(0, 10), 10)
    mux.flush()
    immutable.append(path)
    chattr(path, "+i")
    mux.output(TAG, "stdout", flood_block(10, 10), 20)
    mux.flush()
    assert [f.errno if f else None for f in faults] == [1]  # EPERM
    chattr(path, "-i")
    time.sleep(0.06)
    mux.output(TAG, "stdout", flood_block(20, 10), 30)
    mux.close()
    assert faults[-1] is None
    records = read_log([path])
    assert_lines_once(records, 30)
    assert events(records) == ["log-unwritable", "log-writable"]


# as another user: a forked child drops to ``nobody`` (permissions apply to it, not to root)

_CHILD = r"""
import json, os, sys
from pathlib import Path
from supervisor.logwriter import LogMux, LogUnwritable, Tag
from supervisor.records import log_files, parse

directory = Path(sys.argv[1])
os.setgid(65534)
os.setuid(65534)
report = {}
os.chmod(directory, 0o500)
try:
    LogMux("f", directory / "fleet.jsonl", None)
except LogUnwritable as exc:
    report["refused"] = str(exc)
os.chmod(directory, 0o700)
mux = LogMux("f", directory / "fleet.jsonl", None, rotate_bytes=20_000)
tag = Tag("w1", 1, "local", 1)
sent = 0
def batch():
    global sent
    mux.output(tag, "stdout", b"\n".join(b"line %09d " % n + b"z" * 80
                                         for n in range(sent, sent + 50)), sent + 50)
    sent += 50
    mux.flush()
for _ in range(3):
    batch()
os.chmod(directory, 0o500)  # rotation (a rename, a new file) is refused now
for _ in range(3):
    batch()
report["fault_while_refused"] = mux.fault is not None
os.chmod(directory, 0o700)
for _ in range(3):
    batch()
mux.close()
report["sent"] = sent
report["files"] = [(p.name, oct(p.stat().st_mode & 0o777), p.stat().st_size)
                   for p in log_files(directory)]
records = [parse(raw) for p in log_files(directory) for raw in p.read_bytes().splitlines()]
report["lines"] = [r.line for r in records if r.stream == "stdout"]
report["events"] = [(r.event, r.line) for r in records if r.stream == "fleet"]
os.write(int(sys.argv[2]), json.dumps(report).encode())
"""


@pytest.fixture
def nobodys_dir() -> Iterator[Path]:
    """A directory ``nobody`` owns and can reach (under /tmp: pytest's are root's, 0700)."""
    if os.geteuid() != 0:
        pytest.skip("changing to another user needs root")
    directory = Path(tempfile.mkdtemp(prefix="agentize-logs-"))
    try:
        os.chmod(directory, 0o755)
        inner = directory / "shift"
        inner.mkdir()
        os.chown(inner, NOBODY, NOBODY)
        yield inner
    finally:
        with contextlib.suppress(OSError):
            os.chmod(directory / "shift", 0o700)
        shutil.rmtree(directory, ignore_errors=True)


def test_permissions_refused_to_another_user(nobodys_dir: Path) -> None:
    """Run as ``nobody``: an unwritable directory is a clear error at start, and a rotation
    the directory refuses later leaves the log going on in the file it has, said once."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            sys.argv = ["child", str(nobodys_dir), str(write_end)]
            exec(compile(_CHILD, "child", "exec"), {"__name__": "__child__"})
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        chunks = []
        end = time.monotonic() + 60
        while time.monotonic() < end:
            data = os.read(read_end, 1 << 16)
            if not data:
                break
            chunks.append(data)
        report = json.loads(b"".join(chunks))
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert "Permission denied (EACCES)" in report["refused"]
    assert str(nobodys_dir / "fleet.jsonl") in report["refused"]
    assert report["fault_while_refused"] is False  # writing went on: only rotation failed
    assert [int(line.split()[1]) for line in report["lines"]] == list(range(report["sent"]))
    assert [event for event, _ in report["events"]] == ["log-rotation-failed"]
    assert all(mode == "0o600" for _, mode, _ in report["files"])
    assert len(report["files"]) >= 3


# -- torn tails ------------------------------------------------------------------------------


def test_a_torn_tail_is_cut_back_to_the_last_whole_batch(tmp_path: Path) -> None:
    path = tmp_path / "fleet.jsonl"
    mux = LogMux("f", path, None)
    mux.output(TAG, "stdout", b"a\nb", 4)
    mux.event(TAG, "note", "an event ends a batch too", {})
    mux.output(TAG, "stdout", b"c\nd\ne", 10)
    mux.close()
    whole = path.read_bytes()
    lines = whole.splitlines(keepends=True)
    # A crash in the middle of the last batch: two of its records, then half of the third.
    torn = b"".join(lines[:-1]) + lines[-1][:40]
    for damaged, keep in [
        (torn, b"".join(lines[:-3])),
        (whole + b'{"ts":"20', whole),
        (b"not a record\n" + b"garbage", b""),
        (whole, whole),
    ]:
        path.write_bytes(damaged)
        os.chmod(path, 0o644)
        mux = LogMux("f", path, None)
        mux.close()
        assert path.read_bytes() == keep
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    # What is written after the repair continues the file as whole records.
    path.write_bytes(torn)
    mux = LogMux("f", path, None)
    mux.output(Tag("w2", 2, "local", 1), "stdout", b"after", 5)
    mux.close()
    assert [r.line for r in read_log([path])][-1] == "after"


def test_the_log_and_its_segments_are_private(tmp_path: Path) -> None:
    path = tmp_path / "fleet.jsonl"
    mux = LogMux("f", path, None, rotate_bytes=5_000)
    for number in range(10):
        mux.output(TAG, "stdout", flood_block(number * 20, 20), number)
        mux.flush()
    mux.close()
    files = log_files(tmp_path)
    assert len(files) > 3
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}
    assert_lines_once(read_log(files), 200)
