"""agentize-fleet against honcho and supervisord: log throughput, restart latency, idle overhead,
scale (issue 6).  Run it through ``scripts/bench``, which makes the environments first.

Every workload runs the same program under every peer (``bench/workloads/``), in the same run,
and is timed from outside.  The results are printed as a table and written between the markers
of ``bench/RESULTS.md`` (the text outside the markers is kept: it holds the analysis).

Peers:
  agentize-fleet  ``.venv/bin/agentize-fleet up -c GENERATED.toml -q`` (console off); its sink is
                  the run's ``fleet.jsonl``
  honcho          ``honcho -f Procfile start`` with its standard output redirected to a file
  supervisord     ``supervisord -n -c GENERATED.conf``: one log file per program, no rotation
  reference       no supervisor: the processes write straight to files (throughput), or a bare
                  Python loop / pool starts them (restart, scale)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENVS = BENCH / ".venvs"
WORKLOADS = BENCH / "workloads"
RESULTS = BENCH / "RESULTS.md"
PROFILES = BENCH / "profiles"
FLEET = ROOT / ".venv" / "bin" / "agentize-fleet"
FLEET_PY = ROOT / ".venv" / "bin" / "python"
HONCHO = VENVS / "honcho" / "bin" / "honcho"
SUPERVISORD = VENVS / "supervisord" / "bin" / "supervisord"
# The workloads run on the bare interpreter with -S: no site, no venv, ~10 ms to start.
PY = os.path.realpath(sys.executable)
SLEEP_ARG = "86399"  # `sleep 86399`: the idle agent, told apart from the wrappers' `sleep 20`
BEGIN = "<!-- bench:begin (written by scripts/bench; edit outside the markers) -->"
END = "<!-- bench:end -->"

AF, HONCHO_, SD, REF = "agentize-fleet", "honcho", "supervisord", "reference"
PEERS = (AF, HONCHO_, SD, REF)


class BenchError(Exception):
    pass


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- sizes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    lines: int = 250_000
    # (processes, lines per write): one write per line is the issue's workload (its reference
    # figure, ~1 s straight to files, is that of line-by-line writes); 655 lines per write is a
    # program buffering its output in 65,500-byte blocks, the best case for a raw byte copier.
    floods: tuple[tuple[int, int], ...] = ((4, 1), (16, 1), (4, 655))
    restarts: int = 200
    sd_restarts: int = 25  # supervisord restarts once a second: 200 would take 220 s
    # honcho passes ~25,000-50,000 lines/s whatever the writes: it runs a tenth of the lines
    # where the full size would take minutes (16 processes) or repeat a figure (block writes)
    honcho_lines: tuple[tuple[tuple[int, int], int], ...] = (((16, 1), 25_000), ((4, 655), 25_000))
    idle: tuple[int, ...] = (50, 200)
    idle_seconds: float = 30.0
    idle_settle: float = 2.0
    scale_tasks: int = 1000
    scale_cap: int = 16
    scale_agent: float = 0.05
    ssh_procs: int = 4
    ssh_lines: int = 250_000
    ssh_idle: int = 50
    ssh_cuts: int = 5


FULL = Sizes()
QUICK = Sizes(
    lines=25_000,
    restarts=20,
    sd_restarts=3,
    honcho_lines=(((16, 1), 2_500), ((4, 655), 2_500)),
    idle=(5, 20),
    idle_seconds=4.0,
    idle_settle=1.0,
    scale_tasks=100,
    ssh_lines=25_000,
    ssh_idle=10,
    ssh_cuts=2,
)


# -- processes -----------------------------------------------------------------------------


class CpuGroup:
    """A cgroup that accounts, in nanoseconds, the CPU of every process ever in it (exited ones
    too): the only exact way to count short-lived helpers such as the run wrappers' watchdog
    ``sleep``/``date``/``stat``, which per-process tick counters (10 ms) round to nothing.
    cgroup v1 ``cpuacct`` or v2 ``cpu.stat``; None when neither can be made (not root, ...)."""

    def __init__(self, path: Path, v2: bool) -> None:
        self.path, self.v2 = path, v2

    @classmethod
    def make(cls, name: str) -> CpuGroup | None:
        leaf = f"agentize-bench-{os.getpid()}-{name}"
        for base, v2 in (
            (Path("/sys/fs/cgroup/cpuacct"), False),
            (Path("/sys/fs/cgroup"), True),
            (Path("/sys/fs/cgroup/unified"), True),
        ):
            probe = base / ("cpu.stat" if v2 else "cpuacct.usage")
            if not probe.exists():
                continue
            try:
                (base / leaf).mkdir()
            except OSError:
                continue
            group = cls(base / leaf, v2)
            if group.usage() is not None:
                return group
            group.remove()
        return None

    def usage(self) -> float | None:
        """CPU seconds used by everything that ran in the group so far."""
        try:
            if self.v2:
                for line in (self.path / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
                return None
            return int((self.path / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return None

    def join(self) -> None:
        """Move the calling process in (called in the child, before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # the last processes are still being reaped


class Spawned:
    """A process we started, in a session of its own; everything under it is killed at the end."""

    def __init__(
        self,
        argv: list[str],
        *,
        cwd: Path,
        stdout: Path | None = None,
        env: dict[str, str] | None = None,
        group: CpuGroup | None = None,
    ) -> None:
        self.argv = argv
        self.launched = time.time()
        out = open(stdout, "wb") if stdout else subprocess.DEVNULL  # noqa: SIM115
        err = subprocess.STDOUT if stdout else subprocess.DEVNULL
        try:
            self.popen = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
                preexec_fn=group.join if group else None,
            )
        finally:
            if stdout:
                out.close()  # type: ignore[union-attr]
        self.pid = self.popen.pid
        self.proc = psutil.Process(self.pid)
        self._seen: dict[int, psutil.Process] = {}

    def descendants(self) -> list[psutil.Process]:
        try:
            kids = self.proc.children(recursive=True)
        except psutil.Error:
            kids = []
        for kid in kids:
            self._seen.setdefault(kid.pid, kid)
        return kids

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self, timeout: float = 20.0) -> None:
        self.descendants()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            self.wait(timeout)

    def kill_all(self) -> None:
        """SIGKILL the process and every descendant ever seen (pid reuse checked by psutil)."""
        self.descendants()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        for proc in self._seen.values():
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    proc.kill()
        self.popen.wait()


def cpu_of(procs: Iterable[psutil.Process], *, children: bool = False) -> float:
    """user + system seconds of ``procs`` (with their reaped children's when asked)."""
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
            if children:
                total += t.children_user + t.children_system
    return total


def cpu_exact(procs: Iterable[psutil.Process]) -> float:
    """CPU seconds of ``procs`` to the nanosecond: the sum of their live threads' run time
    (/proc/PID/task/TID/schedstat), where psutil's counters have 10 ms ticks."""
    total = 0.0
    for proc in procs:
        try:
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                with open(f"/proc/{proc.pid}/task/{tid}/schedstat") as fh:
                    total += int(fh.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            total += cpu_of([proc])
    return total


def status_kib(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmd_has(proc: psutil.Process, text: str) -> bool:
    try:
        return any(text in part for part in proc.cmdline())
    except psutil.Error:
        return False


def read_records(path: Path) -> list[list[str]]:
    try:
        return [line.split() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


# -- configs for each peer -------------------------------------------------------------------


def toml_str(value: str) -> str:
    return json.dumps(value)


def origin_for(work: Path) -> Path:
    """The throw-away repository made by :func:`make_origin` in the run's directory."""
    return next(p / "origin" for p in work.parents if (p / "origin" / ".git").is_dir())


def fleet_config(
    path: Path,
    work: Path,
    command: list[str],
    tasks: int,
    *,
    cap: int,
    restart: dict[str, float] | None = None,
    lease_timeout: float = 60.0,
    clones: int = 1,
) -> Path:
    lines = [
        'name = "bench"',
        f"repository = {toml_str(str(origin_for(work)))}",
        f"workspace_root = {toml_str(str(work / 'ws'))}",
        f"state_dir = {toml_str(str(work / 'state'))}",
        f"concurrency = {cap}",
        "start_interval = 0",
        "stop_timeout = 5",
        "log_rotate_bytes = 0",  # as supervisord's stdout_logfile_maxbytes=0
        f"lease_timeout = {lease_timeout:g}",
        f"clones_per_machine = {clones}",
        "",
        "[agent]",
        "command = [" + ", ".join(toml_str(a) for a in command) + "]",
        "",
        "[restart]",
    ]
    for key, value in (restart or {}).items():
        lines.append(f"{key} = {value!r}")
    lines += ["", "[local]", f"max_agents = {cap}", ""]
    for issue in range(1, tasks + 1):
        lines += ["[[tasks]]", f"issue = {issue}", ""]
    path.write_text("\n".join(lines))
    return path


def supervisord_config(path: Path, work: Path, programs: dict[str, str], **extra: str) -> Path:
    text = [
        "[supervisord]",
        "nodaemon=true",
        f"logfile={work / 'supervisord.log'}",
        "logfile_maxbytes=0",
        f"pidfile={work / 'supervisord.pid'}",
        f"childlogdir={work}",
        "minfds=8192",
        "",
    ]
    for name, command in programs.items():
        text += [
            f"[program:{name}]",
            f"command={command}",
            f"directory={work}",
            "autostart=true",
            "startsecs=0",
            f"stdout_logfile={work / (name + '.out')}",
            "stdout_logfile_maxbytes=0",
            "stdout_logfile_backups=0",
            f"stderr_logfile={work / (name + '.err')}",
            "stderr_logfile_maxbytes=0",
            "stderr_logfile_backups=0",
        ]
        text += [f"{k}={v}" for k, v in extra.items()]
        text.append("")
    path.write_text("\n".join(text))
    return path


def procfile(path: Path, programs: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}: exec {command}\n" for name, command in programs.items()))
    return path


def fleet_jsonl(work: Path) -> Path | None:
    found = sorted((work / "state" / "runs").glob("*/fleet.jsonl"))
    return found[-1] if found else None


def fleet_segments(work: Path) -> list[Path]:
    """The run's JSONL files in record order: rotated segments (``.1``, ``.2``, ...) first."""
    path = fleet_jsonl(work)
    if path is None:
        return []
    rotated = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
    return [*sorted(rotated, key=lambda p: int(p.suffix[1:])), path]


def read_all(paths: list[Path]) -> bytes:
    return b"".join(p.read_bytes() for p in paths if p.exists())


def profile_header(name: str) -> str:
    commit, dirty = code_state()
    return (
        f"# scripts/bench --profile, commit {commit}"
        f"{' + uncommitted changes in supervisor/' if dirty else ''}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}: agentize-fleet `up` on the {name} workload under "
        "pyinstrument (1 ms samples, wall time of the main thread: time in `select` is the "
        "loop waiting)"
    )


def fleet_argv(config: Path, profile: Path | None = None, *extra: str) -> list[str]:
    if profile is not None:
        return [
            str(FLEET_PY),
            str(BENCH / "profile_up.py"),
            str(profile),
            profile_header(profile.stem),
            "up",
            "-c",
            str(config),
            "-q",
            *extra,
        ]
    return [str(FLEET), "up", "-c", str(config), "-q", *extra]


def jsonl_events(work: Path) -> list[dict[str, Any]]:
    """The ``fleet`` records of a run's JSONL log (agent lines skipped without parsing them)."""
    events = []
    data = read_all(fleet_segments(work))
    at = data.find(b'"stream":"fleet"')
    while at >= 0:
        start = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at)
        end = len(data) if end < 0 else end
        events.append(json.loads(data[start:end]))
        at = data.find(b'"stream":"fleet"', end)
    return events


def iso_epoch(ts: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


# -- 1. log throughput -----------------------------------------------------------------------


@dataclass
class Throughput:
    peer: str
    procs: int
    lines: int
    launched: float = 0.0
    first_start: float = 0.0
    last_line: float = 0.0
    arrived: int = 0
    in_order: bool = False
    sup_cpu: float | None = None
    up_wall: float | None = None
    shutdown: float | None = None
    jsonl_span: float | None = None
    agents_cpu: float | None = None

    @property
    def expected(self) -> int:
        return self.procs * self.lines

    @property
    def run_seconds(self) -> float:
        return self.last_line - self.first_start

    @property
    def wall_seconds(self) -> float:
        return self.last_line - self.launched

    @property
    def rate(self) -> float:
        return self.expected / self.run_seconds if self.run_seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.arrived == self.expected and self.in_order


def expected_lines(ident: int, lines: int) -> bytes:
    head = f"w{ident} l"
    tail = b"x" * (99 - len(head) - 10) + b"\n"
    return b"".join(f"{head}{i:09d} ".encode() + tail for i in range(lines))


_EXPECTED: dict[tuple[int, int], bytes] = {}


def expected_cached(ident: int, lines: int) -> bytes:
    key = (ident, lines)
    if key not in _EXPECTED:
        _EXPECTED[key] = expected_lines(ident, lines)
    return _EXPECTED[key]


_INDEXES: dict[int, list[bytes]] = {}


def in_order(pairs: list[tuple[bytes, bytes]], procs: int, lines: int) -> bool:
    """Every process's line indexes appear exactly once each, in order."""
    if lines not in _INDEXES:
        _INDEXES[lines] = [b"%09d" % i for i in range(lines)]
    want = _INDEXES[lines]
    per: dict[bytes, list[bytes]] = {}
    for ident, index in pairs:
        bucket = per.get(ident)
        if bucket is None:
            bucket = per[ident] = []
        bucket.append(index)
    return len(per) == procs and all(per.get(b"%d" % i) == want for i in range(1, procs + 1))


def verify_files(result: Throughput, files: dict[int, Path]) -> None:
    """Raw sinks (one file per process): compare with the exact bytes the process wrote."""
    arrived, ok = 0, True
    for ident, path in files.items():
        data = path.read_bytes() if path.exists() else b""
        arrived += data.count(b"\n")
        ok = ok and data == expected_cached(ident, result.lines)
    result.arrived, result.in_order = arrived, ok


def verify_pattern(result: Throughput, paths: list[Path], pattern: bytes) -> None:
    data = read_all(paths)
    pairs = re.findall(pattern, data)
    result.arrived = len(pairs)
    result.in_order = in_order(pairs, result.procs, result.lines)


HONCHO_LINE = rb"\| w(\d+) l(\d{9}) "
FLEET_LINE = rb'"stream":"stdout",[^\n]*?"line":"w(\d+) l(\d{9}) '


def time_sink(
    sizes: Callable[[], int],
    count: Callable[[], int],
    expected: int,
    record: Path,
    procs: int,
    timeout: float,
    alive: Callable[[], bool],
) -> float:
    """When the last line reached the sink: the last time the sink grew, once every process
    has written its last line and the sink holds every line (or stayed still for 3 s)."""
    last_size, last_change = -1, time.time()
    deadline = time.time() + timeout
    checked_at = -1
    while True:
        size = sizes()
        now = time.time()
        if size != last_size:
            last_size, last_change = size, now
        elif (
            now - last_change >= 0.3
            and size != checked_at
            and sum(r[0] == "done" for r in read_records(record)) >= procs
        ):
            checked_at = size
            if count() >= expected:
                return last_change
        if checked_at == size and now - last_change >= 3.0:
            return last_change  # lines are missing: verification will say so
        if now > deadline or not alive():
            raise BenchError(
                f"sink incomplete after {now - (deadline - timeout):.0f}s ({size} bytes)"
            )
        time.sleep(0.005)


def first_start(record: Path) -> float:
    return min(float(r[2]) for r in read_records(record) if r[0] == "start")


def agents_cpu(record: Path) -> float | None:
    """The CPU seconds (user + system) the workload processes spent, as each recorded its own
    (``os.times``) after its last line: what writing the lines cost the writers."""
    done = [float(r[4]) for r in read_records(record) if r[0] == "done" and len(r) > 4]
    return sum(done) if done else None


def flood_cmd(lines: int, ident: int | str, record: Path, hold: Path, block: int) -> list[str]:
    return [
        PY,
        "-S",
        str(WORKLOADS / "flood.py"),
        str(lines),
        str(ident),
        str(record),
        str(hold),
        str(block),
    ]


def flood_programs(procs: int, lines: int, record: Path, hold: Path, block: int) -> dict[str, str]:
    """``p1`` … ``pN``: the flood command lines, for the peers that take a program table."""
    return {
        f"p{i}": " ".join(flood_cmd(lines, i, record, hold, block)) for i in range(1, procs + 1)
    }


def throughput_reference(work: Path, procs: int, lines: int, block: int) -> Throughput:
    result = Throughput(REF, procs, lines)
    record, hold = work / "record", work / "hold"
    files = {i: work / f"p{i}.out" for i in range(1, procs + 1)}
    result.launched = time.time()
    spawned = [
        Spawned(flood_cmd(lines, i, record, hold, block), cwd=work, stdout=files[i])
        for i in range(1, procs + 1)
    ]
    try:
        expected = procs * lines * 100
        result.last_line = time_sink(
            lambda: sum(p.stat().st_size for p in files.values()),
            lambda: sum(p.stat().st_size for p in files.values()) // 100,
            procs * lines,
            record,
            procs,
            300,
            lambda: True,
        )
        assert expected
        result.sup_cpu = None
        hold.touch()
        for s in spawned:
            s.wait(30)
    finally:
        for s in spawned:
            s.kill_all()
    result.first_start = first_start(record)
    result.agents_cpu = agents_cpu(record)
    verify_files(result, files)
    return result


def throughput_supervisord(work: Path, procs: int, lines: int, block: int) -> Throughput:
    result = Throughput(SD, procs, lines)
    record, hold = work / "record", work / "hold"
    programs = flood_programs(procs, lines, record, hold, block)
    conf = supervisord_config(work / "supervisord.conf", work, programs, autorestart="false")
    files = {i: work / f"p{i}.out" for i in range(1, procs + 1)}

    def size() -> int:
        return sum(p.stat().st_size for p in files.values() if p.exists())

    result.launched = time.time()
    sup = Spawned([str(SUPERVISORD), "-n", "-c", str(conf)], cwd=work, stdout=work / "console")
    try:
        result.last_line = time_sink(
            size,
            lambda: size() // 100,
            procs * lines,
            record,
            procs,
            600,
            lambda: sup.popen.poll() is None,
        )
        result.sup_cpu = cpu_of([sup.proc])
        hold.touch()
        wait_until(lambda: len(read_records(record)) >= 2 * procs, 10, "records")
        time.sleep(0.2)
        sup.terminate()
    finally:
        sup.kill_all()
    result.first_start = first_start(record)
    result.agents_cpu = agents_cpu(record)
    verify_files(result, files)
    return result


def throughput_honcho(work: Path, procs: int, lines: int, block: int) -> Throughput:
    result = Throughput(HONCHO_, procs, lines)
    record, hold = work / "record", work / "hold"
    programs = flood_programs(procs, lines, record, hold, block)
    pf = procfile(work / "Procfile", programs)
    sink = work / "honcho.out"

    def count() -> int:
        return len(re.findall(HONCHO_LINE, sink.read_bytes()))

    result.launched = time.time()
    sup = Spawned([str(HONCHO), "-f", str(pf), "-d", str(work), "start"], cwd=work, stdout=sink)
    try:
        result.last_line = time_sink(
            lambda: sink.stat().st_size,
            count,
            procs * lines,
            record,
            procs,
            900,
            lambda: sup.popen.poll() is None,
        )
        result.sup_cpu = cpu_of([sup.proc, *(p for p in sup.descendants() if cmd_has(p, "honcho"))])
        hold.touch()
        sup.wait(30)
    finally:
        sup.kill_all()
    result.first_start = first_start(record)
    result.agents_cpu = agents_cpu(record)
    verify_pattern(result, [sink], HONCHO_LINE)
    return result


def throughput_fleet(
    work: Path, procs: int, lines: int, block: int, profile: Path | None = None
) -> Throughput:
    result = Throughput(AF, procs, lines)
    record, hold = work / "record", work / "hold"
    command = flood_cmd(lines, "{issue}", record, hold, block)
    config = fleet_config(work / "fleet.toml", work, command, procs, cap=procs)

    def size() -> int:
        total = 0
        for path in fleet_segments(work):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def count() -> int:
        return read_all(fleet_segments(work)).count(b'"stream":"stdout"')

    result.launched = time.time()
    sup = Spawned(fleet_argv(config, profile), cwd=work, stdout=work / "console")
    try:
        result.last_line = time_sink(
            size, count, procs * lines, record, procs, 600, lambda: sup.popen.poll() is None
        )
        result.sup_cpu = cpu_of([sup.proc])
        hold.touch()
        released = time.time()
        if sup.wait(300) is None:
            raise BenchError("agentize-fleet did not end after its agents did")
        result.up_wall = time.time() - result.launched
        result.shutdown = time.time() - released
    finally:
        sup.kill_all()
    result.first_start = first_start(record)
    result.agents_cpu = agents_cpu(record)
    path = fleet_jsonl(work)
    if path is None:
        raise BenchError("agentize-fleet wrote no fleet.jsonl")
    verify_pattern(result, fleet_segments(work), FLEET_LINE)
    events = jsonl_events(work)
    starts = [iso_epoch(e["ts"]) for e in events if e.get("event") == "run-started"]
    if starts:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - (1 << 20)))
            tail = [ln for ln in fh.read().splitlines() if b'"stream":"stdout"' in ln]
        if tail:
            result.jsonl_span = iso_epoch(json.loads(tail[-1])["ts"]) - min(starts)
    return result


# -- 2. restart latency ----------------------------------------------------------------------


@dataclass
class Restarts:
    peer: str
    mode: str
    latencies: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.latencies) if self.latencies else math.nan

    @property
    def p99(self) -> float:
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def latencies(record: Path) -> list[float]:
    times = [float(r[0]) for r in read_records(record)]
    return [b - a for a, b in itertools.pairwise(times)]


def restart_cmd(record: Path, limit: int, mode: str) -> list[str]:
    return [PY, "-S", str(WORKLOADS / "restart.py"), str(record), str(limit), mode]


def restart_fleet(work: Path, limit: int, mode: str, profile: Path | None = None) -> Restarts:
    record = work / "record"
    restart = (
        {"backoff_base": 1e-6, "backoff_max": 1e-6, "max_crashes": 1_000_000, "crash_window": 1.0}
        if mode == "crash"
        else {"max_milestones": limit + 10}
    )
    config = fleet_config(
        work / "fleet.toml", work, restart_cmd(record, limit, mode), 1, cap=1, restart=restart
    )
    sup = Spawned(fleet_argv(config, profile), cwd=work, stdout=work / "console")
    try:
        code = sup.wait(300)
        if code is None:
            raise BenchError("agentize-fleet restart run did not end in 300 s")
    finally:
        sup.kill_all()
    found = latencies(record)
    if len(found) != limit:
        raise BenchError(
            f"agentize-fleet ({mode}): {len(found)} restarts, wanted {limit}; "
            f"exit {code}; see {work}"
        )
    return Restarts(AF, mode, found)


def restart_supervisord(work: Path, limit: int) -> Restarts:
    record = work / "record"
    conf = supervisord_config(
        work / "supervisord.conf",
        work,
        {"r": " ".join(restart_cmd(record, limit, "crash"))},
        autorestart="unexpected",
        exitcodes="0",
        startretries="1000000",
    )
    sup = Spawned([str(SUPERVISORD), "-n", "-c", str(conf)], cwd=work, stdout=work / "console")
    try:
        wait_until(lambda: len(read_records(record)) > limit, 5 + 2 * limit, "supervisord restarts")
        sup.terminate()
    finally:
        sup.kill_all()
    return Restarts(SD, "crash", latencies(record), note=f"n={limit}")


def restart_reference(work: Path, limit: int, mode: str) -> Restarts:
    """No supervisor: a bare loop that starts the program again as soon as it has exited."""
    record = work / "record"
    argv = restart_cmd(record, limit, mode)
    while True:
        done = subprocess.run(argv, cwd=work, stdin=subprocess.DEVNULL, check=False)
        if len(read_records(record)) > limit:
            break
        if done.returncode not in (0, 1):
            raise BenchError(f"restart workload failed: {done.returncode}")
    return Restarts(REF, mode, latencies(record))


# -- 3. idle overhead ------------------------------------------------------------------------


@dataclass
class Idle:
    peer: str
    agents: int
    seconds: float = 0.0
    cpu: float = 0.0
    peak_rss_mib: float = 0.0
    pss_mib: float = 0.0
    wrapper_cpu: float | None = None  # AF: everything but the supervisor and the agents
    wrapper_pss_mib: float | None = None
    tree_cpu: float | None = None  # every process under the supervisor, but the agents (cgroup)
    ready_seconds: float = 0.0
    processes: int = 1

    def per_agent_second(self, cpu: float | None) -> float | None:
        return None if cpu is None else 1000 * cpu / (self.agents * self.seconds)

    @property
    def cpu_ms_per_agent_second(self) -> float:
        return 1000 * self.cpu / (self.agents * self.seconds)


class IdleRun:
    """One supervisor holding N sleeping agents, measured over a window shared with the others."""

    def __init__(self, peer: str, work: Path, agents: int, profile: Path | None = None) -> None:
        self.peer, self.work, self.agents = peer, work, agents
        self.profile = profile
        env = {**os.environ, "BENCH_PROFILE_WINDOW": "1"} if profile else None
        command = ["sleep", SLEEP_ARG]
        programs = {f"p{i}": " ".join(command) for i in range(1, agents + 1)}
        if peer == AF:
            config = fleet_config(work / "fleet.toml", work, command, agents, cap=agents)
            argv = fleet_argv(config, profile)
        elif peer == SD:
            conf = supervisord_config(
                work / "supervisord.conf", work, programs, autorestart="false"
            )
            argv = [str(SUPERVISORD), "-n", "-c", str(conf)]
        else:
            pf = procfile(work / "Procfile", programs)
            argv = [str(HONCHO), "-f", str(pf), "-d", str(work), "start"]
        self.group = CpuGroup.make(f"idle{agents}-{peer}")
        self.started = time.time()
        try:
            self.sup = Spawned(argv, cwd=work, stdout=work / "console", env=env, group=self.group)
        except BaseException:
            if self.group:
                self.group.remove()
            raise
        self.result = Idle(peer, agents)

    def parts(self) -> tuple[list[psutil.Process], list[psutil.Process], list[psutil.Process]]:
        """(supervisor processes, wrapper processes, agents) under the supervisor now."""
        sup, wrappers, agents = [self.sup.proc], [], []
        for proc in self.sup.descendants():
            try:
                argv = proc.cmdline()
            except psutil.Error:
                continue
            if argv[-1:] == [SLEEP_ARG] and argv[0].endswith("sleep"):
                agents.append(proc)
            elif self.peer == HONCHO_ and any("honcho" in a for a in argv):
                sup.append(proc)
            elif self.peer == AF:
                wrappers.append(proc)
        return sup, wrappers, agents

    def ready(self) -> bool:
        if self.sup.popen.poll() is not None:
            raise BenchError(
                f"{self.peer} exited early ({self.sup.popen.returncode}): see {self.work}"
            )
        ok = len(self.parts()[2]) >= self.agents
        if ok and not self.result.ready_seconds:
            self.result.ready_seconds = time.time() - self.started
        return ok

    def begin(self) -> None:
        sup, wrappers, agents = self.parts()
        if self.profile:
            self.sup.popen.send_signal(signal.SIGUSR1)
        self._sup0 = {p.pid: cpu_exact([p]) for p in sup}
        self._wrap0 = cpu_of(wrappers, children=True)
        self._agents0 = {p.pid: cpu_exact([p]) for p in agents}
        self._tree0 = self.group.usage() if self.group else None
        self._t0 = time.time()

    def end(self) -> None:
        tree1 = self.group.usage() if self.group else None
        r = self.result
        r.seconds = time.time() - self._t0
        if self.profile:
            self.sup.popen.send_signal(signal.SIGUSR2)
        sup, wrappers, agents = self.parts()
        r.cpu = sum(cpu_exact([p]) - self._sup0.get(p.pid, 0.0) for p in sup)
        agents_cpu = sum(cpu_exact([p]) - self._agents0.get(p.pid, 0.0) for p in agents)
        if tree1 is not None and self._tree0 is not None:
            r.tree_cpu = tree1 - self._tree0 - agents_cpu
        r.processes = len(sup)
        r.peak_rss_mib = sum(status_kib(p.pid, "VmHWM") for p in sup) / 1024
        r.pss_mib = sum(pss_kib(p.pid) for p in sup) / 1024
        if self.peer == AF:
            if r.tree_cpu is not None:
                r.wrapper_cpu = max(0.0, r.tree_cpu - r.cpu)
            else:  # per-process ticks: a lower bound (short-lived helpers round to nothing)
                r.wrapper_cpu = cpu_of(wrappers, children=True) - self._wrap0
            r.wrapper_pss_mib = sum(pss_kib(p.pid) for p in wrappers) / 1024
        if len(agents) < self.agents:
            raise BenchError(f"{self.peer}: only {len(agents)} of {self.agents} agents left")

    def stop(self) -> None:
        try:
            self.sup.terminate(60)
        finally:
            self.sup.kill_all()
            if self.group:
                self.group.remove()


def idle(
    work: Path,
    agents: int,
    seconds: float,
    peers: Iterable[str],
    profile: Path | None = None,
    settle: float = 2.0,
) -> list[Idle]:
    runs: list[IdleRun] = []
    try:
        for peer in peers:
            d = work / peer
            d.mkdir(parents=True)
            run = IdleRun(peer, d, agents, profile if peer == AF else None)
            runs.append(run)
            wait_until(run.ready, 120 + agents, f"{agents} agents under {peer}", every=0.2)
            log(f"  {peer}: {agents} agents up in {run.result.ready_seconds:.1f}s")
        time.sleep(settle)  # let start-up work (and pollers backing off) settle
        for run in runs:
            run.begin()
        time.sleep(seconds)
        for run in runs:
            run.end()
    finally:
        for run in runs:
            run.stop()
    return [run.result for run in runs]


# -- 4. scale ------------------------------------------------------------------------------


@dataclass
class Scale:
    peer: str
    tasks: int
    cap: int
    agent: float
    wall: float = 0.0
    runs_span: float | None = None
    sup_cpu: float | None = None

    @property
    def ideal(self) -> float:
        return self.tasks * self.agent / self.cap

    @property
    def factor(self) -> float:
        return self.wall / self.ideal


SCALE_CLONES = 8  # the multiple-clones layout: git's worktree cost grows per clone


def scale_cmd(agent: float) -> list[str]:
    # coreutils sleep: ~1 ms of CPU, so 16 at once fit on 2 cores (a Python agent would need
    # ~15 ms of CPU each and make the bare pool itself CPU-bound at ~2.8x the ideal)
    return ["sleep", f"{agent:g}"]


def scale_fleet(
    work: Path,
    tasks: int,
    cap: int,
    agent: float,
    profile: Path | None = None,
    clones: int = 1,
    *,
    again: bool = False,
) -> Scale:
    """``again``: a second ``up`` on the same state directory, its worktrees already made;
    ``--fresh``, as the tasks ended done in the first (``up`` does not re-run done tasks)."""
    result = Scale(AF, tasks, cap, agent)
    config = fleet_config(
        work / "fleet.toml", work, scale_cmd(agent), tasks, cap=cap, clones=clones
    )
    t0 = time.time()
    sup = Spawned(
        fleet_argv(config, profile, *(["--fresh"] if again else [])),
        cwd=work,
        stdout=work / "console",
    )
    try:
        code = None
        while code is None and time.time() - t0 < 900:
            with contextlib.suppress(psutil.Error):
                result.sup_cpu = cpu_of([sup.proc])  # the last sample before it ends
            code = sup.wait(0.1)
        result.wall = time.time() - t0
        if code != 0:
            raise BenchError(f"agentize-fleet scale run ended {code}: see {work}")
    finally:
        sup.kill_all()
    path = fleet_jsonl(work)
    if path is not None:
        events = jsonl_events(work)
        starts = [iso_epoch(e["ts"]) for e in events if e.get("event") == "run-started"]
        ends = [iso_epoch(e["ts"]) for e in events if e.get("event") == "run-ended"]
        done = sum(e.get("event") == "done" for e in events)
        if done != tasks:
            raise BenchError(f"agentize-fleet scale: {done} of {tasks} tasks done")
        if starts and ends:
            result.runs_span = max(ends) - min(starts)
    return result


def scale_reference(work: Path, tasks: int, cap: int, agent: float) -> Scale:
    """No supervisor: a bare pool that keeps ``cap`` processes running until all have run."""
    result = Scale(REF, tasks, cap, agent)
    argv = scale_cmd(agent)
    t0 = time.time()
    running: dict[int, subprocess.Popen[bytes]] = {}
    left = tasks
    try:
        while left or running:
            while left and len(running) < cap:
                p = subprocess.Popen(argv, cwd=work, stdin=subprocess.DEVNULL)
                running[p.pid] = p
                left -= 1
            pid, status = os.wait()
            proc = running.pop(pid, None)
            if proc is not None:
                proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        for p in running.values():
            p.kill()
            p.wait()
    result.wall = time.time() - t0
    return result


# -- the table -----------------------------------------------------------------------------


@dataclass
class Row:
    workload: str
    metric: str
    values: dict[str, str]
    raw: dict[str, float | None]
    better: str  # "higher" | "lower" | ""


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ratio(row: Row, peer: str) -> str:
    a, b = row.raw.get(AF), row.raw.get(peer)
    if not row.better or a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}×"


def table_markdown(rows: list[Row]) -> str:
    head = ["workload", "metric", AF, HONCHO_, SD, REF, "AF ÷ honcho", "AF ÷ supervisord", "better"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.workload,
            r.metric,
            *(r.values.get(p, "n/a") for p in PEERS),
            ratio(r, HONCHO_),
            ratio(r, SD),
            r.better,
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def table_text(rows: list[Row]) -> str:
    head = [
        "workload",
        "metric",
        "agentize",
        "honcho",
        "supervisord",
        "reference",
        "AF/hon",
        "AF/sd",
        "better",
    ]
    body = [
        [
            r.workload,
            r.metric,
            *(r.values.get(p, "n/a") for p in PEERS),
            ratio(r, HONCHO_),
            ratio(r, SD),
            r.better,
        ]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
        for x in [head, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def make_origin(path: Path) -> None:
    path.mkdir(parents=True)
    git("init", "--quiet", "--initial-branch=main", cwd=path)
    (path / "README.md").write_text("bench repository\n")
    git("add", "README.md", cwd=path)
    git(
        "-c",
        "user.name=bench",
        "-c",
        "user.email=bench@example.invalid",
        "commit",
        "--quiet",
        "-m",
        "initial commit",
        cwd=path,
    )


def code_state() -> tuple[str, bool]:
    """The commit and whether supervisor/ differs from it (the code that was measured)."""
    commit = git("rev-parse", "--short", "HEAD", cwd=ROOT)
    return commit, bool(git("status", "--porcelain", "--", "supervisor", cwd=ROOT))


def version_of(venv: str, dist: str) -> str:
    py = VENVS / venv / "bin" / "python"
    return (
        subprocess.run(
            [str(py), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        or "?"
    )


@dataclass
class Bench:
    sizes: Sizes
    work: Path
    only: set[str]
    profile: bool
    keep: bool = False
    rows: list[Row] = field(default_factory=list)
    targets: list[tuple[str, bool | None, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    load: tuple[float, float, float] = field(default_factory=os.getloadavg)
    code: tuple[str, bool] = field(default_factory=code_state)
    _n: int = 0

    def dir(self, name: str) -> Path:
        self._n += 1
        d = self.work / f"{self._n:02d}-{name}"
        d.mkdir(parents=True)
        return d

    def prof(self, name: str) -> Path | None:
        if not self.profile:
            return None
        PROFILES.mkdir(exist_ok=True)
        return PROFILES / f"{name}.txt"

    def add(
        self,
        workload: str,
        metric: str,
        raw: dict[str, float | None],
        better: str,
        digits: int = 1,
        text: dict[str, str] | None = None,
    ) -> None:
        values = {p: fmt(v, digits) for p, v in raw.items()}
        values.update(text or {})
        self.rows.append(Row(workload, metric, values, raw, better))

    def target(self, text: str, met: bool | None, detail: str) -> None:
        self.targets.append((text, met, detail))

    # workloads -----------------------------------------------------------------------------

    def throughput(self) -> None:
        s = self.sizes
        lost_ok = True
        line_by_line: dict[int, tuple[Throughput, Throughput]] = {}
        for procs, block in s.floods:
            results: dict[str, Throughput] = {}
            for peer, fn in (
                (REF, throughput_reference),
                (SD, throughput_supervisord),
                (AF, throughput_fleet),
                (HONCHO_, throughput_honcho),
            ):
                d = self.dir(f"flood{procs}x{block}-{peer}")
                lines = (
                    dict(s.honcho_lines).get((procs, block), s.lines)
                    if peer == HONCHO_
                    else s.lines
                )
                os.sync()  # no write-back of the previous peer's files during this one
                t0 = time.time()
                if peer == AF:
                    r = throughput_fleet(d, procs, lines, block, self.prof(f"flood{procs}x{block}"))
                else:
                    r = fn(d, procs, lines, block)
                results[peer] = r
                log(
                    f"throughput {procs}x{s.lines} ({block}/write): {peer}: {r.rate:,.0f} lines/s, "
                    f"run {r.run_seconds:.2f}s, wall {r.wall_seconds:.2f}s, "
                    f"{r.arrived}/{r.expected} lines, in order: {r.in_order} "
                    f"({time.time() - t0:.0f}s)"
                )
                if not self.keep:
                    shutil.rmtree(d, ignore_errors=True)  # hundreds of MB each
            how = "line by line" if block == 1 else f"{block * 100:,}-byte writes"
            w = f"throughput {procs}×{s.lines:,}, {how}"
            # A peer that ran fewer lines (honcho at 16) has comparable rates, not times.
            short = {
                p: f"{fmt(r.run_seconds, 2)} ({procs}×{r.lines:,})"
                for p, r in results.items()
                if r.lines != s.lines
            }
            self.add(
                w,
                "lines/s (first start → last line in sink)",
                {p: r.rate for p, r in results.items()},
                "higher",
                0,
            )
            self.add(
                w,
                "s, first start → last line in sink",
                {p: r.run_seconds if r.lines == s.lines else None for p, r in results.items()},
                "lower",
                2,
                short,
            )
            self.add(
                w,
                "s, launch → last line in sink (wall)",
                {p: r.wall_seconds if r.lines == s.lines else None for p, r in results.items()},
                "lower",
                2,
                {
                    p: f"{fmt(r.wall_seconds, 2)} ({procs}×{r.lines:,})"
                    for p, r in results.items()
                    if r.lines != s.lines
                },
            )
            af = results[AF]
            self.add(
                w,
                "lines arrived, in order",
                {p: float(r.arrived) for p, r in results.items()},
                "",
                text={
                    p: f"{r.arrived:,}/{r.expected:,} {'✓' if r.complete else '✗'}"
                    + (f" ({procs}×{r.lines:,})" if r.lines != s.lines else "")
                    for p, r in results.items()
                },
            )
            self.add(
                w,
                "the processes' own CPU µs per line (writing it)",
                {
                    p: None if r.agents_cpu is None else 1e6 * r.agents_cpu / r.expected
                    for p, r in results.items()
                },
                "lower",
                2,
            )
            self.add(
                w,
                "supervisor CPU µs per line (until last line)",
                {
                    p: None if r.sup_cpu is None else 1e6 * r.sup_cpu / r.expected
                    for p, r in results.items()
                },
                "lower",
                2,
            )
            self.notes.append(
                f"{w}: agentize-fleet `up` took {af.up_wall:.2f}s "
                f"in all, of which {af.shutdown:.2f}s after its agents were let go (they exit "
                f"at once); in its own JSONL, first `run-started` → last stdout record = "
                f"{'n/a' if af.jsonl_span is None else f'{af.jsonl_span:.2f}s'}."
            )
            if results[HONCHO_].lines != s.lines:
                self.notes.append(
                    f"{w}: honcho ran {procs}×{results[HONCHO_].lines:,} lines "
                    f"(its rate is flat and CPU-bound; the full size would take "
                    f"{procs * s.lines / max(results[HONCHO_].rate, 1):.0f}s alone)."
                )
            lost_ok = lost_ok and all(r.complete for r in results.values())
            sd, hon, ref = results[SD], results[HONCHO_], results[REF]
            self.target(
                f"{w}: JSONL ≥ supervisord's",
                af.rate >= sd.rate,
                f"{af.rate:,.0f} vs {sd.rate:,.0f} lines/s ({af.rate / sd.rate:.2f}×); "
                f"the same processes writing straight to files, no supervisor at all: "
                f"{ref.rate:,.0f} lines/s ({ref.rate / sd.rate:.2f}× supervisord)",
            )
            self.target(
                f"{w}: launch → last line in the sink (wall) ≤ supervisord's",
                af.wall_seconds <= sd.wall_seconds,
                f"{af.wall_seconds:.2f}s vs {sd.wall_seconds:.2f}s "
                f"({sd.wall_seconds / af.wall_seconds:.2f}× supervisord's rate)",
            )
            self.target(
                f"{w}: JSONL ≥ 8× honcho's",
                af.rate >= 8 * hon.rate,
                f"{af.rate:,.0f} vs {hon.rate:,.0f} lines/s ({af.rate / hon.rate:.1f}×)",
            )
            if block == 1 and af.sup_cpu is not None and sd.sup_cpu is not None:
                line_by_line[procs] = (af, sd)
                ratio = (af.sup_cpu / af.expected) / (sd.sup_cpu / sd.expected)
                self.target(
                    f"{w}: supervisor CPU per line ≤ 1.5× supervisord's (issue 14)",
                    ratio <= 1.5,
                    f"{1e6 * af.sup_cpu / af.expected:.3f} vs "
                    f"{1e6 * sd.sup_cpu / sd.expected:.3f} µs ({ratio:.2f}×)",
                )
        self.target(
            "no line lost or reordered within a worker, anywhere",
            lost_ok,
            "every sink counted and checked line by line",
        )
        self.split_cpu(line_by_line)

    def split_cpu(self, runs: dict[int, tuple[Throughput, Throughput]]) -> None:
        """A note: each supervisor's CPU split into what it pays once (start-up, shutdown
        excluded) and what it pays per line, from its two line-by-line runs (4 and 16
        processes) of this bench: the per-line part is the slope between them."""
        if len(runs) < 2:
            return
        few, many = min(runs), max(runs)
        parts = []
        for index, peer in enumerate((AF, SD)):
            a, b = runs[few][index], runs[many][index]
            assert a.sup_cpu is not None and b.sup_cpu is not None
            slope = (b.sup_cpu - a.sup_cpu) / (b.expected - a.expected)
            parts.append(
                f"{peer} {1e9 * slope:.0f} ns a line + {a.sup_cpu - slope * a.expected:.2f} s"
            )
        self.notes.append(
            f"supervisor CPU, from the {few}- and {many}-process line-by-line runs (the slope "
            f"between them is the cost per line, the rest the cost paid once): "
            + "; ".join(parts)
            + "."
        )

    def restart(self) -> None:
        s = self.sizes
        crash = restart_fleet(
            self.dir("restart-fleet-crash"), s.restarts, "crash", self.prof("restart-crash")
        )
        log(f"restart: agentize-fleet crash: median {crash.median * 1000:.1f} ms")
        mile = restart_fleet(
            self.dir("restart-fleet-milestone"),
            s.restarts,
            "milestone",
            self.prof("restart-milestone"),
        )
        log(f"restart: agentize-fleet milestone: median {mile.median * 1000:.1f} ms")
        sd = restart_supervisord(self.dir("restart-supervisord"), s.sd_restarts)
        log(f"restart: supervisord: median {sd.median * 1000:.1f} ms")
        ref = restart_reference(self.dir("restart-reference"), s.restarts, "crash")
        ref_m = restart_reference(self.dir("restart-reference-m"), s.restarts, "milestone")
        for label, af, refr, sdr in (
            (f"restart after crash ×{s.restarts}", crash, ref, sd),
            (f"resume after milestone ×{s.restarts}", mile, ref_m, None),
        ):
            for metric, key in (
                ("median ms, exit → next start", "median"),
                ("p99 ms, exit → next start", "p99"),
            ):
                raw: dict[str, float | None] = {
                    AF: getattr(af, key) * 1000,
                    REF: getattr(refr, key) * 1000,
                    HONCHO_: None,
                    SD: getattr(sdr, key) * 1000 if sdr else None,
                }
                text = {HONCHO_: "n/a (no restarts)"}
                if sdr is None:
                    text[SD] = "n/a (no milestones)"
                else:
                    text[SD] = f"{fmt(raw[SD])} (n={len(sdr.latencies)})"
                self.add(label, metric, raw, "lower", 1, text)
        self.target(
            "restart latency: median < 60 ms",
            crash.median < 0.060,
            f"crash restart {crash.median * 1000:.1f} ms (p99 {crash.p99 * 1000:.1f}), "
            f"milestone resume {mile.median * 1000:.1f} ms "
            f"(p99 {mile.p99 * 1000:.1f}); supervisord {sd.median * 1000:.0f} ms",
        )

    def idle(self) -> None:
        s = self.sizes
        for n in s.idle:
            found = {
                r.peer: r
                for r in idle(
                    self.dir(f"idle{n}"),
                    n,
                    s.idle_seconds,
                    (AF, SD, HONCHO_),
                    self.prof(f"idle{n}"),
                    s.idle_settle,
                )
            }
            for r in found.values():
                log(
                    f"idle {n}: {r.peer}: {r.cpu:.3f} CPU s in {r.seconds:.1f}s "
                    f"({r.cpu_ms_per_agent_second:.4f} ms/agent-s; all but the agents "
                    f"{fmt(r.tree_cpu, 3)} s), peak RSS {r.peak_rss_mib:.1f} MiB over "
                    f"{r.processes} process(es), PSS {r.pss_mib:.1f} MiB"
                    + (
                        f"; wrappers {r.wrapper_cpu:.3f} CPU s, PSS {r.wrapper_pss_mib:.1f} MiB"
                        if r.wrapper_cpu is not None
                        else ""
                    )
                )
            w = f"idle {n} agents × {s.idle_seconds:g}s"
            self.add(
                w,
                "supervisor CPU ms per agent-second",
                {p: r.cpu_ms_per_agent_second for p, r in found.items()},
                "lower",
                4,
            )
            self.add(
                w,
                "supervisor CPU s in the window",
                {p: r.cpu for p, r in found.items()},
                "lower",
                3,
            )
            self.add(
                w,
                "all processes but the agents (cgroup): CPU ms per agent-second",
                {p: r.per_agent_second(r.tree_cpu) for p, r in found.items()},
                "lower",
                4,
            )
            af = found[AF]
            self.add(
                w,
                "… of which AF run wrappers (runner.sh + watchdog)",
                {AF: af.per_agent_second(af.wrapper_cpu)},
                "",
                4,
            )
            self.add(
                w,
                "supervisor peak RSS MiB (sum of VmHWM)",
                {p: r.peak_rss_mib for p, r in found.items()},
                "lower",
                1,
                {
                    p: f"{r.peak_rss_mib:,.1f} ({r.processes} proc)"
                    for p, r in found.items()
                    if r.processes > 1
                },
            )
            self.add(
                w,
                "supervisor PSS MiB (shared pages split)",
                {p: r.pss_mib for p, r in found.items()},
                "lower",
                1,
            )
            self.add(
                w,
                "supervisor peak RSS per agent, MiB",
                {p: r.peak_rss_mib / n for p, r in found.items()},
                "lower",
                2,
            )
            self.add(w, "AF run wrappers: PSS MiB", {AF: af.wrapper_pss_mib}, "", 1)
            self.add(
                w,
                "s until all agents were up",
                {p: r.ready_seconds for p, r in found.items()},
                "lower",
                1,
            )
            wrappers = af.per_agent_second(af.wrapper_cpu)
            self.target(
                f"idle {n}: < 0.1 ms supervisor CPU per agent-second",
                af.cpu_ms_per_agent_second < 0.1,
                f"{af.cpu_ms_per_agent_second:.4f} ms (the run wrappers add {fmt(wrappers, 4)} ms)",
            )
            if n == max(s.idle):
                mb = af.peak_rss_mib * 1.048576
                self.target(
                    f"idle {n}: peak RSS < 60 MB",
                    mb < 60,
                    f"{af.peak_rss_mib:.1f} MiB = {mb:.1f} MB",
                )

    def scale(self) -> None:
        s = self.sizes
        d = self.dir("scale-fleet")
        af = scale_fleet(d, s.scale_tasks, s.scale_cap, s.scale_agent, self.prof("scale"))
        log(f"scale: agentize-fleet {af.wall:.2f}s ({af.factor:.2f}× ideal {af.ideal:.2f}s)")
        warm = scale_fleet(
            d, s.scale_tasks, s.scale_cap, s.scale_agent, self.prof("scale-warm"), again=True
        )
        log(
            f"scale: agentize-fleet again, worktrees made: {warm.wall:.2f}s "
            f"({warm.factor:.2f}× ideal)"
        )
        multi = scale_fleet(
            self.dir("scale-fleet-clones"),
            s.scale_tasks,
            s.scale_cap,
            s.scale_agent,
            clones=SCALE_CLONES,
        )
        log(
            f"scale: agentize-fleet, {SCALE_CLONES} clones: {multi.wall:.2f}s "
            f"({multi.factor:.2f}× ideal)"
        )
        ref = scale_reference(
            self.dir("scale-reference"), s.scale_tasks, s.scale_cap, s.scale_agent
        )
        log(f"scale: reference {ref.wall:.2f}s ({ref.factor:.2f}× ideal)")
        na = {HONCHO_: "n/a (no queue)", SD: "n/a (no queue)"}
        for w, r in (
            (f"scale {s.scale_tasks} × {s.scale_agent * 1000:g} ms, cap {s.scale_cap}", af),
            ("scale again, worktrees exist (2nd `up`)", warm),
            (f"scale, fresh, {SCALE_CLONES} clones (`clones_per_machine`)", multi),
        ):
            self.add(
                w, f"wall s (ideal {r.ideal:.3g} s)", {AF: r.wall, REF: ref.wall}, "lower", 2, na
            )
            self.add(w, "× ideal", {AF: r.factor, REF: ref.factor}, "lower", 2, na)
            self.add(
                w,
                "overhead per task, ms ((wall − ideal) × cap / tasks)",
                {
                    AF: (r.wall - r.ideal) * s.scale_cap / s.scale_tasks * 1000,
                    REF: (ref.wall - ref.ideal) * s.scale_cap / s.scale_tasks * 1000,
                },
                "lower",
                1,
                na,
            )
            self.add(
                w,
                "supervisor CPU s (the `up` process; ≈ wall = its loop is the limit)",
                {AF: r.sup_cpu},
                "",
                2,
                na,
            )
            if r.runs_span is not None:
                self.notes.append(
                    f"{w}: in agentize-fleet's JSONL, first `run-started` → last `run-ended` "
                    f"= {r.runs_span:.2f}s of the {r.wall:.2f}s wall time."
                )
        self.target(
            "scale: within 1.5× of the ideal wall time, worktrees already made (the "
            "supervisor's own per-task cost)",
            warm.factor <= 1.5,
            f"{warm.wall:.2f}s = {warm.factor:.2f}× the ideal {warm.ideal:.3g}s; bare "
            f"pool {ref.factor:.2f}×",
        )
        self.target(
            f"scale: within 1.5× of the ideal wall time, {s.scale_tasks:,} new worktrees "
            "(git's `worktree add` included)",
            af.factor <= 1.5,
            f"{af.wall:.2f}s = {af.factor:.2f}× the ideal; over {SCALE_CLONES} clones "
            f"{multi.factor:.2f}×",
        )

    def ssh(self) -> None:
        """Agents on an SSH machine (issue 14; ``bench_ssh.py``).  agentize-fleet's column is the
        fleet following agents on a real sshd on 127.0.0.1; the reference column is the plain
        way, ``ssh HOST CMD > file`` with OpenSSH's client; honcho and supervisord have no
        remote machines."""
        import bench_ssh as b

        s = self.sizes
        reason = b.unavailable()
        if reason is not None:
            self.notes.append(f"SSH rows skipped: {reason}")
            log(f"ssh: skipped: {reason}")
            return
        na = {HONCHO_: "n/a (local only)", SD: "n/a (local only)"}
        w = f"SSH throughput {s.ssh_procs}×{s.ssh_lines:,}, line by line (ref: plain ssh)"
        plain = b.throughput_plain(self.dir("ssh-plain"), s.ssh_procs, s.ssh_lines)
        log(
            f"ssh throughput: plain ssh: {plain.rate:,.0f} lines/s, "
            f"{plain.arrived}/{plain.expected} lines, in order: {plain.in_order}"
        )
        af = b.throughput_fleet_ssh(self.dir("ssh-fleet"), s.ssh_procs, s.ssh_lines)
        log(
            f"ssh throughput: agentize-fleet: {af.rate:,.0f} lines/s, "
            f"{af.arrived}/{af.expected} lines, in order: {af.in_order}"
        )
        self.add(
            w,
            "lines/s (first start → last line in sink)",
            {AF: af.rate, REF: plain.rate},
            "higher",
            0,
            na,
        )
        self.add(
            w,
            "lines arrived, in order",
            {AF: af.arrived, REF: plain.arrived},
            "",
            text={
                **na,
                **{
                    p: f"{r.arrived:,}/{r.expected:,} {'✓' if r.complete else '✗'}"
                    for p, r in ((AF, af), (REF, plain))
                },
            },
        )
        self.add(
            w,
            "local CPU µs per line (AF: `up`; ref: the ssh clients)",
            {
                p: None if r.sup_cpu is None else 1e6 * r.sup_cpu / r.expected
                for p, r in ((AF, af), (REF, plain))
            },
            "lower",
            2,
            na,
        )
        self.target(
            f"{w}: every line arrives once, in order",
            af.complete and plain.complete,
            f"agentize-fleet {af.arrived:,}/{af.expected:,} at {af.rate:,.0f} lines/s, "
            f"plain ssh {plain.arrived:,}/{plain.expected:,} at {plain.rate:,.0f} "
            f"({af.rate / max(plain.rate, 1):.2f}× plain ssh)",
        )
        idle = b.idle_ssh(self.dir("ssh-idle"), s.ssh_idle, s.idle_seconds, s.idle_settle)
        log(
            f"ssh idle {s.ssh_idle}: supervisor {idle.sup_cpu:.3f} CPU s in "
            f"{idle.seconds:.1f}s, remote side {fmt(idle.remote_cpu, 3)} s, peak RSS "
            f"{idle.peak_rss_mib:.1f} MiB, {idle.connections} sshd connection process(es), "
            f"{idle.remote_processes} remote helper process(es)"
        )
        wi = f"SSH idle {s.ssh_idle} agents × {s.idle_seconds:g}s"
        none = {**na, REF: "n/a"}
        self.add(
            wi,
            "supervisor CPU ms per agent-second",
            {AF: idle.per_agent_second(idle.sup_cpu)},
            "lower",
            4,
            none,
        )
        self.add(
            wi,
            "remote side (sshd and all under it, agents excepted) CPU ms/agent-s",
            {AF: idle.per_agent_second(idle.remote_cpu)},
            "lower",
            4,
            none,
        )
        self.add(wi, "supervisor peak RSS MiB", {AF: idle.peak_rss_mib}, "lower", 1, none)
        self.add(
            wi, "remote processes besides the agents", {AF: idle.remote_processes}, "lower", 0, none
        )
        self.notes.append(
            f"{wi}: {idle.connections} sshd connection process(es) for "
            f"{s.ssh_idle} agents; all up in {idle.ready_seconds:.1f}s"
        )
        rc = b.reconnect_ssh(self.dir("ssh-reconnect"), s.ssh_cuts)
        log(
            f"ssh reconnect: median {rc.median:.3f}s, worst {rc.worst:.3f}s over "
            f"{len(rc.gaps)} cuts, every line once and in order: {rc.lines_ok}"
        )
        wr = f"SSH link cut ×{s.ssh_cuts} under an agent printing every 10 ms"
        self.add(
            wr, "s from the cut to output flowing again, median", {AF: rc.median}, "lower", 3, none
        )
        self.add(
            wr, "s from the cut to output flowing again, worst", {AF: rc.worst}, "lower", 3, none
        )
        self.target(
            f"{wr}: every line once, in order",
            rc.lines_ok,
            f"median {rc.median:.3f}s, worst {rc.worst:.3f}s until output flowed again",
        )

    def profile_fleet(self) -> None:
        """agentize-fleet alone, under pyinstrument, on each workload: bench/profiles/*.txt."""
        s = self.sizes
        make_origin(self.work / "origin")
        todo = self.only or {"throughput", "restart", "idle", "scale"}
        if "throughput" in todo:
            for procs, block in s.floods:
                d = self.dir(f"flood{procs}x{block}")
                throughput_fleet(d, procs, s.lines, block, self.prof(f"flood{procs}x{block}"))
                if not self.keep:
                    shutil.rmtree(d, ignore_errors=True)
        if "restart" in todo:
            restart_fleet(
                self.dir("restart-crash"), s.restarts, "crash", self.prof("restart-crash")
            )
        if "idle" in todo:
            n = max(s.idle)
            idle(
                self.dir(f"idle{n}"), n, s.idle_seconds, (AF,), self.prof(f"idle{n}"), s.idle_settle
            )
        if "scale" in todo:
            d = self.dir("scale")
            scale_fleet(d, s.scale_tasks, s.scale_cap, s.scale_agent, self.prof("scale"))
            scale_fleet(
                d, s.scale_tasks, s.scale_cap, s.scale_agent, self.prof("scale-warm"), again=True
            )

    def run(self) -> None:
        make_origin(self.work / "origin")
        for name in ("throughput", "restart", "idle", "scale", "ssh"):
            if self.only and name not in self.only:
                continue
            t0 = time.time()
            log(f"-- {name}")
            getattr(self, name)()
            self.timings[name] = time.time() - t0
            log(f"-- {name} took {self.timings[name]:.0f}s")


def report(bench: Bench, quick: bool, started: float) -> str:
    commit, dirty = code_state()
    if (commit, dirty) != bench.code:
        dirty = True  # a commit or an edit landed during the run
        commit = f"{bench.code[0]}…{commit}" if commit != bench.code[0] else commit
    s = bench.sizes
    lines = [
        BEGIN,
        "",
        f"Run of `scripts/bench{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(started))}, "
        f"commit `{commit}`"
        f"{' (supervisor/ had uncommitted changes or changed during the run)' if dirty else ''}.",
        "",
        f"- machine: {os.cpu_count()} cores (`nproc` {len(os.sched_getaffinity(0))}), "
        f"`uname -m` {platform.machine()}, {platform.system()} {platform.release()}, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        f"- Python {platform.python_version()} ({PY}); honcho {version_of('honcho', 'honcho')}; "
        f"supervisord (supervisor) {version_of('supervisord', 'supervisor')}",
        f"- sizes: {s.lines:,} lines per process; restarts {s.restarts} (supervisord "
        f"{s.sd_restarts}); idle {', '.join(map(str, s.idle))} agents × {s.idle_seconds:g}s; "
        f"scale {s.scale_tasks} tasks × {s.scale_agent * 1000:g} ms, cap {s.scale_cap}",
        f"- load average (1 min) at the start {bench.load[0]:.2f}, at the end "
        f"{os.getloadavg()[0]:.2f}"
        + (
            " — **the machine was busy with other work: figures are noisy**"
            if max(bench.load[0], os.getloadavg()[0]) > 0.7
            else ""
        ),
        f"- bench time: {time.time() - started:.0f}s ("
        + ", ".join(f"{k} {v:.0f}s" for k, v in bench.timings.items())
        + ")",
        "",
        "Ratios are agentize-fleet ÷ peer; `better` says which direction is better for the row.",
        "",
        table_markdown(bench.rows),
        "",
        "Targets (issue 6):",
        "",
    ]
    for text, met, detail in bench.targets:
        mark = "met" if met else ("not met" if met is not None else "n/a")
        lines.append(f"- **{mark}**: {text} — {detail}")
    if bench.notes:
        lines += ["", "Measured details:", ""] + [f"- {n}" for n in bench.notes]
    lines += ["", END]
    return "\n".join(lines)


def write_results(block: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = "# Benchmark results\n\n" + block + "\n" + old
    RESULTS.write_text(text)


def list_profiles() -> None:
    for out in sorted(PROFILES.glob("*.txt")):
        log(f"profile: {out.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1/10 sizes, 4 s idle windows: checks the bench in under a minute",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        choices=["throughput", "restart", "idle", "scale", "ssh"],
        help="run only this workload (repeatable)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the comparison: run agentize-fleet alone under "
        "pyinstrument on each workload (idle: just the measured window) and "
        "write its call trees to bench/profiles/*.txt",
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep bench/.work/RUN afterwards")
    args = parser.parse_args(argv)
    for exe in (FLEET, HONCHO, SUPERVISORD):
        if not exe.exists():
            parser.error(f"{exe} is missing: run scripts/bench, which installs it")
    started = time.time()
    if os.getloadavg()[0] > 0.7:
        log(
            f"warning: load average {os.getloadavg()[0]:.2f}: other work on this machine "
            "will make the figures noisy"
        )
    work = BENCH / ".work" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    bench = Bench(QUICK if args.quick else FULL, work, set(args.only), args.profile, args.keep)
    try:
        if args.profile:
            bench.profile_fleet()
        else:
            bench.run()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.profile:
        list_profiles()
        log(f"total {time.time() - started:.0f}s")
        return 0
    block = report(bench, args.quick, started)
    print()
    print(table_text(bench.rows))
    print()
    for text, met, detail in bench.targets:
        print(f"{'MET    ' if met else 'NOT MET'}  {text}: {detail}")
    for note in bench.notes:
        print(f"note: {note}")
    if not args.no_write and not args.only:
        write_results(block)
        log(f"wrote {RESULTS.relative_to(ROOT)}")
    log(f"total {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"scripts/bench: {exc}", file=sys.stderr)
        sys.exit(1)
