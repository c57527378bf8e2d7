"""The run directory's rules, sh side and Python side: ``sh/status.sh`` prints facts that
``hosts/runfiles.py`` judges, and the local host's own look at ``/proc`` is judged the same."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from supervisor.hosts import runfiles
from supervisor.hosts.local import LocalHost
from supervisor.hosts.runfiles import RunState
from tests.sh_helpers import Procs, pair, procs_fixture, run_script, session_members, write

__all__ = ["procs_fixture"]  # the `procs` fixture


State = RunState


def probe_sh(*run_dirs: Path, lock_wait: int = 1) -> dict[str, runfiles.RunStatus]:
    done = run_script("status", str(lock_wait), *map(str, run_dirs))
    assert done.returncode == 0, done.stderr
    facts = runfiles.parse_probe(done.stdout.decode())
    return {d: runfiles.decide(f) for d, f in facts.items()}


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


Setup = Callable[[Path, Procs], None]


def _running(rd: Path, p: Procs) -> None:
    write(rd / "wrapper", pair(p.sleeper()))
    write(rd / "pid", pair(p.sleeper()))


def _orphaned(rd: Path, p: Procs) -> None:
    write(rd / "wrapper", pair(p.sleeper(), off_by=1))  # its pid is now another process
    write(rd / "pid", pair(p.sleeper()))


def _dead(rd: Path, p: Procs) -> None:
    gone = p.gone()
    write(rd / "wrapper", f"{gone.pid} 12345\n")
    write(rd / "pid", pair(p.sleeper(), off_by=-1))


def _exited(rd: Path, p: Procs) -> None:
    _dead(rd, p)
    write(rd / "exit", "3\n")
    write(rd / "note", "lease expired\nsecond line\n")


def _lost(rd: Path, p: Procs) -> None:
    _dead(rd, p)
    write(rd / "note", "wrapper vanished\n")
    write(rd / "exit", "lost\n")


def _exit_half_written(rd: Path, p: Procs) -> None:
    _running(rd, p)
    write(rd / "exit", "0")  # no newline yet: not an exit status


def _unstarted(rd: Path, p: Procs) -> None:
    write(rd / "meta", "task=7\n")
    age(rd, 60)


def _starting(rd: Path, p: Procs) -> None:
    write(rd / "meta", "task=7\n")  # just made: its wrapper may be on its way


CASES: dict[str, tuple[Setup, State]] = {
    "running": (_running, State.RUNNING),
    "orphaned": (_orphaned, State.ORPHANED),
    "dead": (_dead, State.DEAD),
    "exited": (_exited, State.EXITED),
    "lost": (_lost, State.LOST),
    "half-written exit": (_exit_half_written, State.RUNNING),
    "unstarted": (_unstarted, State.UNSTARTED),
    "starting": (_starting, State.RUNNING),
}


@pytest.mark.parametrize("case", list(CASES))
def test_status_script_and_local_facts_agree(tmp_path: Path, procs: Procs, case: str) -> None:
    setup, expected = CASES[case]
    rd = tmp_path / "runs" / "w1" / "run-1"
    rd.mkdir(parents=True)
    setup(rd, procs)
    remote = probe_sh(rd)[str(rd)]
    local = runfiles.decide(runfiles.local_facts(str(rd)))
    assert remote.state is expected, remote
    assert remote == local


def test_one_probe_many_directories(tmp_path: Path, procs: Procs) -> None:
    dirs = []
    for name, (setup, _) in CASES.items():
        rd = tmp_path / name.replace(" ", "-")
        rd.mkdir()
        setup(rd, procs)
        dirs.append(rd)
    missing = tmp_path / "no-such-run"
    found = probe_sh(*dirs, missing)
    assert [found[str(d)].state for d in dirs] == [expected for _, expected in CASES.values()]
    assert found[str(missing)].state is State.GONE
    exited = found[str(tmp_path / "exited")]
    assert exited.code == 3 and exited.note == "lease expired\nsecond line"
    assert found[str(tmp_path / "lost")].note == "wrapper vanished"
    assert found[str(tmp_path / "unstarted")].meta == {"task": "7"}
    running = found[str(tmp_path / "running")]
    pid, ticks = (tmp_path / "running" / "pid").read_text().split()
    assert (running.pid, running.start_ticks) == (int(pid), int(ticks))


@pytest.mark.anyio
async def test_local_host_probe_and_scan_read_the_same_rules(tmp_path: Path, procs: Procs) -> None:
    root = tmp_path / "shift"
    layout = {
        "w1/run-1": _exited,  # ended: not scanned
        "w1/run-2": _running,
        "w2/run-1": _dead,
        "deeper/m1/w3/run-4": _starting,
    }
    for name, setup in layout.items():
        (root / name).mkdir(parents=True)
        setup(root / name, procs)
    (root / "lease").write_text("")
    (root / "empty-dir").mkdir()
    host = LocalHost(use_inotify=False)
    with anyio.fail_after(10):
        scanned = await host.scan(str(root))
        probed = await host.probe([str(root / n) for n in layout])
    remote = run_script("scan", str(root))
    assert remote.returncode == 0
    expected = sorted(str(root / n) for n in layout if n != "w1/run-1")
    assert scanned == expected
    assert sorted(set(remote.stdout.decode().splitlines())) == expected
    assert probed == probe_sh(*(root / n for n in layout))


def test_signal_is_guarded_by_start_ticks(tmp_path: Path, procs: Procs) -> None:
    """A pid whose start time differs from the recorded one is never signalled: neither its
    group nor its session."""
    agent = procs.sleeper()
    pid, ticks = pair(agent).split()
    done = run_script("signal", pid, str(int(ticks) + 1), "KILL")
    assert done.returncode == 0
    time.sleep(0.3)
    assert agent.poll() is None, "a process with other start ticks was signalled"
    assert run_script("signal", pid, ticks, "TERM").returncode == 0
    assert agent.wait(timeout=10) == -signal.SIGTERM
    for bad in ("0", "1", "", "x"):
        assert run_script("signal", bad, "1", "KILL").returncode == 0


def test_signal_reaches_the_whole_tree(tmp_path: Path, procs: Procs) -> None:
    """The group, and what left the group but not the session."""
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 60 & (set -m; sleep 60 &) ; echo ready; wait"],
        start_new_session=True,
        stdout=subprocess.PIPE,
    )
    procs.started.append(leader)
    procs.watch_session(leader.pid)
    assert leader.stdout is not None and leader.stdout.readline() == b"ready\n"
    assert len(session_members(leader.pid)) == 3
    pid, ticks = pair(leader).split()
    assert run_script("signal", pid, ticks, "KILL").returncode == 0
    leader.wait(timeout=10)
    deadline = time.monotonic() + 5
    while session_members(leader.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session_members(leader.pid) == []


def test_end_lost_kills_what_is_left_and_records_the_end(tmp_path: Path, procs: Procs) -> None:
    rd = tmp_path / "run"
    rd.mkdir()
    _orphaned(rd, procs)
    agent = procs.started[-1]
    done = run_script("end-lost", str(rd), "found without its wrapper")
    assert done.returncode == 0, done.stderr
    assert agent.wait(timeout=10) == -signal.SIGKILL
    assert (rd / "exit").read_text() == "lost\n"
    assert (rd / "note").read_text() == "found without its wrapper\n"
    assert (rd / "exit").stat().st_mode & 0o777 == 0o600
    status = probe_sh(rd)[str(rd)]
    assert status.state is State.LOST and status.note == "found without its wrapper"
    # A run whose end is recorded keeps it.
    assert run_script("end-lost", str(rd), "again").returncode == 0
    assert (rd / "note").read_text() == "found without its wrapper\n"


def test_python_write_lost_matches_the_script(tmp_path: Path, procs: Procs) -> None:
    rd = tmp_path / "run"
    rd.mkdir()
    runfiles.write_lost(str(rd), "the wrapper vanished")
    runfiles.write_lost(str(rd), "twice")
    assert (rd / "exit").read_text() == "lost\n"
    assert (rd / "note").read_text() == "the wrapper vanished\n"
    assert probe_sh(rd)[str(rd)].state is State.LOST


def test_stop_watchdog_counts_a_dead_run_as_ended(tmp_path: Path, procs: Procs) -> None:
    """A registered run whose wrapper and agent are both gone without an exit status no
    longer keeps the lease's watchdogs: it is marked lost, and they are dismissed."""
    lease = tmp_path / "lease"
    dead, orphan = tmp_path / "run-1", tmp_path / "run-2"
    dead.mkdir()
    orphan.mkdir()
    _dead(dead, procs)
    _orphaned(orphan, procs)
    write(Path(f"{lease}.runs") / "11-1", f"{dead}\n")
    write(Path(f"{lease}.runs") / "12-1", f"{orphan}\n")
    dog = procs.sleeper()
    write(Path(f"{lease}.dog"), pair(dog))
    assert run_script("stop-watchdog", str(lease)).returncode == 0
    assert (dead / "exit").read_text() == "lost\n"
    assert dog.poll() is None, "an orphaned agent still lives: its watchdog must stay"
    assert not (orphan / "exit").exists()
    run_script("end-lost", str(orphan), "stopped by the next fleet")
    assert run_script("stop-watchdog", str(lease)).returncode == 0
    assert dog.wait(timeout=10) == -signal.SIGTERM


def test_an_unreadable_wrapper_file_is_a_wrapper_gone(tmp_path: Path, procs: Procs) -> None:
    """A complete `wrapper` line that names no process (an older format, a damaged file) means
    a wrapper ran: the run is judged by its agent, not taken for one still starting."""
    rd = tmp_path / "run"
    rd.mkdir()
    write(rd / "wrapper", "12345\n")
    write(rd / "pid", pair(procs.sleeper()))
    assert probe_sh(rd)[str(rd)].state is State.ORPHANED
    assert runfiles.decide(runfiles.local_facts(str(rd))).state is State.ORPHANED
