"""Tests of ``agentize-fleet logs`` (logcmd.py, logreader.py): real processes, real files.

A real fleet (``agentize-fleet up -q``, the fake agent, a throw-away git repository) is followed
by several ``logs -f`` processes started while it runs; every follower must print exactly the
records of the final JSONL that its filters select, once each and in file order.  Rotation is
tested on a log written by hand, renamed under a running follower.  Every wait is bounded and
every process a test starts is killed, by pid, when it ends.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import make_origin, wait_for

from supervisor import logcmd, logreader
from supervisor.records import utc_timestamp

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "scripts" / "fake-agent"
MARK = "AGENTIZE_LOGS_TEST_MARK"  # not AGENTIZE_FLEET_*: that prefix is read as config
TIMEOUT = 30.0
FLEET_TIMEOUT = 120.0
RUN_ID = "20260101-000000-abcd"
Record = dict[str, Any]


# -- processes ------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GIT_", "FAKE_AGENT_", "AGENTIZE_", "XDG_")) and k != "NO_COLOR"
    }
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def logs_argv() -> list[str]:
    """``agentize-fleet logs`` once cli.py has it, else ``python -m supervisor.logcmd``."""
    from supervisor import cli

    with contextlib.suppress(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        args = cli.build_parser().parse_args(["logs", "--state-dir", "x"])
        if getattr(args, "func", None) is logcmd.cmd_logs:
            return [sys.executable, "-m", "supervisor.cli", "logs"]
    return [sys.executable, "-m", "supervisor.logcmd"]


def default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default, so that the Ctrl-C tests hold
    when the suite itself runs with SIGINT ignored (a background job: ``nohup ... &``), which
    a child would otherwise inherit and Python then leaves ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.popen.args} did not end within {timeout:g}s: {self.stderr()}")

    def stdout(self) -> bytes:
        return self.out.read_bytes()

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


@dataclass
class Procs:
    """Starts processes with their output in files; kills every one of them, by pid, at the end."""

    tmp: Path
    started: list[Proc] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(HOME=str(self.tmp), **{MARK: str(self.tmp)}, **extra)

    def start(self, argv: list[str], name: str, **env: str) -> Proc:
        out, err = self.tmp / f"{name}.stdout", self.tmp / f"{name}.stderr"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self.env(**env),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=default_sigint,
            )
        proc = Proc(popen, out, err)
        self.started.append(proc)
        return proc

    def logs(self, *args: str, name: str = "logs", **env: str) -> Proc:
        return self.start([*logs_argv(), *args], name, **env)

    def kill_all(self) -> None:
        for proc in self.started:
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=5)
        # Whatever they started (wrappers, agents) carries the mark in its environment.
        end = time.monotonic() + 5
        while time.monotonic() < end:
            found = []
            for p in psutil.process_iter(["pid", "environ", "status"]):
                with contextlib.suppress(psutil.Error):
                    environ = p.info.get("environ") or {}
                    if (
                        environ.get(MARK) == str(self.tmp)
                        and p.pid != os.getpid()
                        and (p.info["status"] != psutil.STATUS_ZOMBIE)
                    ):
                        found.append(p)
            if not found:
                return
            for p in found:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(found, timeout=1)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    started = Procs(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


def run_logs(
    *args: str, timeout: float = TIMEOUT, **env: str
) -> subprocess.CompletedProcess[bytes]:
    """``logs ARGS`` to its end (bounded)."""
    return subprocess.run(
        [*logs_argv(), *args],
        cwd=ROOT,
        env=clean_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def lines_of(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


def records_of(lines: list[bytes]) -> list[Record]:
    return [json.loads(line) for line in lines]


def assert_per_worker_order(records: list[Record]) -> None:
    seqs: dict[str, list[int]] = {}
    for record in records:
        seqs.setdefault(record["worker"], []).append(record["seq"])
    for worker, numbers in seqs.items():
        assert numbers == list(range(1, len(numbers) + 1)), f"{worker}: seq not gapless"


# -- a real fleet, followed while it runs -----------------------------------------------------


FLEET_TOML = """\
name = "logs-test"
repository = "{origin}"
workspace_root = "{workspaces}"
state_dir = "{state}"
concurrency = 3
start_interval = 0.1
stop_timeout = 5

[agent]
command = ["{agent}", "{{prompt}}"]
env = {{ FAKE_AGENT_STEPS = "200", FAKE_AGENT_STEP_DELAY = "0.005" }}

[restart]
backoff_base = 0.3
backoff_max = 0.5

[[tasks]]
issue = 1
env = {{ FAKE_AGENT_PLAN = "finish" }}

[[tasks]]
issue = 2
env = {{ FAKE_AGENT_PLAN = "milestone,finish" }}

[[tasks]]
issue = 3
env = {{ FAKE_AGENT_PLAN = "flood:20000" }}

[[tasks]]
issue = 4
env = {{ FAKE_AGENT_PLAN = "stderr+finish" }}

[[tasks]]
issue = 5
env = {{ FAKE_AGENT_PLAN = "crash:2,finish" }}
"""

# name -> the follower's filter options and the records they select
LIVE_FOLLOWERS: dict[str, tuple[list[str], Callable[[Record], bool]]] = {
    "all": ([], lambda r: True),
    "task": (["--task", "3"], lambda r: r["task"] == 3),
    "stream": (["--stream", "stderr"], lambda r: r["stream"] == "stderr"),
    "grep": (["--grep", r"^step 1\d\d/"], lambda r: re.search(r"^step 1\d\d/", r["line"])),
    "worker": (
        ["--worker", "w2", "--machine", "local"],
        lambda r: r["worker"] == "w2" and r["machine"] == "local",
    ),
    "tail": (["-n", "5", "--task", "1"], lambda r: r["task"] == 1),
}


@dataclass
class LiveFleet:
    config: Path
    state: Path
    run_dir: Path
    fleet_code: int
    followers: dict[str, Proc]
    rendered: Proc
    started_while_running: bool
    lines: list[bytes]
    records: list[Record]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    tmp = tmp_path_factory.mktemp("live")
    origin = make_origin(tmp / "origin")
    state = tmp / "state"
    config = tmp / "fleet.toml"
    config.write_text(
        FLEET_TOML.format(origin=origin, workspaces=tmp / "workspaces", state=state, agent=AGENT)
    )
    procs = Procs(tmp)
    try:
        up = procs.start(
            [sys.executable, "-m", "supervisor.cli", "up", "-c", str(config), "-q"], "up"
        )
        jsonl = wait_for(
            lambda: next(iter(state.glob("runs/*/fleet.jsonl")), None),
            TIMEOUT,
            "the fleet's JSONL",
            0.02,
        )
        run_dir = jsonl.parent
        followers = {
            name: procs.logs("-c", str(config), "-f", "--json", *args, name=f"follow-{name}")
            for name, (args, _) in LIVE_FOLLOWERS.items()
        }
        rendered = procs.logs("-c", str(config), "-f", name="follow-rendered", NO_COLOR="1")
        started_while_running = not (run_dir / "summary.json").exists()
        fleet_code = up.wait(FLEET_TIMEOUT)
        for proc in [*followers.values(), rendered]:
            proc.wait()
        lines = lines_of(jsonl.read_bytes())
        yield LiveFleet(
            config,
            state,
            run_dir,
            fleet_code,
            followers,
            rendered,
            started_while_running,
            lines,
            records_of(lines),
        )
    finally:
        procs.kill_all()


def test_follower_sees_every_record_of_a_running_fleet_once(live: LiveFleet) -> None:
    assert live.fleet_code == 0, live.followers["all"].stderr()
    assert live.started_while_running
    flood = [r for r in live.records if r["task"] == 3 and r["line"].startswith("w3 l")]
    assert len(flood) == 20000
    assert live.records[-1]["event"] == "fleet-ended"
    assert_per_worker_order(live.records)

    follower = live.followers["all"]
    assert follower.popen.returncode == 0
    assert follower.stderr() == ""
    # Byte for byte the final JSONL: every record once, in file (so per-worker seq) order.
    assert follower.stdout() == b"".join(live.lines)


@pytest.mark.parametrize("name", [n for n in LIVE_FOLLOWERS if n not in ("all", "tail")])
def test_filtered_follower_of_a_running_fleet(live: LiveFleet, name: str) -> None:
    _, select_ = LIVE_FOLLOWERS[name]
    follower = live.followers[name]
    assert follower.popen.returncode == 0, follower.stderr()
    expected = [line for line, r in zip(live.lines, live.records, strict=True) if select_(r)]
    assert expected
    assert lines_of(follower.stdout()) == expected


def test_tail_follower_of_a_running_fleet(live: LiveFleet) -> None:
    follower = live.followers["tail"]
    assert follower.popen.returncode == 0, follower.stderr()
    task1 = [line for line, r in zip(live.lines, live.records, strict=True) if r["task"] == 1]
    got = lines_of(follower.stdout())
    # It started with at most the last 5 of task 1 written by then, then followed to the end.
    assert got
    assert got == task1[len(task1) - len(got) :]
    assert got[-1] == task1[-1]


def test_rendered_follower_uses_the_live_views_prefixes(live: LiveFleet) -> None:
    assert live.rendered.popen.returncode == 0, live.rendered.stderr()
    bars = {"stdout": "│", "stderr": "┃", "fleet": "┆"}
    # The widest label of Fleet's live view: "w5 #N", 5 characters.
    expected = [
        f"{(r['worker'] + ' #' + str(r['task'])) if r['task'] is not None else r['worker']:<5} "
        f"{bars[r['stream']]} {r['line']}\n"
        for r in live.records
    ]
    got = live.rendered.stdout().decode()
    assert "\x1b[" not in got
    assert got.splitlines(keepends=True) == expected
    assert "w3 #3 │ w3 l000000000 xx" in got
    assert "w4 #4 ┃ step 1/200 (stderr)" in got


# -- filters on the finished run ------------------------------------------------------------------


FILTERS: list[tuple[list[str], Callable[[Record], bool]]] = [
    ([], lambda r: True),
    (["--task", "3"], lambda r: r["task"] == 3),
    (["--task", "1", "--task", "4"], lambda r: r["task"] in (1, 4)),
    (["--machine", "local"], lambda r: r["machine"] == "local"),
    (["--machine", "-"], lambda r: r["machine"] == "-"),
    (["--stream", "stderr"], lambda r: r["stream"] == "stderr"),
    (["--stream", "stdout", "--stream", "fleet"], lambda r: r["stream"] != "stderr"),
    (["--grep", r"^step 1\d\d/"], lambda r: re.search(r"^step 1\d\d/", r["line"])),
    (["--grep", "milestone"], lambda r: "milestone" in r["line"]),
    (["--worker", "w2"], lambda r: r["worker"] == "w2"),
    (["--worker", "fleet"], lambda r: r["worker"] == "fleet"),
    (["--task", "2", "--stream", "fleet"], lambda r: r["task"] == 2 and r["stream"] == "fleet"),
    (["--since", "1h"], lambda r: True),
    (["--since", "2999-01-01T00:00:00Z"], lambda r: False),
    (["--since", "1999-01-01"], lambda r: True),
]


def _filter_id(value: object) -> str | None:
    return " ".join(value) or "no filter" if isinstance(value, list) else None


@pytest.mark.parametrize(("args", "select_"), FILTERS, ids=_filter_id)
def test_filter_on_a_finished_run(
    live: LiveFleet, args: list[str], select_: Callable[[Record], bool]
) -> None:
    done = run_logs("-c", str(live.config), "--json", *args)
    assert done.returncode == 0, done.stderr
    expected = [line for line, r in zip(live.lines, live.records, strict=True) if select_(r)]
    assert lines_of(done.stdout) == expected
    assert done.stderr == b""


def test_since_an_iso_time(live: LiveFleet) -> None:
    middle = live.records[len(live.records) // 2]["ts"]
    expected = [line for line, r in zip(live.lines, live.records, strict=True) if r["ts"] >= middle]
    for when in (middle, middle.replace("Z", "+00:00")):
        done = run_logs("--state-dir", str(live.state), "--json", "--since", when)
        assert done.returncode == 0, done.stderr
        assert lines_of(done.stdout) == expected
        assert 0 < len(expected) < len(live.lines)


@pytest.mark.parametrize(
    ("args", "select_", "count"),
    [
        (["-n", "7"], lambda r: True, 7),
        (["-n", "0"], lambda r: True, 0),
        (["--tail", "5", "--task", "2"], lambda r: r["task"] == 2, 5),
        (
            ["-n", "3", "--stream", "stderr", "--grep", "step"],
            lambda r: r["stream"] == "stderr" and "step" in r["line"],
            3,
        ),
        (["-n", "1000000"], lambda r: True, 1000000),
    ],
)
def test_last_n(
    live: LiveFleet, args: list[str], select_: Callable[[Record], bool], count: int
) -> None:
    done = run_logs("-c", str(live.config), "--json", *args)
    assert done.returncode == 0, done.stderr
    selected = [line for line, r in zip(live.lines, live.records, strict=True) if select_(r)]
    assert lines_of(done.stdout) == (selected[-count:] if count else [])


def test_run_by_prefix_and_follow_of_an_ended_run(live: LiveFleet) -> None:
    prefix = live.run_dir.name[:-2]
    start = time.monotonic()
    done = run_logs("--state-dir", str(live.state), "--run", prefix, "-f", "-n", "3", "--json")
    assert done.returncode == 0, done.stderr
    assert lines_of(done.stdout) == live.lines[-3:]
    # fleet-ended is in the log: -f ends at once (not after the summary's grace period).
    assert time.monotonic() - start < logreader.SUMMARY_GRACE + 5


# -- rotation, on a log written by hand -----------------------------------------------------------


class HandLog:
    """A run directory whose fleet.jsonl the test writes record by record."""

    def __init__(self, state: Path, run_id: str = RUN_ID) -> None:
        self.run_dir = state / "runs" / run_id
        self.run_dir.mkdir(parents=True)
        self.path = self.run_dir / "fleet.jsonl"
        self.written: list[bytes] = []
        self.seq: dict[str, int] = {}
        self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115

    def record(self, worker: str, line: str, stream: str = "stdout", **extra: Any) -> bytes:
        self.seq[worker] = self.seq.get(worker, 0) + 1
        task = None if worker == "fleet" else int(worker[1:])
        data: Record = {
            "ts": "2026-01-01T00:00:00.000Z",
            "fleet": RUN_ID,
            "worker": worker,
            "task": task,
            "machine": "local" if task else "-",
            "run": 1,
            "stream": stream,
            "seq": self.seq[worker],
            "line": line,
            **extra,
        }
        return (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    def write(self, count: int, *, tag: str = "") -> None:
        for i in range(count):
            worker = f"w{i % 3 + 1}"
            raw = self.record(worker, f"{tag} line {i} ünïcode")
            self.file.write(raw)
            self.written.append(raw)

    def write_raw(self, raw: bytes) -> None:
        self.file.write(raw)

    def rotate(self, n: int, *, create: bool = True) -> None:
        os.rename(self.path, self.path.with_name(f"fleet.jsonl.{n}"))
        if create:
            self.reopen()

    def reopen(self) -> None:
        self.file.close()
        self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115

    def end(self) -> None:
        raw = self.record("fleet", "fleet ended: exit 0", "fleet", event="fleet-ended")
        self.file.write(raw)
        self.written.append(raw)
        self.file.close()


def count_lines(proc: Proc) -> int:
    return proc.stdout().count(b"\n")


def test_follow_across_rotation(tmp_path: Path, procs: Procs) -> None:
    state = tmp_path / "state"
    log = HandLog(state)
    log.write(100, tag="a")
    # A record being written: held back until its newline arrives.
    partial = log.record("w1", "split across writes")
    log.write_raw(partial[:30])
    follower = procs.logs("--state-dir", str(state), "-f", "--json", name="rotation")
    wait_for(lambda: count_lines(follower) >= 100, TIMEOUT, "the first 100 records", 0.02)
    time.sleep(0.3)
    assert follower.stdout() == b"".join(log.written)
    log.write_raw(partial[30:])
    log.written.append(partial)
    # An agent printing what looks like the end of the fleet does not end the follower.
    lookalike = log.record("w2", '{"event": "fleet-ended"} fleet-ended')
    log.write_raw(lookalike)
    log.written.append(lookalike)
    # Records the follower has not read yet when the file is renamed, then more written to the
    # old file after the rename (before the new file exists), then the new file.
    log.write(500, tag="b")
    log.rotate(1, create=False)
    log.write(20, tag="b2")
    time.sleep(0.3)
    log.reopen()
    log.write(50, tag="c")
    wait_for(
        lambda: count_lines(follower) >= len(log.written),
        TIMEOUT,
        "the records after rotation 1",
        0.02,
    )
    # Second rotation, and a moment with no fleet.jsonl at all.
    log.write(10, tag="d")
    log.rotate(2, create=False)
    time.sleep(0.3)
    log.reopen()
    log.write(3, tag="e")
    assert follower.popen.poll() is None  # still following: the fleet has not ended
    log.end()
    assert follower.wait(10) == 0, follower.stderr()
    assert follower.stderr() == ""
    got = lines_of(follower.stdout())
    assert got == log.written
    assert_per_worker_order([r for r in records_of(got) if r["worker"] != "fleet"])

    # Read again after the fact: segments .1, .2, then fleet.jsonl, in that order.
    done = run_logs("--state-dir", str(state), "--json")
    assert done.returncode == 0, done.stderr
    assert lines_of(done.stdout) == log.written
    # -n reaches back across segments: the last 6 are 2 of fleet.jsonl.2 and 4 of fleet.jsonl.
    done = run_logs("--state-dir", str(state), "--json", "-n", "6")
    assert lines_of(done.stdout) == log.written[-6:]
    done = run_logs("--state-dir", str(state), "--json", "-n", "600", "--worker", "w2")
    w2 = [line for line in log.written if b'"worker":"w2"' in line]
    assert lines_of(done.stdout) == w2[-600:]


def test_follow_starting_between_rotations(tmp_path: Path, procs: Procs) -> None:
    """Segments already there when the follower starts (-n reaches into them), then one more."""
    state = tmp_path / "state"
    log = HandLog(state)
    log.write(30, tag="a")
    log.rotate(1)
    log.write(30, tag="b")
    log.rotate(2)
    log.write(30, tag="c")
    follower = procs.logs("--state-dir", str(state), "-f", "--json", "-n", "40", name="between")
    wait_for(lambda: count_lines(follower) >= 40, TIMEOUT, "the last 40 records", 0.02)
    log.rotate(3)
    log.write(5, tag="d")
    log.end()
    assert follower.wait(10) == 0, follower.stderr()
    assert lines_of(follower.stdout()) == log.written[-46:]


def test_lines_backwards_and_partial_lines_with_tiny_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block boundaries everywhere: the reader with 7-byte blocks."""
    monkeypatch.setattr(logreader, "BLOCK", 7)
    log = HandLog(tmp_path)
    log.write(40, tag="x")
    log.rotate(1)
    log.write(25, tag="y")
    log.write_raw(b'{"partial": ')
    for count in (0, 1, 2, 24, 25, 26, 64, 65, 66, 1000):
        reader = logreader.LogReader(log.run_dir)
        out: list[bytes] = []
        try:
            reader.start_at_last(count, None)
            reader.pump(out.append)
        finally:
            reader.close()
        assert lines_of(b"".join(out)) == (log.written[-count:] if count else []), count
    fd = os.open(log.path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        lines = list(logreader._lines_backwards(fd, size, keep_partial=True))
        complete = list(logreader._lines_backwards(fd, size, keep_partial=False))
    finally:
        os.close(fd)
    assert lines[1:] == complete
    assert lines[0][1] == b'{"partial": '
    assert [line + b"\n" for _, line in lines[1:]] == log.written[-25:][::-1]


# -- rendering and colour -------------------------------------------------------------------------


def test_plain_prefixes(tmp_path: Path) -> None:
    log = HandLog(tmp_path / "state")
    log.file.write(log.record("fleet", "fleet started", "fleet", event="fleet-started"))
    log.file.write(log.record("w1", "hello"))
    log.file.write(log.record("w1", "oops", "stderr"))
    log.file.write(log.record("w12", "bye"))
    log.end()
    done = run_logs("--state-dir", str(tmp_path / "state"), NO_COLOR="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == (
        "fleet ┆ fleet started\n"
        "w1 #1 │ hello\n"
        "w1 #1 ┃ oops\n"
        "w12 #12 │ bye\n"
        "fleet ┆ fleet ended: exit 0\n"
    )


def run_on_tty(argv: list[str], env: dict[str, str]) -> bytes:
    """Run ``argv`` with its stdout on a pseudo-terminal; return what it printed."""
    master, slave = pty.openpty()
    try:
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        os.close(slave)
        slave = -1
        out = b""
        end = time.monotonic() + TIMEOUT
        try:
            while time.monotonic() < end:
                ready, _, _ = select.select([master], [], [], 0.1)
                if ready:
                    try:
                        data = os.read(master, 65536)
                    except OSError:  # EIO: the child closed the terminal
                        break
                    if not data:
                        break
                    out += data
                elif popen.poll() is not None:
                    break
            assert popen.wait(timeout=TIMEOUT) == 0
        finally:
            if popen.poll() is None:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(timeout=5)
            assert popen.stderr is not None
            popen.stderr.close()
        return out
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_colour_only_on_a_terminal_and_not_with_no_color(tmp_path: Path) -> None:
    log = HandLog(tmp_path / "state")
    log.write(3)
    log.end()
    argv = [*logs_argv(), "--state-dir", str(tmp_path / "state")]
    coloured = run_on_tty(argv, clean_env())
    assert b"\x1b[" in coloured
    assert b"w1 #1 \xe2\x94\x82 \x1b[0m" in coloured  # the bar inside the coloured prefix
    assert b"\x1b[" not in run_on_tty(argv, clean_env(NO_COLOR="1"))
    assert b"\x1b[" not in run_on_tty([*argv, "--no-colour"], clean_env())
    assert b"\x1b[" not in run_logs("--state-dir", str(tmp_path / "state")).stdout


# -- how -f ends ----------------------------------------------------------------------------------


def test_ctrl_c_ends_quietly_with_130(tmp_path: Path, procs: Procs) -> None:
    log = HandLog(tmp_path / "state")
    log.write(10)
    follower = procs.logs("--state-dir", str(tmp_path / "state"), "-f", name="ctrl-c")
    wait_for(lambda: count_lines(follower) >= 10, TIMEOUT, "the records", 0.02)
    os.kill(follower.popen.pid, signal.SIGINT)
    assert follower.wait(10) == 130
    assert follower.stderr() == ""


def test_summary_without_fleet_ended_ends_after_a_grace(tmp_path: Path, procs: Procs) -> None:
    log = HandLog(tmp_path / "state")
    log.write(10)
    follower = procs.logs("--state-dir", str(tmp_path / "state"), "-f", "--json", name="grace")
    wait_for(lambda: count_lines(follower) >= 10, TIMEOUT, "the records", 0.02)
    time.sleep(0.5)
    assert follower.popen.poll() is None
    (log.run_dir / "summary.json").write_text("{}\n")
    log.write(2)
    assert follower.wait(logreader.SUMMARY_GRACE + 10) == 0
    assert lines_of(follower.stdout()) == log.written


def dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=TIMEOUT)
    return gone.pid


def test_follow_ends_when_the_supervisor_is_gone(tmp_path: Path, procs: Procs) -> None:
    log = HandLog(tmp_path / "state")
    log.write(5)
    me = psutil.Process()
    states = {
        "alive": {"pid": me.pid, "started_at": time.time()},
        "dead": {"pid": dead_pid(), "started_at": time.time()},
        # A live process started after the fleet: the fleet's pid was reused.
        "reused": {"pid": me.pid, "started_at": me.create_time() - 100},
    }
    for name, state in states.items():
        (log.run_dir / "state.json").write_text(json.dumps(state))
        follow_until_gone(procs, log, name, state["pid"] if name != "alive" else None)


def follow_until_gone(procs: Procs, log: HandLog, name: str, gone: int | None) -> None:
    """``logs -f`` of ``log``'s shift: it goes on while the supervisor lives (``gone`` None),
    and ends saying so once it is gone (``gone``: its pid)."""
    follower = procs.logs("--state-dir", str(log.run_dir.parent.parent), "-f", "--json", name=name)
    if gone is None:
        time.sleep(logreader.LIVENESS_INTERVAL * 2 + 0.5)
        assert follower.popen.poll() is None
        os.kill(follower.popen.pid, signal.SIGINT)
        assert follower.wait(10) == 130
    else:
        assert follower.wait(logreader.LIVENESS_INTERVAL + 10) == 0
        assert f"supervisor (pid {gone}) is gone" in follower.stderr()
        assert follower.stderr().count("\n") == 1
    assert lines_of(follower.stdout()) == log.written


# -- errors -------------------------------------------------------------------------------------


def test_errors_are_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "runs").mkdir(parents=True)
    config = tmp_path / "fleet.toml"
    config.write_text(f'repository = "/nowhere"\nstate_dir = "{state}"\n')
    cases: list[tuple[list[str], int, str]] = [
        (["--state-dir", str(state)], 3, "no shift found"),
        (["-c", str(config), "-f"], 3, "no shift found"),
        (["-c", str(tmp_path / "missing.toml")], 2, "does not exist"),
    ]
    for args, code, message in cases:
        done = run_logs(*args)
        assert (done.returncode, done.stdout) == (code, b""), args
        err = done.stderr.decode()
        assert err.startswith("agentize-fleet: error: ") and message in err, err
        assert err.count("\n") == 1, err
    HandLog(state, "20260101-000000-aaaa").end()
    HandLog(state, "20260101-000000-aaab").end()
    cases = [
        (["--run", "20270101"], 2, "no shift '20270101'"),
        (["--shift", "20270101"], 2, "no shift '20270101'"),
        (["--run", "20260101-000000-aa"], 2, "ambiguous"),
        (["--since", "yesterday"], 2, "--since 'yesterday'"),
        (["--grep", "(unclosed"], 2, "not a valid regular expression"),
    ]
    for args, code, message in cases:
        done = run_logs("--state-dir", str(state), *args)
        assert (done.returncode, done.stdout) == (code, b""), args
        err = done.stderr.decode()
        assert err.startswith("agentize-fleet: error: ") and message in err, err
        assert err.count("\n") == 1, err
        assert "Traceback" not in err
    done = run_logs("--state-dir", str(state), "--run", "20260101-000000-aaab", "--json")
    assert done.returncode == 0
    assert json.loads(done.stdout)["fleet"] == RUN_ID


def test_parse_since() -> None:
    now = 1_800_000_000.0
    assert logcmd.parse_since("10m", now) == utc_timestamp(now - 600)
    assert logcmd.parse_since("1h30m", now) == utc_timestamp(now - 5400)
    assert logcmd.parse_since("30", now) == utc_timestamp(now - 30)
    assert logcmd.parse_since("2026-11-28T07:05:00Z") == "2026-11-28T07:05:00.000Z"
    assert logcmd.parse_since("2026-11-28T09:05:00+02:00") == "2026-11-28T07:05:00.000Z"
    with pytest.raises(logreader.LogsError):
        logcmd.parse_since("10 minutes")


# -- shift.json (written once at a shift's start) before state.json ---------------------------


def start_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def test_follow_ends_when_the_supervisor_named_in_shift_json_is_gone(
    tmp_path: Path, procs: Procs
) -> None:
    """The supervisor is named by pid and start ticks (a reused pid has other ticks); a
    ``state.json`` that says otherwise is what older shifts wrote, and shift.json wins."""
    import socket

    log = HandLog(tmp_path / "state")
    log.write(5)
    me = os.getpid()
    host = socket.gethostname()
    base = {"id": RUN_ID, "host": host, "started_at": time.time(), "config": {}}
    shifts = {
        "alive": {**base, "pid": me, "pid_ticks": start_ticks(me)},
        "dead": {**base, "pid": dead_pid(), "pid_ticks": 1},
        "reused": {**base, "pid": me, "pid_ticks": start_ticks(me) + 1},
    }
    # What an old writer left: a live supervisor where shift.json says dead, and vice versa.
    (log.run_dir / "state.json").write_text(json.dumps({"pid": dead_pid(), "started_at": 0}))
    for name, shift in shifts.items():
        if name != "alive":
            (log.run_dir / "state.json").write_text(
                json.dumps({"pid": me, "started_at": time.time()})
            )
        (log.run_dir / "shift.json").write_text(json.dumps(shift))
        gone = shift["pid"] if name != "alive" else None
        follow_until_gone(procs, log, f"shift-{name}", gone)  # type: ignore[arg-type]


def test_shift_info_from_shift_json_or_state_json(tmp_path: Path) -> None:
    run_dir = tmp_path / "shift"
    run_dir.mkdir()
    assert logreader.ShiftInfo.read(run_dir) == logreader.ShiftInfo()
    (run_dir / "state.json").write_text(
        json.dumps(
            {
                "pid": 12,
                "started_at": 5.0,
                "workers": [{"worker": "w1", "task": 3, "machine": "box"}],
            }
        )
    )
    old = logreader.ShiftInfo.read(run_dir)
    assert (old.pid, old.pid_ticks, old.workers, old.machines) == (
        12,
        None,
        (("w1", 3, "box"),),
        frozenset({"box"}),
    )
    (run_dir / "shift.json").write_text(
        json.dumps(
            {
                "id": "x",
                "pid": 34,
                "pid_ticks": 777,
                "host": "h",
                "started_at": 6.0,
                "config": {
                    "tasks": {"items": [{"issue": 1}, {"issue": 30}]},
                    "machines": [{"name": "gpu"}],
                },
            }
        )
    )
    new = logreader.ShiftInfo.read(run_dir)
    assert (new.pid, new.pid_ticks, new.host, new.started_at) == (34, 777, "h", 6.0)
    assert new.workers == (("w1", 1, None), ("w2", 30, None))
    assert new.machines == frozenset({"gpu"})
    # The summary of an ended shift lists every worker, the added ones too.
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "workers": [
                    {"worker": "w1", "task": 1},
                    {"worker": "w2", "task": 30},
                    {"worker": "w3", "task": 57, "machine": "gpu"},
                ]
            }
        )
    )
    assert [w for w, _, _ in logreader.ShiftInfo.read(run_dir).workers] == ["w1", "w2", "w3"]
