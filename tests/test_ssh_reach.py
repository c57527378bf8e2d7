"""Machines that come and go (issue 16), against a real sshd on 127.0.0.1: a run's handle never
gives its run up while the machine is away or slow; once it is back, every line arrives once
and the run's real exit code is read.  The machine's reachability goes through its states and
each transition is reported."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest

from supervisor.hosts.base import (
    ExitStatus,
    HostSlow,
    Reach,
    Reachability,
    ReachChange,
    RunSpec,
    wait_while_reachable,
)
from supervisor.hosts.ssh import SSHHost, SSHRunHandle
from tests.sshd import SSHD, hanging_login, remote_helpers, run_sshd

pytestmark = pytest.mark.anyio
LINES = 300


def ticker(work: Path, name: str, code: int, pause: float = 0.02) -> RunSpec:
    """A run printing LINES numbered lines on stdout (and every tenth on stderr), then
    exiting with ``code``."""
    script = (
        f'i=1; while [ $i -le {LINES} ]; do echo "line $i"; '
        f'[ $((i % 10)) -ne 0 ] || echo "err $i" >&2; i=$((i+1)); sleep {pause}; done; '
        f"exit {code}"
    )
    return RunSpec(
        argv=["sh", "-c", script],
        cwd=str(work),
        run_dir=str(work / "runs" / name),
        lease_path=str(work / "runs" / "lease"),
        lease_timeout=120,
    )


def expected() -> tuple[bytes, bytes]:
    out = "".join(f"line {i}\n" for i in range(1, LINES + 1)).encode()
    err = "".join(f"err {i}\n" for i in range(10, LINES + 1, 10)).encode()
    return out, err


class Follow:
    """A run's output and end, followed in the background the way a worker does."""

    def __init__(self, handle: SSHRunHandle) -> None:
        self.handle = handle
        self.got = {"stdout": b"", "stderr": b""}
        self.status: ExitStatus | None = None
        self.drained = False

    async def pump(self) -> None:
        async for chunk in self.handle.output():
            self.got[chunk.stream] += chunk.data
            assert chunk.end == len(self.got[chunk.stream]), "a byte lost or repeated"
        self.drained = True

    async def wait(self) -> None:
        self.status = await self.handle.wait()

    def start_in(self, tg: anyio.abc.TaskGroup) -> None:
        tg.start_soon(self.pump)
        tg.start_soon(self.wait)

    def lines(self) -> int:
        return self.got["stdout"].count(b"\n")


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await anyio.sleep(0.05)


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "work"
    d.mkdir()
    yield d


def states(changes: list[ReachChange]) -> list[Reach]:
    return [c.state for c in changes]


# ---- the states, without a machine ------------------------------------------------------------


async def test_reachability_goes_through_its_states_and_reports_each_change() -> None:
    reach = Reachability("m1", unreachable_after=0.3)
    changes: list[ReachChange] = []
    reach.subscribe(changes.append)
    reach.subscribe(lambda change: 1 / 0)  # a broken listener breaks nothing
    assert reach.state is Reach.CONNECTING
    reach.connected()
    reach.slow("no answer within 2s")
    reach.slow("again")  # no change, no report
    reach.answered()
    reach.failed("connection refused")  # down: connecting again...
    reach.failed("connection refused")
    await anyio.sleep(0.5)  # ... and unreachable once down for unreachable_after, on time
    pending = {"runs": True}
    reach.resync_needed = lambda: pending["runs"]
    reach.connected()  # back, not up until the runs are followed again
    reach.answered()
    assert reach.state is Reach.BACK
    pending["runs"] = False
    reach.settled()
    assert states(changes) == [
        Reach.UP, Reach.SLOW, Reach.UP, Reach.CONNECTING, Reach.UNREACHABLE, Reach.BACK,
        Reach.UP,
    ]  # fmt: skip
    assert changes[1].detail == "no answer within 2s" and changes[1].previous is Reach.UP
    assert changes[4].detail == "connection refused" and changes[4].machine == "m1"
    reach.close()


# ---- a machine stopped, and back ------------------------------------------------------------


async def test_a_machine_stopped_and_back_loses_no_line_and_reads_the_real_exit(
    sshd: SSHD, work: Path, session_reaper: list[int]
) -> None:
    host = SSHHost(sshd.target(unreachable_after=1.0, keepalive_interval=1.0))
    changes: list[ReachChange] = []
    host.on_reachability(changes.append)
    try:
        with anyio.fail_after(90):
            handle = await host.start(ticker(work, "run-1", 7))
            session_reaper.append(handle.identity.pid)
            follow = Follow(handle)
            async with anyio.create_task_group() as tg:
                follow.start_in(tg)
                await until(lambda: follow.lines() >= 30, 30, "the first lines")
                sshd.stop()  # the machine is gone: listener and connections
                await until(lambda: host.reachability.state is Reach.UNREACHABLE, 20, "away")
                # Away for longer than unreachable_after: the handle has not given up.
                assert await wait_while_reachable(handle) == ExitStatus(
                    None, lost=True, reason=f"m1 unreachable for more than 1s: "
                    f"{host.reachability.detail}",
                )  # fmt: skip
                await anyio.sleep(1.5)
                assert follow.status is None and not follow.drained
                sshd.restart()
            assert follow.status == ExitStatus(code=7)
    finally:
        with anyio.fail_after(10):
            await host.aclose()
    out, err = expected()
    assert follow.got["stdout"] == out and follow.got["stderr"] == err
    seen = states(changes)
    assert seen[:1] == [Reach.UP] and Reach.CONNECTING in seen
    assert seen[seen.index(Reach.UNREACHABLE) :] == [Reach.UNREACHABLE, Reach.BACK, Reach.UP]


async def test_a_machine_gone_for_good_is_waited_for_not_given_up(
    sshd: SSHD, work: Path, session_reaper: list[int]
) -> None:
    """No end is made up for a run on a machine that does not come back: ``wait`` goes on
    (the fleet decides, here by the old rule: lost after ``unreachable_after``)."""
    host = SSHHost(sshd.target(unreachable_after=1.0))
    try:
        with anyio.fail_after(30):
            handle = await host.start(ticker(work, "run-1", 0, pause=1.0))
            session_reaper.append(handle.identity.pid)
            sshd.stop()
            status = await wait_while_reachable(handle)
            assert status.lost and "m1 unreachable for more than 1s" in status.reason
            with anyio.move_on_after(1.5) as waited:
                await handle.wait()
            assert waited.cancelled_caught, "the handle gave the run up"
            chunks = []
            with anyio.move_on_after(1.0):
                chunks = [c async for c in handle.output()]
            assert chunks == []
    finally:
        with anyio.fail_after(10):
            await host.aclose()


# ---- logins that hang while connections live ------------------------------------------------


async def test_logins_that_hang_while_connections_live_are_slow_never_a_crash(
    tmp_path: Path, client_key: Path, work: Path, session_reaper: list[int]
) -> None:
    """New commands time out (``HostSlow``) while the watcher's channel, open before, goes on
    (output flows, leases are renewed); the machine is ``slow`` -- never ``unreachable``,
    however long, and no run is given up -- and once logins answer again every line has
    arrived once and the real exit code is read."""
    where = tmp_path / "hanging"
    where.mkdir()
    flag = where / "logins-hang"
    with run_sshd(where, client_key=client_key, extra_config=hanging_login(where, flag)) as d:
        host = SSHHost(d.target(unreachable_after=1.0, command_timeout=2.0))
        changes: list[ReachChange] = []
        host.on_reachability(changes.append)
        try:
            with anyio.fail_after(120):
                handle = await host.start(ticker(work, "run-1", 5, pause=0.03))
                session_reaper.append(handle.identity.pid)
                follow = Follow(handle)
                async with anyio.create_task_group() as tg:
                    follow.start_in(tg)
                    await until(lambda: follow.lines() >= 20, 30, "the first lines")
                    flag.touch()
                    before = follow.lines()
                    began = time.monotonic()
                    with pytest.raises(HostSlow):
                        await host.glob(str(work), ["*"])
                    assert time.monotonic() - began < 10
                    assert host.reachability.state is Reach.SLOW
                    # Leases are renewed all the same, through the watcher: no new login.
                    renewed = host.follower.renewals
                    with anyio.fail_after(1):
                        await host.renew_leases([handle.identity.run_dir])
                    await until(lambda: host.follower.renewals > renewed, 5, "a renewal")
                    await anyio.sleep(3.0)  # three times unreachable_after
                    assert host.reachability.state is Reach.SLOW
                    assert follow.status is None
                    # Output goes on flowing meanwhile: the watcher reads it, no login needed.
                    assert follow.lines() > before + 50, (before, follow.lines())
                    flag.unlink()
                assert follow.status == ExitStatus(code=5)
        finally:
            flag.unlink(missing_ok=True)
            with anyio.fail_after(10):
                await host.aclose()
        out, err = expected()
        assert follow.got["stdout"] == out and follow.got["stderr"] == err
        seen = states(changes)
        assert Reach.SLOW in seen and Reach.UNREACHABLE not in seen
        assert seen[-1] is Reach.UP
        await until(lambda: not remote_helpers(d), 15, "the hung logins to end")
