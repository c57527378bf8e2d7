"""The local host's run wrappers: spawned with posix_spawn, awaited through a pidfd."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest

from supervisor.hosts import local
from supervisor.hosts.base import HostError, RunSpec
from supervisor.hosts.local import LocalHost, WrapperProcess
from tests.conftest import unstartable_spec

pytestmark = pytest.mark.anyio


async def test_wait_returns_the_exit_status_to_every_waiter() -> None:
    proc = WrapperProcess.spawn(["sh", "-c", "sleep 0.2; exit 3"], dict(os.environ))
    results: list[int] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(lambda: _collect(proc, results))
    assert results == [3, 3, 3]
    assert await proc.wait() == 3  # and again, after it was reaped


async def _collect(proc: WrapperProcess, results: list[int]) -> None:
    results.append(await proc.wait())


async def test_a_cancelled_waiter_does_not_strand_the_others() -> None:
    proc = WrapperProcess.spawn(["sh", "-c", "sleep 0.5"], dict(os.environ))
    with anyio.fail_after(10):
        with anyio.move_on_after(0.1):
            await proc.wait()  # cancelled while it holds the pidfd
        assert proc.returncode is None
        assert await proc.wait() == 0


async def test_kill_and_session_of_its_own() -> None:
    proc = WrapperProcess.spawn(["sh", "-c", "sleep 30"], dict(os.environ))
    try:
        assert os.getsid(proc.pid) == proc.pid  # setsid: its own session and group
    finally:
        proc.kill()
        with anyio.fail_after(10):
            assert await proc.wait() == -9
    proc.kill()  # after it ended: nothing happens


async def test_inherited_descriptors_do_not_reach_the_wrapper(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)  # as a parent shell or cron might hand us one
    local._descriptors_checked = False
    out = tmp_path / "fds"
    try:
        proc = WrapperProcess.spawn(
            ["sh", "-c", f"ls /proc/$$/fd > {out}"], dict(os.environ)
        )
        with anyio.fail_after(10):
            assert await proc.wait() == 0
    finally:
        os.close(read_end)
        os.close(write_end)
    fds = {int(name) for name in out.read_text().split()}
    assert write_end not in fds
    assert {0, 1, 2} <= fds


async def test_the_wrapper_gets_default_signal_dispositions(tmp_path: Path) -> None:
    """Python ignores SIGPIPE; an agent must not inherit that (`yes | head` has to end)."""
    out = tmp_path / "sigign"
    proc = WrapperProcess.spawn(
        ["sh", "-c", f"grep SigIgn /proc/$$/status > {out}"], dict(os.environ)
    )
    with anyio.fail_after(10):
        assert await proc.wait() == 0
    ignored = int(out.read_text().split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)), f"SigIgn {ignored:x}"
    assert not ignored & (1 << (signal.SIGXFSZ - 1)), f"SigIgn {ignored:x}"


async def test_a_run_that_cannot_start_fails_at_once(tmp_path: Path) -> None:
    """The wrapper records an exit status without a pid (its ``cd`` failed): the start fails
    as soon as that file appears, not after the pid file's whole wait, and the directory
    watch made for the wait is gone again."""
    host = LocalHost()
    spec = unstartable_spec(tmp_path)
    try:
        with anyio.fail_after(local.PID_WAIT / 2), pytest.raises(HostError) as info:
            await host.start(spec)
        assert "did not start" in str(info.value) and "no-such-dir" in str(info.value)
        ok = await host.start(
            RunSpec(["true"], str(tmp_path), str(tmp_path / "runs" / "ok"), spec.lease_path, 0)
        )
        with anyio.fail_after(10):
            assert (await ok.wait()).code == 0
        watcher = host._dir_watcher()
        assert watcher is not None and not watcher._paths  # no watch left behind by the starts
    finally:
        await host.aclose()
