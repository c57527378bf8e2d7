"""The benchmark's SSH rows (issue 14): agents on an SSH machine, a real sshd on 127.0.0.1.

The "machine" is this one, reached through OpenSSH's sshd started for the run (as the tests do,
``tests/sshd.py``; root only), so the agents, sshd and the supervisor share the two cores: what
the rows compare is what each way of carrying output costs on the same machine.

* **throughput**: N processes print L lines each on the SSH machine.  agentize-fleet (a fleet
  whose only machine is the sshd) against the plain way, ``ssh HOST CMD > file`` for each
  process with OpenSSH's client, which carries the bytes and nothing else (no log records, no
  re-attach after a lost link).
* **idle**: A agents that sleep on the SSH machine, followed by one fleet: the supervisor's CPU
  and RSS over a window, and what the remote side (sshd and everything under it, the agents
  excepted) spent meanwhile, from a cgroup around sshd.
* **reconnect**: an agent printing a line every 10 ms; the sshd's connection processes are
  killed (the client sees its link drop); the row is the time from the cut to the next record
  of that agent in the fleet's log, repeated.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import (
    FLEET_LINE,
    PY,
    ROOT,
    SLEEP_ARG,
    WORKLOADS,
    BenchError,
    CpuGroup,
    Spawned,
    Throughput,
    agents_cpu,
    cpu_exact,
    cpu_of,
    first_start,
    fleet_argv,
    fleet_segments,
    flood_cmd,
    origin_for,
    read_all,
    status_kib,
    time_sink,
    toml_str,
    verify_files,
    verify_pattern,
    wait_until,
)

sys.path.insert(0, str(ROOT))
from tests.sshd import SSHD, run_sshd, sshd_unavailable_reason

AF_SSH = "agentize-fleet (SSH)"
PLAIN_SSH = "ssh HOST CMD > file"


def unavailable() -> str | None:
    """Why the SSH rows cannot run here (None when they can)."""
    return sshd_unavailable_reason()


@contextlib.contextmanager
def machine(work: Path, group: CpuGroup | None = None) -> Iterator[SSHD]:
    """A real sshd on 127.0.0.1 for one workload; with ``group``, sshd and every session it
    serves (their processes included) run inside it."""
    with run_sshd(work / "sshd") as server:
        if group is not None:
            (group.path / "cgroup.procs").write_text(str(server.pid))
        yield server


def ssh_fleet_config(
    path: Path,
    work: Path,
    server: SSHD,
    command: list[str],
    tasks: int,
    *,
    cap: int,
    lease_timeout: float = 60.0,
) -> Path:
    """A fleet whose only machine is ``server`` (``local.max_agents = 0``)."""
    lines = [
        'name = "bench-ssh"',
        f"repository = {toml_str(str(origin_for(work)))}",
        f"workspace_root = {toml_str(str(work / 'ws'))}",
        f"state_dir = {toml_str(str(work / 'state'))}",
        f"concurrency = {cap}",
        "start_interval = 0",
        "stop_timeout = 5",
        "log_rotate_bytes = 0",
        f"lease_timeout = {lease_timeout:g}",
        "",
        "[agent]",
        "command = [" + ", ".join(toml_str(a) for a in command) + "]",
        "",
        "[local]",
        "max_agents = 0",
        "",
        "[[machines]]",
        'name = "m1"',
        f'host = "{server.address}"',
        f"port = {server.port}",
        f"user = {toml_str(server.user)}",
        f"identity_file = {toml_str(str(server.client_key))}",
        f"known_hosts = {toml_str(str(server.known_hosts))}",
        f"max_agents = {cap}",
        f"workdir = {toml_str(str(work / 'remote'))}",
        "",
    ]
    for issue in range(1, tasks + 1):
        lines += ["[[tasks]]", f"issue = {issue}", ""]
    path.write_text("\n".join(lines))
    return path


def ssh_argv(server: SSHD, command: list[str]) -> list[str]:
    """OpenSSH's client running ``command`` on ``server`` (batch mode, the test keys)."""
    return [
        "ssh",
        "-q",
        "-T",
        "-p",
        str(server.port),
        "-i",
        str(server.client_key),
        "-o",
        f"UserKnownHostsFile={server.known_hosts}",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        f"{server.user}@{server.address}",
        shlex.join(command),
    ]


# -- throughput ------------------------------------------------------------------------------


def throughput_plain(work: Path, procs: int, lines: int) -> Throughput:
    """``ssh HOST flood.py … > pN.out`` for each process, all at once."""
    result = Throughput(PLAIN_SSH, procs, lines)
    record, hold = work / "record", work / "hold"
    files = {i: work / f"p{i}.out" for i in range(1, procs + 1)}
    with machine(work) as server:
        result.launched = time.time()
        clients = [
            Spawned(
                ssh_argv(server, flood_cmd(lines, i, record, hold, 1)), cwd=work, stdout=files[i]
            )
            for i in range(1, procs + 1)
        ]
        try:
            result.last_line = time_sink(
                lambda: sum(p.stat().st_size for p in files.values() if p.exists()),
                lambda: sum(p.stat().st_size for p in files.values() if p.exists()) // 100,
                procs * lines,
                record,
                procs,
                600,
                lambda: True,
            )
            result.sup_cpu = cpu_of(c.proc for c in clients)  # the ssh clients carry the bytes
            hold.touch()
            for c in clients:
                c.wait(30)
        finally:
            for c in clients:
                c.kill_all()
    result.first_start = first_start(record)
    result.agents_cpu = agents_cpu(record)
    verify_files(result, files)
    return result


def throughput_fleet_ssh(work: Path, procs: int, lines: int) -> Throughput:
    """The same processes as agents of a fleet on the SSH machine; the sink is the JSONL."""
    result = Throughput(AF_SSH, procs, lines)
    record, hold = work / "record", work / "hold"
    with machine(work) as server:
        config = ssh_fleet_config(
            work / "fleet.toml",
            work,
            server,
            flood_cmd(lines, "{issue}", record, hold, 1),
            procs,
            cap=procs,
        )

        def size() -> int:
            total = 0
            for path in fleet_segments(work):
                with contextlib.suppress(FileNotFoundError):
                    total += path.stat().st_size
            return total

        def count() -> int:
            return read_all(fleet_segments(work)).count(b'"stream":"stdout"')

        result.launched = time.time()
        sup = Spawned(fleet_argv(config), cwd=work, stdout=work / "console")
        try:
            result.last_line = time_sink(
                size, count, procs * lines, record, procs, 900, lambda: sup.popen.poll() is None
            )
            result.sup_cpu = cpu_of([sup.proc])
            hold.touch()
            if sup.wait(300) is None:
                raise BenchError("agentize-fleet (SSH) did not end after its agents did")
            result.up_wall = time.time() - result.launched
        finally:
            sup.kill_all()
    result.first_start = first_start(record)
    result.agents_cpu = agents_cpu(record)
    verify_pattern(result, fleet_segments(work), FLEET_LINE)
    return result


# -- idle ------------------------------------------------------------------------------------


@dataclass
class IdleSSH:
    agents: int
    seconds: float = 0.0
    sup_cpu: float = 0.0
    peak_rss_mib: float = 0.0
    remote_cpu: float | None = None  # sshd and all under it, the agents excepted
    remote_processes: int = 0  # processes under sshd besides the agents, at the end
    connections: int = 0
    ready_seconds: float = 0.0

    def per_agent_second(self, cpu: float | None) -> float | None:
        return None if cpu is None else 1000 * cpu / (self.agents * self.seconds)


def _sleeping_agents() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if argv[-1:] == [SLEEP_ARG] and argv[0].endswith("sleep"):
            found.append(proc)
    return found


def idle_ssh(work: Path, agents: int, seconds: float, settle: float) -> IdleSSH:
    """``agents`` sleeping agents on the SSH machine, one fleet following them."""
    result = IdleSSH(agents)
    group = CpuGroup.make(f"ssh-idle{agents}")
    try:
        with machine(work, group) as server:
            config = ssh_fleet_config(
                work / "fleet.toml", work, server, ["sleep", SLEEP_ARG], agents, cap=agents
            )
            started = time.time()
            sup = Spawned(fleet_argv(config), cwd=work, stdout=work / "console")
            try:

                def ready() -> bool:
                    if sup.popen.poll() is not None:
                        raise BenchError(f"agentize-fleet (SSH) exited early: see {work}")
                    return len(_sleeping_agents()) >= agents

                wait_until(ready, 120 + 2 * agents, f"{agents} agents on the SSH machine", 0.2)
                result.ready_seconds = time.time() - started
                time.sleep(settle)
                sleepers = _sleeping_agents()
                sup0 = cpu_exact([sup.proc])
                agents0 = cpu_exact(sleepers)
                tree0 = group.usage() if group else None
                t0 = time.time()
                time.sleep(seconds)
                result.seconds = time.time() - t0
                result.sup_cpu = cpu_exact([sup.proc]) - sup0
                tree1 = group.usage() if group else None
                if tree0 is not None and tree1 is not None:
                    result.remote_cpu = tree1 - tree0 - (cpu_exact(sleepers) - agents0)
                result.peak_rss_mib = status_kib(sup.pid, "VmHWM") / 1024
                result.connections = len(server.connection_processes())
                agent_pids = {p.pid for p in sleepers}
                with contextlib.suppress(psutil.Error):
                    result.remote_processes = sum(
                        1
                        for p in psutil.Process(server.pid).children(recursive=True)
                        if p.pid not in agent_pids
                    )
            finally:
                sup.terminate(60)
                sup.kill_all()
    finally:
        if group is not None:
            group.remove()
    return result


# -- reconnect -------------------------------------------------------------------------------


@dataclass
class Reconnect:
    gaps: list[float] = field(default_factory=list)  # cut → next stdout record, seconds
    lines_ok: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.gaps) if self.gaps else float("nan")

    @property
    def worst(self) -> float:
        return max(self.gaps) if self.gaps else float("nan")


def _records_after(work: Path, moment: float) -> float | None:
    """The time of the first stdout record logged after ``moment`` (epoch seconds)."""
    from datetime import datetime

    for raw in read_all(fleet_segments(work)).splitlines():
        if b'"stream":"stdout"' not in raw:
            continue
        record: dict[str, Any] = json.loads(raw)
        when = datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
        if when > moment:
            return when
    return None


def reconnect_ssh(work: Path, cuts: int) -> Reconnect:
    """Cut the link ``cuts`` times under an agent printing every 10 ms."""
    result = Reconnect()
    ticks = 100 * (4 + 4 * cuts)  # enough output to outlast every cut
    script = WORKLOADS / "ticker.py"
    with machine(work) as server:
        config = ssh_fleet_config(
            work / "fleet.toml", work, server, [PY, "-S", str(script), str(ticks)], 1, cap=1
        )
        sup = Spawned(fleet_argv(config), cwd=work, stdout=work / "console")
        try:
            wait_until(
                lambda: b"tick 000050" in read_all(fleet_segments(work)),
                60,
                "the ticker's first lines",
            )
            for _ in range(cuts):
                cut = time.time()
                server.kill_connections()
                deadline = cut + 30
                while time.time() < deadline:
                    after = _records_after(work, cut)
                    if after is not None:
                        result.gaps.append(after - cut)
                        break
                    time.sleep(0.01)
                else:
                    raise BenchError("no output 30 s after a cut link")
                time.sleep(1.0)
            if sup.wait(120) is None:
                raise BenchError("agentize-fleet (SSH) did not end after the ticker did")
        finally:
            sup.kill_all()
    data = read_all(fleet_segments(work))
    got = [int(m) for m in re.findall(rb'"line":"tick (\d{6})"', data)]
    result.lines_ok = got == list(range(ticks))
    return result


def remote_agents_left() -> int:
    """Agents of the idle row still running (there must be none)."""
    return len(_sleeping_agents())


__all__ = [
    "AF_SSH",
    "PLAIN_SSH",
    "IdleSSH",
    "Reconnect",
    "idle_ssh",
    "reconnect_ssh",
    "remote_agents_left",
    "throughput_fleet_ssh",
    "throughput_plain",
    "unavailable",
]
