"""SSHHost against real OpenSSH sshd instances on the loopback interface.

The "remote" machine is this machine, so the tests can look at the run's processes with psutil.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import psutil
import pytest

from supervisor import sh
from supervisor.check import check_machine, format_check_table
from supervisor.hosts.base import (
    Chunk,
    CommandFailed,
    ExitStatus,
    HostAuthError,
    HostError,
    HostUnreachable,
    RunIdentity,
    RunSpec,
    RunState,
)
from supervisor.hosts.local import LocalHost
from supervisor.hosts.ssh import FramingError, LinkLost, Output, SSHHost, SSHRunHandle, SSHTarget
from tests.conftest import unstartable_spec
from tests.sshd import (
    SSHD,
    keygen,
    known_hosts_line,
    noisy_login,
    remote_helpers,
    run_sshd,
    session_processes,
)


@pytest.fixture
async def host(sshd: SSHD) -> AsyncIterator[SSHHost]:
    h = SSHHost(sshd.target())
    try:
        yield h
    finally:
        with anyio.fail_after(10):
            await h.aclose()


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "work"
    d.mkdir()
    yield d


def spec_for(work: Path, argv: list[str], name: str = "run-1", **kw: object) -> RunSpec:
    return RunSpec(
        argv=argv,
        cwd=str(work),
        run_dir=str(work / "runs" / name),
        lease_path=str(work / "lease"),
        lease_timeout=float(kw.pop("lease_timeout", 120.0)),  # type: ignore[arg-type]
        env=kw.pop("env", {}),  # type: ignore[arg-type]
        meta=kw.pop("meta", {}),  # type: ignore[arg-type]
    )


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(0.02)


async def collect(handle: SSHRunHandle, **kw: object) -> tuple[bytes, bytes, list[Chunk]]:
    chunks = [c async for c in handle.output(**kw)]  # type: ignore[arg-type]
    out = b"".join(c.data for c in chunks if c.stream == "stdout")
    err = b"".join(c.data for c in chunks if c.stream == "stderr")
    return out, err, chunks


# ---- short commands -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_run_glob_resolve(host: SSHHost, work: Path) -> None:
    with anyio.fail_after(20):
        r = await host.run(["sh", "-c", 'printf "%s|" "$@"; echo; echo oops >&2', "x", "a b", "*"])
        assert r.exit_code == 0
        assert r.stdout == "a b|*|\n"
        assert r.stderr == "oops\n"

        r = await host.run(["pwd"], cwd=str(work))
        assert r.stdout.strip() == str(work)

        with pytest.raises(CommandFailed) as info:
            await host.run(["sh", "-c", "echo bad news >&2; exit 7"])
        assert info.value.result.exit_code == 7
        assert "bad news" in str(info.value) and "m1" in str(info.value)
        r = await host.run(["sh", "-c", "exit 7"], check=False)
        assert r.exit_code == 7
        r = await host.run(["sh", "-c", "kill -9 $$"], check=False)
        assert r.exit_code == 128 + signal.SIGKILL
        r = await host.run(["no-such-program-xyz"], check=False)
        assert r.exit_code == 127

        r = await host.run(["sh", "-c", "printf '\\377\\376ok'"])
        assert r.stdout.endswith("ok") and "\ufffd" in r.stdout

        with pytest.raises(HostError) as timed_out:
            await host.run(["sleep", "30"], timeout=1, check=False)
        assert "took longer than 1s" in str(timed_out.value)

        home = os.path.expanduser("~")
        assert await host.resolve_path("~") == home
        assert await host.resolve_path("~/a/b") == f"{home}/a/b"
        assert await host.resolve_path("/x/../y") == "/y"

        m = work / ".tmp" / "milestones"
        m.mkdir(parents=True)
        (m / "issue-5-milestone-1.md").write_text("x")
        (m / "issue-5-milestone-2.md").write_text("x")
        (m / "issue-50-milestone-1.md").write_text("x")
        (work / "with space.md").write_text("x")
        found = await host.glob(
            str(work),
            [".tmp/milestones/issue-5-milestone-*.md", "*.md", "nothing-*", "$(touch pwned)"],
        )
        assert found == {
            ".tmp/milestones/issue-5-milestone-1.md",
            ".tmp/milestones/issue-5-milestone-2.md",
            "with space.md",
        }
        assert not (work / "pwned").exists()
        assert await host.glob(str(work / "missing"), ["*"]) == set()

        rd = work / "runs" / "r1"
        rd.mkdir(parents=True)
        (rd / "lease").write_text("")
        claim = work / "claim"
        claim.write_text("x\n")
        old = time.time() - 600
        for path in (rd / "lease", claim):
            os.utime(path, (old, old))
        # Without a watcher (no run followed): one command; a lease that is gone is not made.
        await host.renew_leases([str(rd), str(work / "runs" / "gone")], claim=str(claim))
        for path in (rd / "lease", claim):
            assert time.time() - path.stat().st_mtime < 60, path
        assert not (work / "runs" / "gone").exists()


# ---- runs ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_run_output_and_exit(host: SSHHost, work: Path, session_reaper: list[int]) -> None:
    script = "for i in $(seq 1 2000); do echo line $i; done; echo err >&2; exit 3"
    with anyio.fail_after(30):
        handle = await host.start(spec_for(work, ["sh", "-c", script], env={"FOO": "bar baz"}))
        session_reaper.append(handle.identity.pid)
        assert handle.identity.pid > 1 and handle.identity.start_ticks > 0
        out, err, chunks = await collect(handle)
        status = await handle.wait()
    assert out.decode().splitlines() == [f"line {i}" for i in range(1, 2001)]
    assert err == b"err\n"
    assert status == ExitStatus(code=3)
    assert await handle.wait() is status  # idempotent
    # offsets are byte positions in each file
    last = {c.stream: c.end for c in chunks}
    assert last == {"stdout": len(out), "stderr": len(err)}
    # resuming from an offset yields exactly the rest
    rest, _, _ = await collect(handle, offsets={"stdout": 100, "stderr": len(err)})
    assert rest == out[100:]
    # an attached handle sees the same recorded status
    again = await host.attach(handle.identity)
    assert again is not None and await again.wait() == ExitStatus(code=3)
    assert not await handle.alive()
    gone = RunIdentity(host="m1", run_dir=str(work / "runs" / "nope"), pid=1234, start_ticks=1)
    assert await host.attach(gone) is None


@pytest.mark.anyio
async def test_chatty_stdout_and_stderr_are_drained(
    host: SSHHost, work: Path, session_reaper: list[int]
) -> None:
    size = 3_000_000
    script = (
        f"head -c {size} /dev/zero | tr '\\0' o & head -c {size} /dev/zero | tr '\\0' e >&2; "
        "wait; printf END"
    )
    with anyio.fail_after(30):
        handle = await host.start(spec_for(work, ["sh", "-c", script]))
        session_reaper.append(handle.identity.pid)
        out, err, _ = await collect(handle)
        assert (await handle.wait()).code == 0
    assert len(out) == size + 3 and out.endswith(b"oEND") and set(out[:-3]) == {ord("o")}
    assert err == b"e" * size


@pytest.mark.anyio
async def test_closing_output_early_leaves_only_the_watcher_and_close_ends_it(
    sshd: SSHD, host: SSHHost, work: Path, session_reaper: list[int]
) -> None:
    """A reader that leaves early costs nothing on the machine: no run holds a channel or a
    process there, only the machine's one watcher, and closing the host ends that too."""
    script = "while :; do echo tick; sleep 0.05; done"
    with anyio.fail_after(30):
        handle = await host.start(spec_for(work, ["sh", "-c", script]))
        session_reaper.append(handle.identity.pid)
        stream = handle.output()
        first = await stream.__anext__()
        assert first.data.startswith(b"tick")
        await stream.aclose()  # type: ignore[attr-defined]
        assert await handle.alive()
        helpers = remote_helpers(sshd)
        assert 1 <= len(helpers) <= 3, helpers  # the watcher, its EOF guard, a nap
        await handle.signal(signal.SIGKILL)
        assert (await handle.wait()).code == 128 + signal.SIGKILL
        await host.aclose()
        assert await eventually(lambda: not remote_helpers(sshd), timeout=5), remote_helpers(sshd)


@pytest.mark.anyio
async def test_env_and_arguments_arrive_literally(
    host: SSHHost, work: Path, session_reaper: list[int]
) -> None:
    nasty = ['"; rm -rf ~', "$(touch pwned)", "a'b", "`id`", "*", "", "new\nline"]
    argv = ["sh", "-c", 'for a in "$@"; do printf "<%s>\\n" "$a"; done; printf "%s" "$X"', "sh"]
    with anyio.fail_after(20):
        handle = await host.start(
            spec_for(work, [*argv, *nasty], env={"X": "$(touch pwned2); ~ 'q'"})
        )
        session_reaper.append(handle.identity.pid)
        out, _, _ = await collect(handle)
        assert (await handle.wait()).code == 0
    expected = "".join(f"<{a}>\n" for a in nasty) + "$(touch pwned2); ~ 'q'"
    assert out.decode() == expected
    assert not (work / "pwned").exists() and not (work / "pwned2").exists()


@pytest.mark.anyio
async def test_output_survives_lost_link(
    sshd: SSHD, host: SSHHost, work: Path, session_reaper: list[int]
) -> None:
    script = "i=1; while [ $i -le 300 ]; do echo line $i; i=$((i+1)); sleep 0.01; done"
    with anyio.fail_after(40):
        handle = await host.start(spec_for(work, ["sh", "-c", script]))
        session_reaper.append(handle.identity.pid)
        received: list[bytes] = []
        some_read = anyio.Event()

        async def reader() -> None:
            async for chunk in handle.output():
                if chunk.stream == "stdout":
                    received.append(chunk.data)
                    if b"".join(received).count(b"\n") >= 30:
                        some_read.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await some_read.wait()
            killed = sshd.kill_connections()
        status = await handle.wait()
    assert killed >= 1
    assert host.connects >= 2, "the handle should have reconnected"
    lines = b"".join(received).decode().splitlines()
    assert lines == [f"line {i}" for i in range(1, 301)]
    assert status.code == 0


@pytest.mark.anyio
async def test_next_supervisor_reattaches_by_offsets(
    sshd: SSHD, work: Path, session_reaper: list[int]
) -> None:
    script = "i=1; while [ $i -le 100 ]; do echo line $i; i=$((i+1)); sleep 0.01; done; exit 5"
    first = SSHHost(sshd.target())
    got = b""
    offsets = {"stdout": 0, "stderr": 0}
    try:
        with anyio.fail_after(20):
            handle = await first.start(spec_for(work, ["sh", "-c", script]))
            session_reaper.append(handle.identity.pid)
            async for chunk in handle.output():
                got += chunk.data
                offsets[chunk.stream] = chunk.end
                if got.count(b"\n") >= 10:
                    break
    finally:
        await first.aclose()  # the first supervisor goes away; the run does not
    second = SSHHost(sshd.target())
    try:
        with anyio.fail_after(20):
            again = await second.attach(handle.identity)
            assert again is not None
            async for chunk in again.output(offsets):
                got += chunk.data
            assert (await again.wait()).code == 5
    finally:
        await second.aclose()
    assert got.decode().splitlines() == [f"line {i}" for i in range(1, 101)]


@pytest.mark.anyio
async def test_start_whose_answer_is_lost_is_found_again(
    host: SSHHost, work: Path, session_reaper: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = host.connections.exec_once
    mode = {"run_it": True, "fail": True}

    async def flaky(line: str, *, timeout: float, input: bytes | None) -> Output:
        if input is not None and mode["fail"]:  # only the start command sends input
            mode["fail"] = False
            if mode["run_it"]:
                await real(line, timeout=timeout, input=input)
            raise LinkLost(host.name, "SSH link lost while a command ran", started=True)
        return await real(line, timeout=timeout, input=input)

    monkeypatch.setattr(host.connections, "exec_once", flaky)
    with anyio.fail_after(30):
        # the run started, only the answer was lost: start() finds it and returns its handle
        handle = await host.start(spec_for(work, ["sleep", "600"], name="lost-answer"))
        session_reaper.append(handle.identity.pid)
        assert handle.identity.pid > 1 and await handle.alive()
        assert psutil.Process(handle.identity.pid).name() == "sleep"
        await handle.signal(signal.SIGKILL)
        assert (await handle.wait()).code == 128 + signal.SIGKILL

        # the run never started: start() says the machine is unreachable; a retry works
        mode.update(run_it=False, fail=True)
        spec = spec_for(work, ["true"], name="never-started")
        with pytest.raises(HostUnreachable):
            await host.start(spec)
        handle = await host.start(spec)
        assert (await handle.wait()).code == 0


@pytest.mark.anyio
async def test_stop_kills_whole_tree(host: SSHHost, work: Path, session_reaper: list[int]) -> None:
    script = 'trap "" TERM; sleep 600 & sleep 600 & echo ready; wait'
    with anyio.fail_after(30):
        handle = await host.start(spec_for(work, ["sh", "-c", script]))
        sid = handle.identity.pid
        session_reaper.append(sid)
        stdout = work / "runs" / "run-1" / "stdout"
        assert await eventually(lambda: b"ready" in stdout.read_bytes())
        assert len(session_processes(sid)) == 3
        assert await handle.alive()
        stats = await handle.stats()
        assert stats.processes == 3 and stats.rss_bytes > 0

        await handle.signal(signal.SIGTERM)
        await anyio.sleep(1.0)
        assert len(session_processes(sid)) == 3, "TERM is ignored by this run"
        await handle.signal(signal.SIGKILL)
        status = await handle.wait()
        assert await eventually(lambda: not session_processes(sid))
    assert status.code == 128 + signal.SIGKILL
    assert not await handle.alive()
    assert (await handle.stats()).processes == 0
    await handle.signal(signal.SIGTERM)  # already gone: not an error


@pytest.mark.anyio
async def test_reused_pid_is_not_signalled(
    host: SSHHost, work: Path, session_reaper: list[int]
) -> None:
    with anyio.fail_after(30):
        handle = await host.start(spec_for(work, ["sleep", "600"]))
        session_reaper.append(handle.identity.pid)
        ident = handle.identity
        impostor = RunIdentity(ident.host, ident.run_dir, ident.pid, ident.start_ticks + 1)
        other = await host.attach(impostor)
        assert other is not None
        await other.signal(signal.SIGKILL)
        await anyio.sleep(0.3)
        assert psutil.pid_exists(ident.pid)
        assert not await other.alive()
        assert await handle.alive()
        await handle.signal(signal.SIGKILL)
        assert (await handle.wait()).code == 128 + signal.SIGKILL


@pytest.mark.anyio
async def test_failed_start_raises(host: SSHHost, work: Path) -> None:
    spec = unstartable_spec(work)
    with anyio.fail_after(20), pytest.raises(HostError) as info:
        await host.start(spec)
    assert "did not start" in str(info.value) and "no-such-dir" in str(info.value)
    # a used run directory is never started again
    with anyio.fail_after(20), pytest.raises(HostError) as info:
        await host.start(spec)
    assert "already holds a run" in str(info.value)


@pytest.mark.anyio
async def test_wrapper_killed_means_lost(
    host: SSHHost, work: Path, session_reaper: list[int]
) -> None:
    with anyio.fail_after(20):
        handle = await host.start(spec_for(work, ["sleep", "600"]))
        session_reaper.append(handle.identity.pid)
        rd = work / "runs" / "run-1"
        wrapper = int((rd / "wrapper").read_text().split()[0])
        session_reaper.append(wrapper)  # its lease watchdog lives on in the wrapper's session
        os.kill(wrapper, signal.SIGKILL)
        status = await handle.wait()
        assert status.lost and status.code is None and "vanished" in status.reason
        # Ended where it runs: its tree killed, the end written down for every later reader
        # (the lease watchdog's "runs left" among them).
        assert (rd / "exit").read_text() == "lost\n" and "vanished" in (rd / "note").read_text()
        assert await eventually(lambda: not session_processes(handle.identity.pid))
        _ = [c async for c in handle.output()]  # ends too


@pytest.mark.anyio
async def test_each_run_lives_by_its_own_lease_renewed_through_the_watcher(
    host: SSHHost, work: Path, session_reaper: list[int]
) -> None:
    """Two runs under one watchdog; the fleet renews only the first (it no longer supervises
    the second): the second is stopped with the watchdog's note, the first lives.  With runs
    followed, renewals go through the machine's watcher: no new login each time."""
    with anyio.fail_after(60):
        kept = await host.start(spec_for(work, ["sleep", "600"], name="kept", lease_timeout=3))
        dropped = await host.start(
            spec_for(work, ["sleep", "600"], name="dropped", lease_timeout=3)
        )
        session_reaper.extend([kept.identity.pid, dropped.identity.pid])
        claim = work / "claim"
        claim.write_text("x\n")
        ended = anyio.Event()

        async def wait_dropped() -> None:
            await dropped.wait()
            ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_dropped)
            while not ended.is_set():
                await host.renew_leases([kept.identity.run_dir], claim=str(claim))
                with anyio.move_on_after(0.5):
                    await ended.wait()
        status = await dropped.wait()
        assert status.code == 128 + signal.SIGTERM
        assert "stopped by the watchdog: lease not renewed for 3s" in status.reason
        assert await kept.alive()
        assert host.follower.renewals >= 3
        assert time.time() - claim.stat().st_mtime < 5
        await kept.signal(signal.SIGKILL)
        assert (await kept.wait()).code == 128 + signal.SIGKILL


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_wrong_key_is_auth_error(sshd: SSHD, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_key")
    h = SSHHost(sshd.target(identity_file=str(other)))
    try:
        with anyio.fail_after(20), pytest.raises(HostAuthError) as info:
            await h.run(["true"])
    finally:
        await h.aclose()
    msg = str(info.value)
    assert msg.startswith("m1: ") and "authentication failed" in msg and str(other) in msg
    assert "\n" not in msg


@pytest.mark.anyio
async def test_host_key_mismatch_is_auth_error(sshd: SSHD, tmp_path: Path) -> None:
    impostor = keygen(tmp_path / "impostor_host_key")
    known = tmp_path / "known_hosts_other"
    known.write_text(known_hosts_line(sshd.address, sshd.port, Path(f"{impostor}.pub")))
    h = SSHHost(sshd.target(known_hosts=str(known)))
    try:
        with anyio.fail_after(20), pytest.raises(HostAuthError) as info:
            await h.run(["true"])
    finally:
        await h.aclose()
    msg = str(info.value)
    assert "known_hosts" in msg and "ssh-keygen -R" in msg and "ssh-keyscan" in msg
    assert getattr(info.value, "host_key", False)


@pytest.mark.anyio
async def test_known_hosts_none_disables_checking(sshd: SSHD, tmp_path: Path) -> None:
    h = SSHHost(sshd.target(known_hosts="none"))
    try:
        with anyio.fail_after(20):
            assert (await h.run(["echo", "hi"])).stdout == "hi\n"
    finally:
        await h.aclose()


@pytest.mark.anyio
async def test_closed_port_is_unreachable(closed_port: int) -> None:
    h = SSHHost(SSHTarget(name="dead", host="127.0.0.3", port=closed_port, known_hosts="none"))
    try:
        with anyio.fail_after(20), pytest.raises(HostUnreachable) as info:
            await h.run(["true"])
        assert "refused" in str(info.value) and str(info.value).startswith("dead: ")
        # a second try within the backoff window fails fast with the same error
        t0 = time.monotonic()
        with pytest.raises(HostUnreachable):
            await h.run(["true"])
        assert time.monotonic() - t0 < 1
    finally:
        await h.aclose()


@pytest.mark.anyio
async def test_many_concurrent_commands_share_channels(sshd: SSHD) -> None:
    h = SSHHost(sshd.target(max_channels=3, max_connections=4))
    try:
        results: dict[int, str] = {}

        async def one(i: int) -> None:
            results[i] = (await h.run(["sh", "-c", f"sleep 0.2; echo {i}"])).stdout

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, i)
        assert [results[i] for i in range(20)] == [f"{i}\n" for i in range(20)]
        assert h.connects <= 4, "more connections than max_connections were opened"
    finally:
        await h.aclose()


# ---- login-shell noise (issue 16) ---------------------------------------------------------------

NOISE_OUT = "Welcome to m1!\nlast login: yesterday\n"
NOISE_ERR = "pyenv: cannot rehash: /root/.pyenv/shims isn't writable\n"


@pytest.fixture(params=["stderr", "stdout", "both"])
def noisy_sshd(request: pytest.FixtureRequest, tmp_path: Path, client_key: Path) -> Iterator[SSHD]:
    """A machine whose login shell prints before every command."""
    where = tmp_path / "noisy"
    where.mkdir()
    config = noisy_login(
        where,
        stdout=NOISE_OUT if request.param in ("stdout", "both") else "",
        stderr=NOISE_ERR if request.param in ("stderr", "both") else "",
    )
    with run_sshd(where, client_key=client_key, extra_config=config) as server:
        yield server


@pytest.mark.anyio
async def test_a_noisy_login_never_enters_output(
    noisy_sshd: SSHD, work: Path, session_reaper: list[int]
) -> None:
    """Commands and a run's output (both streams, across cut links) arrive exactly once and
    byte-exact; a start succeeds; ``check`` warns of the noise."""
    host = SSHHost(noisy_sshd.target())
    script = (
        'i=1; while [ $i -le 400 ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); '
        "sleep 0.005; done"
    )
    expected_out = "".join(f"out {i}\n" for i in range(1, 401)).encode()
    expected_err = "".join(f"err {i}\n" for i in range(1, 401)).encode()
    try:
        with anyio.fail_after(60):
            r = await host.run(["sh", "-c", "echo hi; echo there >&2"])
            assert (r.stdout, r.stderr) == ("hi\n", "there\n")
            assert r.login_noise and r.login_noise in (NOISE_OUT, NOISE_ERR, NOISE_OUT + NOISE_ERR)
            handle = await host.start(spec_for(work, ["sh", "-c", script]))
            session_reaper.append(handle.identity.pid)
            got = {"stdout": b"", "stderr": b""}
            cuts = 0
            async for chunk in handle.output():
                got[chunk.stream] += chunk.data
                assert chunk.end == len(got[chunk.stream])
                if cuts < 3 and len(got["stdout"]) > 600 * (cuts + 1):
                    noisy_sshd.kill_connections()
                    cuts += 1
            assert (await handle.wait()).code == 0
            row = await check_machine(host, agent_executable="sh", workdir=str(work))
    finally:
        with anyio.fail_after(10):
            await host.aclose()
    assert cuts == 3 and host.connects >= 2
    assert got["stdout"] == expected_out
    assert got["stderr"] == expected_err
    assert row.ok and "login shell prints" in row.warning
    assert "warning: the login shell prints" in format_check_table([row])


@pytest.mark.anyio
async def test_a_login_that_does_not_run_the_command_is_a_clear_error(
    tmp_path: Path, client_key: Path
) -> None:
    where = tmp_path / "deaf"
    where.mkdir()
    with run_sshd(where, client_key=client_key, extra_config="ForceCommand echo hello") as d:
        host = SSHHost(d.target())
        try:
            with anyio.fail_after(20), pytest.raises(FramingError) as info:
                await host.run(["true"])
        finally:
            await host.aclose()
    assert "did not run the command" in str(info.value) and "hello" in str(info.value)


# ---- finding runs by their directory ------------------------------------------------------------


@pytest.mark.anyio
async def test_probe_scan_attach_dir_and_timezone(
    host: SSHHost, work: Path, session_reaper: list[int]
) -> None:
    root = work / "runs"
    with anyio.fail_after(30):
        running = await host.start(
            spec_for(work, ["sleep", "600"], name="w1/run-1", meta={"task": "9", "run": "1"})
        )
        session_reaper.append(running.identity.pid)
        done = await host.start(spec_for(work, ["true"], name="w2/run-1"))
        assert (await done.wait()).code == 0
        run_dirs = [running.identity.run_dir, done.identity.run_dir, str(root / "nope")]
        found = await host.probe(run_dirs)
        assert [found[d].state for d in run_dirs] == [
            RunState.RUNNING,
            RunState.EXITED,
            RunState.GONE,
        ]
        assert found[run_dirs[0]].meta == {"task": "9", "run": "1"}
        assert found[run_dirs[0]].pid == running.identity.pid
        assert await host.scan(str(root)) == [running.identity.run_dir]
        again = await host.attach_dir(running.identity.run_dir)
        assert again is not None and again.identity == running.identity
        assert await host.attach_dir(str(root / "nope")) is None
        assert (await again.stats()).cpu_percent is None  # a first look: no % yet
        await anyio.sleep(0.3)
        assert (await again.stats()).cpu_percent is not None
        assert await host.timezone() == await LocalHost().timezone()
        await again.signal(signal.SIGKILL)
        assert (await running.wait()).code == 128 + signal.SIGKILL
    rd = Path(running.identity.run_dir)
    for directory in (root, rd.parent, rd):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    for name in ("meta", "runner.sh", "wrapper", "pid", "stdout", "exit", "start.lock"):
        assert (rd / name).stat().st_mode & 0o777 == 0o600, name


@pytest.mark.anyio
async def test_a_start_cut_short_is_found_running_by_the_next_supervisor(
    sshd: SSHD, work: Path, session_reaper: list[int]
) -> None:
    """Issue 16.5: `up` killed within 10 ms of a remote start.  The start goes on remotely and
    holds its lock until the pid is written; the next supervisor's probe waits for it and sees
    the run RUNNING, never UNSTARTED, and adopts it from its directory alone."""
    slow = b"sleep 1\n" + sh.script("runner").encode()  # a wrapper slow to write its files
    first = SSHHost(sshd.target(), runner=slow)
    spec = spec_for(work, ["sleep", "600"], name="cut-short")
    try:
        with anyio.fail_after(20):
            await first.run(["true"])  # connected: the start goes out at once
            async with anyio.create_task_group() as tg:

                async def start_it() -> None:
                    await first.start(spec)

                tg.start_soon(start_it)
                assert await eventually(lambda: Path(spec.run_dir).is_dir(), timeout=10)
                await anyio.sleep(0.01)
                tg.cancel_scope.cancel()  # the supervisor dies 10 ms into the remote start
    finally:
        await first.aclose()
    assert not (Path(spec.run_dir) / "pid").exists(), "the start was not cut short"
    second = SSHHost(sshd.target())
    try:
        with anyio.fail_after(30):
            found = (await second.probe([spec.run_dir]))[spec.run_dir]
            assert found.state is RunState.RUNNING and found.pid is not None
            session_reaper.append(found.pid)
            handle = await second.attach_dir(spec.run_dir)
            assert handle is not None and await handle.alive()
            await handle.stop(5)
            assert (await handle.wait()).code == 128 + signal.SIGTERM
    finally:
        await second.aclose()


@pytest.mark.anyio
async def test_more_runs_than_channels_over_one_connection(
    sshd: SSHD, work: Path, session_reaper: list[int]
) -> None:
    """No run holds a channel: with 2 channels a connection and max_connections = 1, five runs
    are followed at once over one connection and helper commands get through at once."""
    h = SSHHost(sshd.target(max_channels=2, max_connections=1))
    script = "sleep 1; echo done"
    got: dict[int, bytes] = {}
    try:
        with anyio.fail_after(30):
            handles = [
                await h.start(spec_for(work, ["sh", "-c", script], name=f"run-{i}"))
                for i in range(5)
            ]
            session_reaper.extend(handle.identity.pid for handle in handles)

            async def follow(i: int) -> None:
                got[i] = b"".join([c.data async for c in handles[i].output()])

            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(follow, i)
                await anyio.sleep(0.3)
                began = time.monotonic()
                assert (await h.run(["echo", "helper"])).stdout == "helper\n"
                assert time.monotonic() - began < 0.9, "the helper waited for the runs"
            assert [(await handle.wait()).code for handle in handles] == [0] * 5
    finally:
        await h.aclose()
    assert got == {i: b"done\n" for i in range(5)}
    assert h.connects == 1


@pytest.mark.anyio
async def test_fifty_runs_on_one_machine_start_stream_and_stop_cleanly(
    sshd: SSHD, work: Path, session_reaper: list[int]
) -> None:
    """Fifty runs on one machine (OpenSSH's MaxSessions is 10): they start together, every
    line of each arrives once, half are stopped while they run, and the machine is followed
    by one watcher over one connection once the starts are over; nothing is left behind."""
    h = SSHHost(sshd.target())
    count = 50
    script = (
        'i=1; while [ $i -le 20 ]; do echo "$0 line $i"; i=$((i+1)); sleep 0.05; done; '
        'if [ "$0" -ge 25 ]; then sleep 600; fi'
    )
    got: dict[int, bytes] = {}
    codes: dict[int, int | None] = {}
    try:
        with anyio.fail_after(120):
            handles: dict[int, SSHRunHandle] = {}

            async def start(i: int) -> None:
                spec = spec_for(work, ["sh", "-c", script, str(i)], name=f"run-{i}")
                handles[i] = await h.start(spec)
                session_reaper.append(handles[i].identity.pid)

            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(start, i)

            async def follow(i: int) -> None:
                handle = handles[i]
                async with anyio.create_task_group() as inner:

                    async def pump() -> None:
                        got[i] = b"".join([c.data async for c in handle.output()])

                    inner.start_soon(pump)
                    if i >= 25:
                        path = Path(handle.identity.run_dir) / "stdout"
                        assert await eventually(lambda: b"line 20" in path.read_bytes(), 30)
                        await handle.stop(5)
                    codes[i] = (await handle.wait()).code

            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(follow, i)
            assert h.follower.watchers >= 1
            assert len([link for link in h.connections._links if link.alive]) <= 4
            await anyio.sleep(4)  # the burst's extra connections fall idle and are closed
            assert (await h.run(["true"])).exit_code == 0
            assert len([link for link in h.connections._links if link.alive]) == 1
    finally:
        await h.aclose()
    for i in range(count):
        assert got[i] == b"".join(b"%d line %d\n" % (i, n) for n in range(1, 21)), i
    assert codes == {i: 0 if i < 25 else 128 + signal.SIGTERM for i in range(count)}
    assert await eventually(lambda: not remote_helpers(sshd), timeout=10)
