"""One run of ``agentize-fleet up``: the top task group that owns every worker.

The fleet builds the hosts, the slot pool and the log, starts one :class:`Worker` per task,
turns SIGINT/SIGTERM into an orderly stop (a second signal skips the wait), keeps the lease
fresh so the run wrappers let their agents live, keeps the state file current, and ends with a
summary.  Exit codes are stable and documented in the README.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import anyio

from supervisor.config import FleetConfig, TaskConfig
from supervisor.hosts.base import Host
from supervisor.hosts.local import LocalHost
from supervisor.lifecycle import WorkerState
from supervisor.logs import ConsoleRenderer, LogMux, Tag
from supervisor.scheduling import SlotPool, StartGate
from supervisor.worker import StopControl, Worker, WorkerStatus
from supervisor.workspace import Clone, ensure_clone

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOTHING = 3
EXIT_LOCKED = 4
EXIT_DEADLINE = 5
EXIT_INTERRUPTED = 130

STATE_WRITE_INTERVAL = 0.2


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON so that a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(tmp, path)


@dataclass
class FleetResult:
    exit_code: int
    run_id: str
    run_dir: Path
    workers: list[WorkerStatus]
    interrupted: bool


class Fleet:
    """Everything one ``up`` owns (it is the ``FleetServices`` its workers see)."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        console: TextIO | None = None,
        colour: bool | None = None,
        hosts: Mapping[str, Host] | None = None,
    ) -> None:
        self.config = config
        self.fleet_id = new_run_id()
        self.run_dir = config.state_path / "runs" / self.fleet_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.hosts: dict[str, Host] = dict(hosts) if hosts is not None else self._make_hosts()
        capacity = {name: self._capacity(name) for name in self.hosts}
        self.pool = SlotPool(config.concurrency, capacity)
        self.gate = StartGate(config.start_interval)
        self.stop = StopControl()
        self.starts_open = anyio.Event()
        self.starts_open.set()
        width = max([len(f"w{len(config.tasks.items)} #{t.issue}") for t in config.tasks.items]
                    + [5])
        renderer = ConsoleRenderer(console, colour=colour, width=width) if console else None
        self.mux = LogMux(self.fleet_id, self.run_dir / "fleet.jsonl", renderer)
        self.log = self.mux.logger(Tag("fleet", None, "-", 0))
        self.workers: list[Worker] = []
        self._clones: dict[str, Clone] = {}
        self._clone_locks: dict[str, anyio.Lock] = {}
        self._roots: dict[str, str] = {}
        self._dirty = anyio.Event()
        self.started_at = time.time()
        for task in config.tasks.items:
            self.add_task(task)

    # construction ----------------------------------------------------------------------

    def _make_hosts(self) -> dict[str, Host]:
        hosts: dict[str, Host] = {}
        if self.config.local.max_agents > 0:
            hosts["local"] = LocalHost("local")
        if self.config.machines:
            from supervisor.hosts.ssh import SSHHost, SSHTarget

            for machine in self.config.machines:
                hosts[machine.name] = SSHHost(
                    SSHTarget(
                        name=machine.name,
                        host=machine.host,
                        port=machine.port,
                        user=machine.user,
                        identity_file=machine.identity_file,
                        known_hosts=machine.known_hosts,
                        ssh_config=machine.ssh_config,
                        connect_timeout=machine.connect_timeout,
                        keepalive_interval=machine.keepalive_interval,
                        keepalive_count_max=machine.keepalive_count_max,
                        unreachable_after=machine.unreachable_after,
                    )
                )
        return hosts

    def _capacity(self, name: str) -> int:
        if name == "local":
            return self.config.local.max_agents
        for machine in self.config.machines:
            if machine.name == name:
                return machine.max_agents
        return 0

    def add_task(self, task: TaskConfig) -> Worker:
        worker = Worker(f"w{len(self.workers) + 1}", task, self)
        self.workers.append(worker)
        self.changed()
        return worker

    # FleetServices ---------------------------------------------------------------------

    def _workdir(self, machine: str) -> str:
        if machine == "local":
            return str(self.config.resolve(self.config.workspace_root))
        for m in self.config.machines:
            if m.name == machine:
                return m.workdir
        raise KeyError(machine)

    async def clone_on(self, machine: str) -> Clone:
        lock = self._clone_locks.setdefault(machine, anyio.Lock())
        async with lock:
            if machine not in self._clones:
                host = self.hosts[machine]
                self._clones[machine] = await ensure_clone(
                    host,
                    self.config.repository_url,
                    self._workdir(machine),
                    self.config.clone_dir_name,
                    self.config.default_branch,
                )
                self.log.info(
                    "clone-ready",
                    msg=f"worker clone {self._clones[machine].path} on {machine} "
                    f"(default branch {self._clones[machine].default_branch})",
                    machine=machine,
                )
            return self._clones[machine]

    async def _resolve_roots(self) -> None:
        for name, host in self.hosts.items():
            if name == "local":
                self._roots[name] = str(self.run_dir / "agents")
            else:
                base = await host.resolve_path(self._workdir(name))
                self._roots[name] = posixpath.join(base, ".agentize-fleet", "runs", self.fleet_id)

    def run_root(self, machine: str) -> str:
        return self._roots.get(machine) or str(self.run_dir / "agents")

    def lease_path(self, machine: str) -> str:
        return posixpath.join(self.run_root(machine), "lease")

    def changed(self) -> None:
        self._dirty.set()

    # state -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet_id,
            "name": self.config.name,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "run_dir": str(self.run_dir),
            "config": str(self.config.base_dir),
            "concurrency": self.config.concurrency,
            "stopping": self.stop.requested.is_set(),
            "peak_running": self.pool.peak,
            "workers": [w.status.as_dict() for w in self.workers],
        }

    def write_state(self) -> None:
        write_json_atomic(self.run_dir / "state.json", self.snapshot())

    async def _keep_state(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            self.write_state()
            await anyio.sleep(STATE_WRITE_INTERVAL)

    async def _keep_leases(self) -> None:
        interval = max(0.5, self.config.lease_timeout / 4) if self.config.lease_timeout else 30.0
        while True:
            for name, host in self.hosts.items():
                with contextlib.suppress(Exception):
                    await host.touch_lease(self.lease_path(name))
            await anyio.sleep(interval)

    async def _handle_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stop.requested.is_set():
                    self.log.info("stop-forced", msg=f"{name} again: killing runs now")
                else:
                    self.log.info(
                        "stopping",
                        msg=f"{name}: stopping all runs (SIGTERM, then SIGKILL after "
                        f"{self.config.stop_timeout:g}s; {name} again to kill now)",
                    )
                self.stop.request(name)
                self.changed()

    # the run -------------------------------------------------------------------------------

    async def run(self) -> FleetResult:
        """Run every task to its end (or until stopped) and return the result."""
        try:
            async with anyio.create_task_group() as services:
                services.start_soon(self.mux.flush_periodically)
                services.start_soon(self._handle_signals)
                await self._resolve_roots()
                services.start_soon(self._keep_state)
                services.start_soon(self._keep_leases)
                self.log.info(
                    "fleet-started",
                    msg=f"fleet {self.fleet_id}: {len(self.workers)} task(s), cap "
                    f"{self.config.concurrency}, machines "
                    + ", ".join(f"{n}({self.pool.capacity[n]})" for n in self.hosts),
                    run_dir=str(self.run_dir),
                )
                async with anyio.create_task_group() as workers:
                    for worker in self.workers:
                        workers.start_soon(worker.run)
                services.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for host in self.hosts.values():
                    with contextlib.suppress(Exception):
                        await host.aclose()
        return self._finish()

    def exit_code(self) -> int:
        if self.stop.requested.is_set():
            return EXIT_INTERRUPTED
        states = [w.status.state for w in self.workers]
        if not states:
            return EXIT_NOTHING
        if all(s is WorkerState.DONE for s in states):
            return EXIT_OK
        return EXIT_FAILED

    def _finish(self) -> FleetResult:
        code = self.exit_code()
        statuses = [w.status for w in self.workers]
        summary = {
            **self.snapshot(),
            "ended_at": time.time(),
            "exit_code": code,
            "exit_meaning": EXIT_MEANINGS.get(code, ""),
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.write_state()
        self.log.info("fleet-ended", msg=f"fleet ended: exit {code} ({EXIT_MEANINGS.get(code)})",
                      exit_code=code)
        self.mux.close()
        return FleetResult(code, self.fleet_id, self.run_dir, statuses,
                           self.stop.requested.is_set())


EXIT_MEANINGS = {
    EXIT_OK: "all tasks done",
    EXIT_FAILED: "some tasks failed",
    EXIT_USAGE: "bad usage or config",
    EXIT_NOTHING: "nothing to do",
    EXIT_LOCKED: "another run holds the lock",
    EXIT_DEADLINE: "deadline reached with work left",
    EXIT_INTERRUPTED: "interrupted",
}


def summary_table(statuses: list[WorkerStatus]) -> str:
    """The end-of-run table: per task its state, runs, milestones, crashes and wall time."""
    header = ("worker", "task", "machine", "state", "runs", "milestones", "crashes", "wall", "note")
    rows = [header] + [
        (
            s.worker,
            f"#{s.task}",
            s.machine or "-",
            str(s.state),
            str(s.run),
            str(s.milestones),
            str(s.crashes),
            f"{s.wall_time:.1f}s",
            s.reason if s.state is not WorkerState.DONE else "",
        )
        for s in statuses
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
