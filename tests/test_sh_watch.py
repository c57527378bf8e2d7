"""The machine's run watcher (``sh/watch.sh``) and the output fetch (``sh/fetch.sh``), run with
plain ``sh`` against local run directories, as an SSH channel runs them."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

from supervisor import sh
from supervisor.hosts import runfiles
from tests.sh_helpers import TIMEOUT, Procs, pair, procs_fixture, run_script, session_members

__all__ = ["procs_fixture"]  # the `procs` fixture


class Watcher:
    """``sh/watch.sh`` as the SSH host runs it (fast passes every 0.05 s, slow every 0.3 s after
    3 quiet ones, a heartbeat every 4 quiet passes, start ticks every 2 passes), in a session of
    its own; its stdin stays open until :meth:`leave`."""

    def __init__(self, procs: Procs, *run_dirs: Path, tmp: Path | None = None) -> None:
        env = {**os.environ, "TMPDIR": str(tmp)} if tmp is not None else None
        self.proc = subprocess.Popen(
            ["sh", "-c", sh.framed(sh.script("watch")), "sh", "0.05", "0.3", "3", "4", "2"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=env,
        )
        procs.watch_session(self.proc.pid)
        self.add(*run_dirs)
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def add(self, *run_dirs: Path) -> None:
        self.ask("".join(f"watch {d}\n" for d in run_dirs))

    def ask(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next_pass(self, timeout: float = 5.0) -> list[str]:
        """The lines of the next pass that printed a change (heartbeats skipped)."""
        got: list[str] = []
        end = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            text = line.decode().rstrip("\n")
            if text == "." and got:
                return got
            if text not in (".", sh.FRAME_MARK.decode().rstrip("\n")):
                got.append(text)

    def leave(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()


def live_run(rd: Path, procs: Procs, out: bytes = b"", err: bytes = b"") -> None:
    rd.mkdir(parents=True)
    (rd / "wrapper").write_text(pair(procs.sleeper()))
    (rd / "stdout").write_bytes(out)
    (rd / "stderr").write_bytes(err)


def test_the_watcher_reports_changes_only_and_ends_with_its_stdin(
    tmp_path: Path, procs: Procs
) -> None:
    r1, r2, r3 = tmp_path / "r1", tmp_path / "r2", tmp_path / "nothing"
    live_run(r1, procs)
    live_run(r2, procs, out=b"hi\n")
    watcher = Watcher(procs, r1, r2, r3)
    assert watcher.next_pass() == ["1 0 0 - 1", "2 3 0 - 1", "3 - - - 1"]
    with open(r1 / "stderr", "ab") as f:
        f.write(b"oops\n")
    assert watcher.next_pass() == ["1 0 5 - 1"]
    # Quiet: heartbeats only.
    time.sleep(1.0)
    assert all(line == b".\n" for line in list(watcher.lines.queue))
    # `exit` is looked at before the sizes: the line that shows it has the final sizes.
    with open(r2 / "stdout", "ab") as f:
        f.write(b"bye\n")
    (r2 / "exit").write_text("3\n")
    assert watcher.next_pass() == ["2 7 0 3 1"]
    # A wrapper gone is seen (an unfinished exit line is not an exit yet).
    wrapper = int((r1 / "wrapper").read_text().split()[0])
    os.kill(wrapper, signal.SIGKILL)
    (r1 / "exit").write_text("lo")
    assert watcher.next_pass() == ["1 0 5 - 0"]
    (r1 / "exit").write_text("lost\n")
    assert watcher.next_pass() == ["1 0 5 lost 0"]
    # The host closes the channel: the watcher ends, and everything it started.
    watcher.leave()
    assert watcher.proc.wait(timeout=TIMEOUT) == 0
    end = time.monotonic() + 5
    while session_members(watcher.proc.pid) and time.monotonic() < end:
        time.sleep(0.05)
    assert not session_members(watcher.proc.pid)
    assert watcher.proc.stderr is not None
    assert watcher.proc.stderr.read() == sh.FRAME_MARK


def test_runs_are_added_to_a_running_watcher_and_a_poke_looks_at_once(
    tmp_path: Path, procs: Procs
) -> None:
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    live_run(r1, procs)
    live_run(r2, procs, out=b"hi\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    watcher = Watcher(procs, r1, tmp=tmp)
    assert watcher.next_pass() == ["1 0 0 - 1"]
    assert list(tmp.iterdir()) == []  # its list of runs is open, and already unlinked
    time.sleep(1.0)  # slow passes by now (every 0.3 s)
    watcher.add(r2)
    assert watcher.next_pass(timeout=0.25) == ["2 3 0 - 1"]  # taken in at once
    time.sleep(1.0)
    (r1 / "exit").write_text("0\n")
    watcher.ask("poke\n")
    assert watcher.next_pass(timeout=0.25) == ["1 0 0 0 1"]
    # A signal to a run's tree (guarded by its start ticks), answered, and a pass at once.
    sleeper = procs.sleeper()
    time.sleep(1.0)
    watcher.ask(f"signal {sleeper.pid} {runfiles.read_start_ticks(sleeper.pid)} TERM\n")
    assert sleeper.wait(timeout=5) == -signal.SIGTERM
    watcher.leave()
    assert watcher.proc.wait(timeout=TIMEOUT) == 0
    assert watcher.proc.stderr is not None
    assert watcher.proc.stderr.read() == sh.FRAME_MARK + b"signalled\n"


def test_the_watcher_checks_start_ticks_not_only_the_pid(tmp_path: Path, procs: Procs) -> None:
    rd = tmp_path / "r1"
    live_run(rd, procs)
    impostor = procs.sleeper()
    (rd / "wrapper").write_text(pair(impostor, off_by=1))  # its pid lives, as another process
    watcher = Watcher(procs, rd)
    assert watcher.next_pass() == ["1 0 0 - 0"]
    watcher.leave()


def test_a_file_vanishing_under_the_watcher_ends_it_with_5(tmp_path: Path, procs: Procs) -> None:
    rd = tmp_path / "r1"
    live_run(rd, procs)
    watcher = Watcher(procs, rd)
    assert watcher.next_pass() == ["1 0 0 - 1"]
    (rd / "stderr").unlink()
    assert watcher.proc.wait(timeout=TIMEOUT) == 5
    watcher.leave()


def test_the_watcher_renews_and_fetches_on_its_stdin(tmp_path: Path, procs: Procs) -> None:
    """Its second process touches leases (never making one) and answers fetches on stderr,
    in order: no new login for either."""
    rd = tmp_path / "r1"
    live_run(rd, procs, out=b"0123456789" * 10)
    lease = rd / "lease"
    lease.write_text("")
    old = time.time() - 600
    os.utime(lease, (old, old))
    watcher = Watcher(procs, rd)
    assert watcher.next_pass() == ["1 100 0 - 1"]
    watcher.ask(
        f"lease {lease}\nlease {tmp_path / 'gone'}\nrenew\n"
        f"piece 95 10 {rd / 'stdout'}\npiece 0 10 {tmp_path / 'no such'}\nfetch\n"
        f"piece 0 3 {rd / 'stdout'}\nfetch\n"
    )
    watcher.leave()
    assert watcher.proc.wait(timeout=TIMEOUT) == 0
    assert watcher.proc.stderr is not None
    said = watcher.proc.stderr.read()
    assert said == sh.FRAME_MARK + (
        b"renewed\npieces\n100 5\n56789-1 0\nend\npieces\n100 3\n012end\n"
    )
    assert time.time() - lease.stat().st_mtime < 30
    assert not (tmp_path / "gone").exists()


def test_fetch_reads_pieces_with_their_lengths(tmp_path: Path) -> None:
    out = tmp_path / "stdout"
    out.write_bytes(b"".join(b"line %d\n" % i for i in range(1000)))
    err = tmp_path / "stderr"
    err.write_bytes(b"\x00\xffbinary\n")
    done = run_script(
        "fetch",
        *(str(out), "7", "20"),
        *(str(err), "0", "1000"),
        *(str(tmp_path / "missing"), "0", "10"),
        *(str(err), "100", "10"),
    )
    assert done.returncode == 0, done.stderr
    size = out.stat().st_size
    assert done.stdout == (
        f"{size} 20\n".encode() + out.read_bytes()[7:27]
        + b"9 9\n\x00\xffbinary\n"
        + b"-1 0\n"
        + b"9 0\n"
        + b"end\n"
    )  # fmt: skip
