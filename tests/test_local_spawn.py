"""The local host's run wrappers: spawned with posix_spawn, awaited through a pidfd."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import pytest

from supervisor.hosts import local, runfiles
from supervisor.hosts.base import HostError, RunSpec, RunState
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
        proc = WrapperProcess.spawn(["sh", "-c", f"ls /proc/$$/fd > {out}"], dict(os.environ))
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


# ---- the run directory ------------------------------------------------------------------------


def _spec(tmp_path: Path, argv: list[str], name: str = "run-1", **kw: object) -> RunSpec:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return RunSpec(
        argv=argv,
        cwd=str(work),
        run_dir=str(tmp_path / "shift" / "w1" / name),
        lease_path=str(tmp_path / "shift" / "lease"),
        lease_timeout=float(kw.pop("lease_timeout", 0)),  # type: ignore[arg-type]
        meta=kw.pop("meta", {}),  # type: ignore[arg-type]
    )


async def test_run_files_are_private_and_the_agent_keeps_the_users_umask(
    tmp_path: Path,
) -> None:
    host = LocalHost(umask=0o022)
    spec = _spec(tmp_path, ["sh", "-c", "touch made; echo hi"], meta={"task": "4", "run": "2"})
    try:
        with anyio.fail_after(10):
            handle = await host.start(spec)
            assert (await handle.wait()).code == 0
    finally:
        await host.aclose()
    rd = Path(spec.run_dir)
    assert (tmp_path / "work" / "made").stat().st_mode & 0o777 == 0o644
    for directory in (tmp_path / "shift", rd.parent, rd):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    for name in ("meta", "runner.sh", "wrapper", "pid", "stdout", "stderr", "exit", "lease"):
        assert (rd / name).stat().st_mode & 0o777 == 0o600, name
    assert (rd / "meta").read_text() == "task=4\nrun=2\n"
    wrapper_pid, wrapper_ticks = (rd / "wrapper").read_text().split()
    assert int(wrapper_pid) > 1 and int(wrapper_ticks) > 0


async def test_a_killed_wrapper_is_ended_and_written_down_as_lost(tmp_path: Path) -> None:
    """The tree of a run whose wrapper vanished is killed and `exit` = lost is written, so
    the lease watchdog (and any later reader) sees the run ended."""
    host = LocalHost()
    spec = _spec(tmp_path, ["sleep", "60"])
    try:
        with anyio.fail_after(20):
            handle = await host.start(spec)
            agent = handle.identity.pid
            wrapper = int(Path(spec.run_dir, "wrapper").read_text().split()[0])
            os.kill(wrapper, signal.SIGKILL)
            status = await handle.wait()
            assert status.lost and status.code is None and "vanished" in status.reason
            assert Path(spec.run_dir, "exit").read_text() == "lost\n"
            assert "vanished" in Path(spec.run_dir, "note").read_text()
            for _ in range(500):  # SIGKILL lands at once; the zombie counts as dead
                if runfiles.read_start_ticks(agent) is None:
                    break
                await anyio.sleep(0.01)
            assert runfiles.read_start_ticks(agent) is None, "the agent outlived its wrapper"
            found = await host.probe([spec.run_dir])
            assert found[spec.run_dir].state is RunState.LOST
    finally:
        await host.aclose()


async def test_attach_dir_probe_and_stats(tmp_path: Path) -> None:
    host = LocalHost()
    spec = _spec(tmp_path, ["sh", "-c", "while :; do :; done"])
    try:
        with anyio.fail_after(20):
            assert await host.attach_dir(str(tmp_path / "nothing")) is None
            handle = await host.start(spec)
            again = await host.attach_dir(spec.run_dir)
            assert again is not None and again.identity == handle.identity
            assert (await host.probe([spec.run_dir]))[spec.run_dir].state is RunState.RUNNING
            assert await host.scan(str(tmp_path / "shift")) == [spec.run_dir]
            first = await again.stats()
            assert first.cpu_percent is None and first.processes == 1  # no second look yet
            await anyio.sleep(0.5)
            second = await again.stats()
            # A spinner's share, whatever else the machine runs (at load 9 on 2 cores: ~20%).
            assert second.cpu_percent is not None and second.cpu_percent > 5
            await handle.stop(5)
            assert (await again.wait()).code == 128 + signal.SIGTERM
            assert await host.scan(str(tmp_path / "shift")) == []
            unstarted = tmp_path / "shift" / "w2" / "run-1"
            unstarted.mkdir(parents=True)
            old = time.time() - 60
            os.utime(unstarted, (old, old))
            assert await host.attach_dir(str(unstarted)) is None
            assert (await host.probe([str(unstarted)]))[str(unstarted)].state is (
                RunState.UNSTARTED
            )
    finally:
        await host.aclose()


async def test_what_outlives_a_dead_leader_and_wrapper_is_killed(tmp_path: Path) -> None:
    """DEAD: wrapper and agent leader gone, a child of the agent still in its session.  The
    run is ended all the same: that child is found by its session id and killed."""
    host = LocalHost()
    spec = _spec(tmp_path, ["sh", "-c", "sleep 60 & echo $! > child; wait"])
    try:
        with anyio.fail_after(20):
            handle = await host.start(spec)
            child_file = tmp_path / "work" / "child"
            for _ in range(500):
                if child_file.exists() and child_file.read_text().endswith("\n"):
                    break
                await anyio.sleep(0.01)
            child = int(child_file.read_text())
            wrapper = int(Path(spec.run_dir, "wrapper").read_text().split()[0])
            os.kill(wrapper, signal.SIGKILL)
            os.kill(handle.identity.pid, signal.SIGKILL)
            status = await handle.wait()
            assert status.lost and Path(spec.run_dir, "exit").read_text() == "lost\n"
            for _ in range(500):
                if runfiles.read_start_ticks(child) is None:
                    break
                await anyio.sleep(0.01)
            assert runfiles.read_start_ticks(child) is None, "the agent's child lives on"
    finally:
        await host.aclose()
