"""The run wrapper and the remote start, run with plain ``sh`` against local run directories
(the scripts a remote machine runs, without sshd)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from supervisor import sh
from supervisor.hosts import runfiles
from supervisor.hosts.runfiles import RunState
from tests.sh_helpers import TIMEOUT, Procs, procs_fixture, run_script
from tests.test_sh_status import probe_sh

__all__ = ["procs_fixture"]  # the `procs` fixture
START_WAIT = "10"


def wait_until(predicate: object, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def start(
    procs: Procs,
    rd: Path,
    argv: list[str],
    *,
    lease: Path,
    lease_timeout: str = "0",
    cwd: Path | None = None,
    meta: str = "task=3\nrun=1\n",
    umask: int = 0o022,
    runner: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """``sh/start.sh`` as a remote machine runs it (its login umask ``umask``)."""
    runner_args = [str(rd), str(lease), lease_timeout, str(cwd or rd.parent), "", "--", *argv]
    command = ["setsid", "sh", str(rd / "runner.sh"), *runner_args]
    text = f"umask {umask:04o}; {sh.script('start')}"
    done = subprocess.run(
        ["sh", "-c", text, "sh", str(rd), str(lease), meta, START_WAIT, *command],
        input=runner if runner is not None else sh.script("runner").encode(),
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    if done.returncode == 0:
        pid = int(done.stdout.split()[0])
        if pid > 1:
            procs.watch_session(pid)
        wrapper = (rd / "wrapper").read_text().split()
        procs.watch_session(int(wrapper[0]))
    return done


def test_start_answers_pid_and_wrapper_and_keeps_files_private(
    tmp_path: Path, procs: Procs
) -> None:
    rd = tmp_path / "fleet" / "w1" / "run-1"
    work = tmp_path / "work"
    work.mkdir()
    agent = ["sh", "-c", "touch made-by-agent; exec sleep 60"]
    done = start(procs, rd, agent, lease=tmp_path / "fleet" / "lease", cwd=work)
    assert done.returncode == 0, done.stderr
    pid_line, wrapper_line = done.stdout.decode().splitlines()
    pid, ticks = map(int, pid_line.split())
    assert runfiles.same_process((pid, ticks))
    assert wrapper_line == (rd / "wrapper").read_text().strip()
    status = probe_sh(rd)[str(rd)]
    assert status.state is RunState.RUNNING and status.pid == pid
    assert status.meta == {"task": "3", "run": "1"}
    # The run directory and its files are private; the agent kept the login's umask.
    assert wait_until(lambda: (work / "made-by-agent").exists())
    assert (work / "made-by-agent").stat().st_mode & 0o777 == 0o644
    for directory in (tmp_path / "fleet", tmp_path / "fleet" / "w1", rd):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    for name in ("wrapper", "pid", "stdout", "stderr", "meta", "runner.sh", "start.lock"):
        assert (rd / name).stat().st_mode & 0o777 == 0o600, name
    # A used run directory is never started again.
    again = start(procs, rd, ["true"], lease=tmp_path / "fleet" / "lease")
    assert again.returncode == 90 and b"already holds a run" in again.stderr
    os.killpg(pid, signal.SIGKILL)
    assert wait_until(lambda: (rd / "exit").exists())
    assert (rd / "exit").read_text() == "137\n"
    assert (rd / "exit").stat().st_mode & 0o777 == 0o600


def test_a_start_in_flight_is_seen_running_never_unstarted(tmp_path: Path, procs: Procs) -> None:
    """The start holds start.lock until the pid is written; a probe made meanwhile (the next
    supervisor, after this one was killed mid-start) waits for it."""
    rd = tmp_path / "run"
    slow = b"sleep 2\n" + sh.script("runner").encode()  # a wrapper slow to write its files
    result: list[subprocess.CompletedProcess[bytes]] = []
    starter = threading.Thread(
        target=lambda: result.append(
            start(procs, rd, ["sleep", "60"], lease=tmp_path / "lease", runner=slow)
        )
    )
    starter.start()
    try:
        assert wait_until(lambda: (rd / "start.lock").exists())
        began = time.monotonic()
        status = probe_sh(rd, lock_wait=12)[str(rd)]
        assert time.monotonic() - began > 1.0, "the probe did not wait for the start"
        assert status.state is RunState.RUNNING and status.pid is not None
    finally:
        starter.join(TIMEOUT)
    assert result and result[0].returncode == 0, result
    found = run_script("find-start", str(rd), START_WAIT)
    assert found.stdout == result[0].stdout


def test_find_start_says_none_for_a_start_that_never_ran(tmp_path: Path) -> None:
    assert run_script("find-start", str(tmp_path / "nothing"), "1").stdout == b"none\n"
    (tmp_path / "made").mkdir()
    assert run_script("find-start", str(tmp_path / "made"), "1").stdout == b"none\n"


def test_probe_gives_up_on_a_lock_held_too_long(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    rd.mkdir()
    with open(rd / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        began = time.monotonic()
        status = probe_sh(rd, lock_wait=1)[str(rd)]
        assert time.monotonic() - began < 5
    assert status.state is RunState.RUNNING  # young, no wrapper: maybe still starting


def run_wrapper(
    procs: Procs, rd: Path, argv: list[str], *, lease: Path, lease_timeout: str
) -> subprocess.Popen[bytes]:
    """The wrapper as the local host starts it: in a session of its own."""
    rd.mkdir(parents=True)
    (rd / "runner.sh").write_text(sh.script("runner"))
    runner_args = [str(rd), str(lease), lease_timeout, str(rd), "0022", "--", *argv]
    wrapper = subprocess.Popen(
        ["sh", str(rd / "runner.sh"), *runner_args],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    procs.started.append(wrapper)
    procs.watch_session(wrapper.pid)
    assert wait_until(lambda: runfiles.parse_pair(runfiles.read_small(str(rd / "pid"))))
    agent = runfiles.parse_pair(runfiles.read_small(str(rd / "pid")))
    assert agent is not None
    procs.watch_session(agent[0])
    return wrapper


def watchdog_of(lease: Path) -> int:
    def named() -> tuple[int, int] | None:
        return runfiles.parse_pair(runfiles.read_small(f"{lease}.dog"))

    assert wait_until(named), "no watchdog was named"
    found = named()
    assert found is not None and runfiles.same_process(found)
    return found[0]


def test_the_watchdog_stops_a_run_whose_lease_is_not_renewed(
    tmp_path: Path, procs: Procs
) -> None:
    lease = tmp_path / "lease"
    lease.touch()
    rd = tmp_path / "run-1"
    wrapper = run_wrapper(procs, rd, ["sleep", "60"], lease=lease, lease_timeout="2")
    dog = watchdog_of(lease)
    dog_ticks = runfiles.read_start_ticks(dog)
    assert wrapper.wait(timeout=15) == 0
    assert (rd / "exit").read_text() == "143\n"
    assert "not renewed" in (rd / "note").read_text()
    assert wait_until(lambda: not runfiles.same_process((dog, dog_ticks or -1)))


def test_the_watchdog_leaves_once_a_killed_wrappers_run_is_ended(
    tmp_path: Path, procs: Procs
) -> None:
    """Issue 12: a watchdog outlived its fleet by 8 minutes after its run's wrapper was
    killed.  Now a run whose wrapper and agent are gone is marked lost, and the watchdog goes
    at its next look although the lease is fresh."""
    lease = tmp_path / "lease"
    lease.touch()
    rd = tmp_path / "run-1"
    wrapper = run_wrapper(procs, rd, ["sleep", "60"], lease=lease, lease_timeout="3")
    dog = watchdog_of(lease)
    agent = runfiles.parse_pair(runfiles.read_small(str(rd / "pid")))
    assert agent is not None
    os.kill(wrapper.pid, signal.SIGKILL)
    wrapper.wait(timeout=10)
    os.kill(agent[0], signal.SIGKILL)
    dog_ticks = runfiles.read_start_ticks(dog)
    end = time.monotonic() + 10
    while runfiles.same_process((dog, dog_ticks or -1)) and time.monotonic() < end:
        lease.touch()  # the fleet still renews the lease
        time.sleep(0.2)
    assert not runfiles.same_process((dog, dog_ticks or -1)), "the watchdog stayed"
    assert (rd / "exit").read_text() == "lost\n"
    assert "marked lost" in (rd / "note").read_text()
