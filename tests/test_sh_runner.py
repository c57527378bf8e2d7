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
    names = ("wrapper", "pid", "stdout", "stderr", "meta", "runner.sh", "start.lock", "lease")
    for name in names:
        assert (rd / name).stat().st_mode & 0o777 == 0o600, name
    assert time.time() - (rd / "lease").stat().st_mtime < 30  # fresh from the start
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
    procs: Procs, rd: Path, argv: list[str], *, dog: Path, lease_timeout: str
) -> subprocess.Popen[bytes]:
    """The wrapper as the local host starts it: in a session of its own, its lease made."""
    rd.mkdir(parents=True)
    (rd / "runner.sh").write_text(sh.script("runner"))
    (rd / "lease").write_text("")
    runner_args = [str(rd), str(dog), lease_timeout, str(rd), "0022", "--", *argv]
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


def watchdog_of(dog: Path) -> tuple[int, int]:
    def named() -> tuple[int, int] | None:
        return runfiles.parse_pair(runfiles.read_small(f"{dog}.dog"))

    assert wait_until(named), "no watchdog was named"
    found = named()
    assert found is not None and runfiles.same_process(found)
    return found


def renew_while(lease: Path, predicate: object, timeout: float) -> bool:
    """Renew ``lease`` (as the fleet does) until ``predicate()`` holds or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return True
        os.utime(lease)
        time.sleep(0.1)
    return False


def test_the_watchdog_stops_a_run_whose_lease_is_not_renewed(tmp_path: Path, procs: Procs) -> None:
    dog = tmp_path / "shift" / "lease"
    dog.parent.mkdir()
    rd = tmp_path / "shift" / "run-1"
    wrapper = run_wrapper(procs, rd, ["sleep", "60"], dog=dog, lease_timeout="2")
    watchdog = watchdog_of(dog)
    assert len(list(Path(f"{dog}.runs").iterdir())) == 1
    assert wrapper.wait(timeout=15) == 0
    assert (rd / "exit").read_text() == "143\n"
    assert (rd / "note").read_text() == "stopped by the watchdog: lease not renewed for 2s\n"
    assert wait_until(lambda: not runfiles.same_process(watchdog))
    assert list(Path(f"{dog}.runs").iterdir()) == [], "the ended run's entry stayed"


def test_each_run_lives_by_its_own_lease(tmp_path: Path, procs: Procs) -> None:
    """One watchdog for both runs; renewing one run's lease does not keep the other alive (the
    fleet stopped supervising it: its machine was away), and a run that ignores SIGTERM gets
    SIGKILL; an agent whose wrapper is gone too is ended as lost."""
    dog = tmp_path / "shift" / "lease"
    dog.parent.mkdir()
    kept, dropped, stubborn = (tmp_path / "shift" / f"run-{i}" for i in (1, 2, 3))
    kept_wrapper = run_wrapper(procs, kept, ["sleep", "60"], dog=dog, lease_timeout="2")
    dropped_wrapper = run_wrapper(procs, dropped, ["sleep", "60"], dog=dog, lease_timeout="2")
    trap = ["sh", "-c", 'trap "" TERM; sleep 60 & wait; sleep 60']
    stubborn_wrapper = run_wrapper(procs, stubborn, trap, dog=dog, lease_timeout="2")
    os.kill(stubborn_wrapper.pid, signal.SIGKILL)  # its agent lives on, orphaned
    stubborn_wrapper.wait(timeout=10)
    watchdog = watchdog_of(dog)
    for other in (dropped_wrapper, stubborn_wrapper):
        assert runfiles.read_start_ticks(other.pid) != watchdog[1] or other.pid != watchdog[0]

    def others_ended() -> bool:
        return (dropped / "exit").exists() and (stubborn / "exit").exists()

    assert renew_while(kept / "lease", others_ended, 20), "the runs not renewed lived on"
    assert (dropped / "exit").read_text() == "143\n"
    assert "lease not renewed for 2s" in (dropped / "note").read_text()
    assert (stubborn / "exit").read_text() == "lost\n"
    note = (stubborn / "note").read_text()
    assert "lease not renewed" in note and "wrapper was gone too" in note
    orphan = runfiles.parse_pair(runfiles.read_small(str(stubborn / "pid")))
    assert not runfiles.same_process(orphan)
    assert kept_wrapper.poll() is None and runfiles.same_process(watchdog)
    assert wait_until(lambda: len(list(Path(f"{dog}.runs").iterdir())) == 1)
    # Its lease no longer renewed, the last run is stopped too, and the watchdog leaves.
    assert kept_wrapper.wait(timeout=15) == 0
    assert (kept / "exit").read_text() == "143\n"
    assert wait_until(lambda: not runfiles.same_process(watchdog))


def test_the_watchdog_leaves_once_a_killed_wrappers_run_is_ended(
    tmp_path: Path, procs: Procs
) -> None:
    """Issue 12: a watchdog outlived its fleet by 8 minutes after its run's wrapper was
    killed.  Now a run whose wrapper and agent are gone is marked lost, and the watchdog goes
    at its next look although the lease is fresh."""
    dog = tmp_path / "lease"
    rd = tmp_path / "run-1"
    wrapper = run_wrapper(procs, rd, ["sleep", "60"], dog=dog, lease_timeout="3")
    watchdog = watchdog_of(dog)
    agent = runfiles.parse_pair(runfiles.read_small(str(rd / "pid")))
    assert agent is not None
    os.kill(wrapper.pid, signal.SIGKILL)
    wrapper.wait(timeout=10)
    os.kill(agent[0], signal.SIGKILL)
    gone = renew_while(rd / "lease", lambda: not runfiles.same_process(watchdog), 10)
    assert gone, "the watchdog stayed"
    assert (rd / "exit").read_text() == "lost\n"
    assert "marked lost" in (rd / "note").read_text()
    assert probe_sh(rd)[str(rd)].state is RunState.LOST
