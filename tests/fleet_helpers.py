"""Helpers for the tests that steer a running fleet and that kill its supervisor.

They build on the ``fleet`` fixture of ``conftest.py`` (a :class:`conftest.Harness` that kills,
by pid, every process a test started) and add what those tests need on top: the CLI's other
sub-commands, raw requests on the control socket, the runs of a state directory, and pids
checked against their start time.  Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from conftest import ROOT, Harness, Started, wait_for

from supervisor.ledger import Ledger, RunRecord
from supervisor.rundir import socket_path

T = TypeVar("T")

CLI_TIMEOUT = 20.0


# -- the command line ---------------------------------------------------------------------------


def cli(
    harness: Harness, config: Path, *args: str, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``agentize-fleet ARGS -c CONFIG`` to its end (killed and failed after ``timeout``)."""
    argv = [sys.executable, "-m", "supervisor.cli", *args, "-c", str(config)]
    popen = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=harness.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    harness.popens.append(popen)  # type: ignore[arg-type]  # killed by the fixture if left
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        out, err = popen.communicate()
        pytest.fail(f"`agentize-fleet {' '.join(args)}` took more than {timeout:g}s\n{err}")
    return subprocess.CompletedProcess(argv, popen.returncode, out, err)


def explain(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


# -- the control socket ---------------------------------------------------------------------------


def raw_request(state_dir: Path, data: bytes, *, shut: bool = True, timeout: float = 10.0) -> Any:
    """Send ``data`` as is on the control socket and return the decoded one-line answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path(state_dir)))
        if data:
            sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while b"\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return json.loads(answer.split(b"\n", 1)[0])


def request(state_dir: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    answer = raw_request(state_dir, json.dumps(payload).encode() + b"\n", timeout=timeout)
    assert isinstance(answer, dict), answer
    return answer


def try_status(state_dir: Path) -> dict[str, Any] | None:
    """The fleet's ``status`` answer, or None while its socket does not answer."""
    try:
        answer = request(state_dir, {"cmd": "status"}, timeout=5.0)
    except (OSError, ValueError):
        return None
    return answer if answer.get("ok") else None


def wait_ready(started: Started, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until the fleet answers on its control socket; fail early if ``up`` ends."""

    def ready() -> dict[str, Any] | None:
        if started.popen.poll() is not None:
            pytest.fail(
                f"agentize-fleet up ended early with {started.popen.returncode}\n"
                + started.stderr_path.read_text(errors="replace")[-3000:]
                + started.stdout_path.read_text(errors="replace")[-3000:]
            )
        status = try_status(started.state_dir)
        return status if status and status.get("pid") == started.popen.pid else None

    return wait_for(ready, timeout, "the fleet's control socket")


def workers_by_task(status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(w["task"]): w for w in status.get("workers", [])}


def wait_states(started: Started, wanted: dict[int, str], timeout: float = 20.0) -> dict[str, Any]:
    """Wait until ``status`` shows each task of ``wanted`` in its state; return that status."""

    def match() -> dict[str, Any] | None:
        status = try_status(started.state_dir)
        if status is None:
            return None
        rows = workers_by_task(status)
        ok = all(rows.get(t, {}).get("state") == s for t, s in wanted.items())
        return status if ok else None

    return wait_for(match, timeout, f"task states {wanted}")


# -- the state directory ---------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every whole record of a JSONL file (a torn last line, from a killed writer, left out)."""
    out: list[dict[str, Any]] = []
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.endswith(b"\n"):
                out.append(json.loads(raw))
    return out


def run_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of one fleet run, rotated segments first (oldest first)."""
    segments = sorted(run_dir.glob("fleet.jsonl.*"), key=lambda p: int(p.suffix[1:]))
    out: list[dict[str, Any]] = []
    for path in [*segments, run_dir / "fleet.jsonl"]:
        if path.exists():
            out += read_jsonl(path)
    return out


def events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r["stream"] == "fleet" and r.get("event") == name]


def run_dirs(state_dir: Path) -> dict[str, Path]:
    """Fleet run id -> its directory."""
    runs = state_dir / "runs"
    if not runs.is_dir():
        return {}
    return {p.name: p for p in runs.iterdir() if p.is_dir()}


def only_run_dir(state_dir: Path) -> Path:
    dirs = list(run_dirs(state_dir).values())
    assert len(dirs) == 1, dirs
    return dirs[0]


def output_lines(records: list[dict[str, Any]], task: int, run: int, stream: str) -> list[str]:
    return [
        r["line"]
        for r in records
        if r["stream"] == stream and r["task"] == task and r["run"] == run
    ]


# -- processes ---------------------------------------------------------------------------------


def start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (the process's start time in clock ticks since boot)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2 :].split()[19])


def alive(pid: int, ticks: int | None = None) -> bool:
    """Whether ``pid`` lives (a zombie does not) and, given ``ticks``, is still that process."""
    if ticks is not None and start_ticks(pid) != ticks:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def agent_pids(harness: Harness) -> dict[tuple[int, int], int]:
    """(issue, run) -> the agent's pid, from the fake agents' start records."""
    return {(r["issue"], r["run"]): r["pid"] for r in harness.agent_records("start")}


def sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def kill_up(started: Started, timeout: float = 10.0) -> None:
    """SIGKILL the ``up`` process alone (not its agents: they live in sessions of their own)."""
    sigkill(started.popen.pid)
    started.popen.wait(timeout=timeout)


# -- the shifts of a state directory, against what the runs wrote ----------------------------


def shift_dirs(state_dir: Path) -> list[Path]:
    """Every shift's directory, oldest first."""
    runs = state_dir / "runs"
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def file_lines(path: Path) -> list[str]:
    """The lines of a run's ``stdout`` or ``stderr`` file (a last one without its newline
    included: the log has it too, once the run has ended)."""
    text = path.read_bytes().decode("utf-8", "replace")
    lines = text.split("\n")
    return lines[:-1] if text.endswith("\n") or not text else lines


def assert_runs_logged_once(state_dir: Path, where: str = "") -> list[RunRecord]:
    """Every run the ledger holds has ended (or was abandoned), and every line of both
    streams of each ended run is in the shifts' logs exactly once, in order.  Returns the
    ended runs."""
    with Ledger.reader(state_dir) as ledger:  # type: ignore[union-attr]
        runs = ledger.runs()
    assert all(r.state in ("ended", "abandoned") for r in runs), (
        [(r.issue, r.number, r.state) for r in runs],
        where,
    )
    ended = [r for r in runs if r.state == "ended"]
    records = [rec for shift_dir in shift_dirs(state_dir) for rec in run_records(shift_dir)]
    for run in ended:
        for stream in ("stdout", "stderr"):
            logged = output_lines(records, run.issue, run.number, stream)
            expected = file_lines(Path(run.run_dir, stream))
            assert logged == expected, (
                f"#{run.issue} run {run.number} {stream}: {len(logged)} lines logged, "
                f"{len(expected)} written {where}"
            )
    return ended
