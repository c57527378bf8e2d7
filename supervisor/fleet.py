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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.abc

from supervisor import control, report
from supervisor.claim import (
    LEASE_RENEWAL_WITHOUT_WATCHDOG,
    Claimant,
    ClaimFailed,
    WorkdirInUse,
    claim_workdir,
    release_workdir,
    stale_after,
)
from supervisor.config import FleetConfig, TaskConfig
from supervisor.exitcodes import (
    EXIT_DEADLINE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOTHING,
    EXIT_OK,
    MEANINGS,
)
from supervisor.hosts.base import (
    STOP_WATCHDOG,
    Host,
    HostAuthError,
    HostError,
    HostUnreachable,
    RunIdentity,
    Stream,
)
from supervisor.hosts.local import LocalHost, use_pidfd_child_watcher
from supervisor.lifecycle import WorkerState
from supervisor.logs import (
    ConsoleRenderer,
    LogMux,
    Tag,
    lines_containing,
    log_files,
    route_structlog,
)
from supervisor.rundir import socket_path, unfinished_runs
from supervisor.scheduling import SlotPool, StartGate, StartsGate
from supervisor.worker import Adoption, StopControl, Worker, WorkerStatus
from supervisor.workspace import Clone, clone_name, ensure_clone

STATE_WRITE_INTERVAL = 0.5
REPORT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Deadline:
    """``soft``: no new run starts after it; ``hard``: running ones are stopped (epoch seconds)."""

    soft: float | None = None
    hard: float | None = None


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def new_run_id() -> str:
    """``20261128-070712-345-c8``: sorts by start time (to the millisecond), then is unique."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{stamp}-{int(now * 1000) % 1000:03d}-{secrets.token_hex(1)}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON so that a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = json.dumps(data, default=str, separators=(",", ":"))  # the C encoder: fast
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
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
        deadline: Deadline | None = None,
        watch: Callable[[], Awaitable[list[TaskConfig]]] | None = None,
    ) -> None:
        self.config = config
        self.watch = watch
        self.deadline = deadline or Deadline()
        self.fleet_id = new_run_id()
        self.run_dir = config.state_path / "runs" / self.fleet_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.gate = StartGate(config.start_interval)
        self.stop = StopControl()
        self.starts = StartsGate()
        width = max([len(f"w{len(config.tasks.items)} #{t.issue}") for t in config.tasks.items]
                    + [5])
        renderer = ConsoleRenderer(console, colour=colour, width=width) if console else None
        self.mux = LogMux(
            self.fleet_id,
            self.run_dir / "fleet.jsonl",
            renderer,
            rotate_bytes=config.log_rotate_bytes,
        )
        self.log = self.mux.logger(Tag("fleet", None, "-", 0))
        route_structlog(self.mux)
        self.hosts: dict[str, Host] = dict(hosts) if hosts is not None else self.make_hosts(config)
        capacity = {name: self._capacity(name) for name in self.hosts}
        self.pool = SlotPool(config.concurrency, capacity)
        self.workers: list[Worker] = []
        self._clones: dict[str, Clone] = {}
        self._clone_turns: dict[str, int] = {}
        self._clone_locks: dict[str, anyio.Lock] = {}
        self._roots: dict[str, str] = {}
        self._services_tg: anyio.abc.TaskGroup | None = None
        self._extra_leases: dict[str, set[str]] = {}
        self._claimant = Claimant.for_state_dir(config.state_path, self.fleet_id)
        self._claims: dict[str, str] = {}  # machine -> its workdir, claimed for this fleet
        self._claim_locks: dict[str, anyio.Lock] = {}
        self._dirty = anyio.Event()
        self._workers_tg: anyio.abc.TaskGroup | None = None
        self.deadline_hit = False
        self.started_at = time.time()
        for task in config.tasks.items:
            self.add_task(task)

    # construction ----------------------------------------------------------------------

    @staticmethod
    def make_hosts(config: FleetConfig) -> dict[str, Host]:
        """One host per configured machine (``local`` when it may run agents)."""
        hosts: dict[str, Host] = {}
        if config.local.max_agents > 0:
            hosts["local"] = LocalHost("local")
        if config.machines:
            from supervisor.hosts.ssh import SSHHost, SSHTarget

            for machine in config.machines:
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
        """Queue a task; once the fleet runs, its worker starts at once (``agentize-fleet add``)."""
        worker = Worker(f"w{len(self.workers) + 1}", task, self)
        self.workers.append(worker)
        if self._workers_tg is not None:
            self._workers_tg.start_soon(worker.run)
        self.changed()
        return worker

    def worker_for(self, issue: int) -> Worker | None:
        for worker in self.workers:
            if worker.task.issue == issue:
                return worker
        return None

    # FleetServices ---------------------------------------------------------------------

    def _workdir(self, machine: str) -> str:
        if machine == "local":
            return str(self.config.resolve(self.config.workspace_root))
        for m in self.config.machines:
            if m.name == machine:
                return m.workdir
        raise KeyError(machine)

    async def clone_on(self, machine: str) -> Clone:
        """A worker clone on ``machine`` for a new task (made on first use).

        With ``clones_per_machine`` > 1 (Agentize's "multiple clones" layout: ``NAME.git``,
        ``NAME-2.git``, …) tasks are spread over the clones in turn; git's cost of adding a
        worktree grows with the worktrees a clone already holds.
        """
        count = self._clone_count(machine)
        turn = self._clone_turns.get(machine, 0)
        self._clone_turns[machine] = turn + 1
        index = turn % count
        key = f"{machine}#{index}"
        try:
            await self._claim(machine)
        except (WorkdirInUse, ClaimFailed) as exc:
            # It was unreachable at start-up (another fleet may have taken it meanwhile).
            self._refuse(machine, exc)
            raise HostUnreachable(machine, exc.message) from None
        lock = self._clone_locks.setdefault(key, anyio.Lock())
        async with lock:
            if key not in self._clones:
                self._clones[key] = clone = await ensure_clone(
                    self.hosts[machine],
                    self.config.repository_url,
                    self._workdir(machine),
                    clone_name(self.config.clone_dir_name, index),
                    self.config.default_branch,
                )
                self.log.info(
                    "clone-ready",
                    msg=f"worker clone {clone.path} on {machine} "
                    f"(default branch {clone.default_branch})",
                    machine=machine,
                )
            return self._clones[key]

    async def _claim(self, machine: str) -> None:
        """Make sure this fleet holds ``machine``'s workdir (remote machines; once each).

        The local workspace root is held by ``up``'s own lock; see :mod:`supervisor.claim`.
        """
        if machine == "local" or machine in self._claims:
            return
        async with self._claim_locks.setdefault(machine, anyio.Lock()):
            if machine in self._claims:
                return
            host = self.hosts[machine]
            workdir = await host.resolve_path(self._workdir(machine))
            await claim_workdir(
                host,
                workdir,
                await self.lease_path(machine),
                self._claimant,
                stale_after(self.config.lease_timeout),
            )
            self._claims[machine] = workdir

    def _refuse(self, machine: str, exc: HostError) -> None:
        """Leave ``machine`` out of this fleet for good, with one line saying why."""
        self.pool.capacity[machine] = 0
        self.log.error("machine-refused", msg=f"✗ {exc}: machine left out of this fleet",
                       machine=machine, error=str(exc))
        self.changed()

    async def _release_claims(self) -> None:
        """Give the claimed workdirs back, except where a run of ours may still live (a lost
        link: its claim lapses with its lease, as the watchdog then stops the run)."""
        lost = {w.status.machine for w in self.workers if w.status.state is WorkerState.LOST}
        for machine, workdir in self._claims.items():
            if machine in lost:
                continue
            with contextlib.suppress(Exception):
                await release_workdir(self.hosts[machine], workdir, self._claimant)

    def _clone_count(self, machine: str) -> int:
        for m in self.config.machines:
            if m.name == machine and m.clones is not None:
                return m.clones
        return self.config.clones_per_machine

    async def _preflight(self) -> None:
        """Connect to every remote machine once, before any task is placed on it.

        Each one's workdir is claimed for this fleet here (:mod:`supervisor.claim`).  A machine
        that refuses us (authentication, host key) or whose workdir another live fleet holds is
        left out of this fleet with one clear line naming it; an unreachable one is retried
        later.  The fleet goes on with the others, and fails the tasks at once only if no
        machine can run anything.
        """

        async def probe(name: str, host: Host) -> None:
            try:
                with anyio.fail_after(60):
                    await host.run(["true"], timeout=30)
                    await self._claim(name)
            except (HostAuthError, WorkdirInUse, ClaimFailed) as exc:
                self._refuse(name, exc)
            except (HostError, TimeoutError) as exc:
                self.log.warning("machine-unreachable", msg=f"✗ {exc}", machine=name)
                self.machine_lost(name)

        async with anyio.create_task_group() as tg:
            for name, host in self.hosts.items():
                if name != "local":
                    tg.start_soon(probe, name, host)
        if not any(self.pool.capacity.values()):
            self.log.error("no-machines", msg="✗ no machine can run agents: every task fails")
            for worker in self.workers:
                worker.status.state = WorkerState.FAILED
                worker.status.reason = "no usable machine"
        self.changed()

    async def run_root(self, machine: str) -> str:
        """Where ``machine`` keeps this fleet's run directories (resolved once, on first use)."""
        if machine not in self._roots:
            if machine == "local":
                root = str(self.run_dir / "agents")
            else:
                base = await self.hosts[machine].resolve_path(self._workdir(machine))
                root = posixpath.join(base, ".agentize-fleet", "runs", self.fleet_id)
            self._roots[machine] = root
        return self._roots[machine]

    async def lease_path(self, machine: str) -> str:
        return posixpath.join(await self.run_root(machine), "lease")

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
            "paused": self.starts.paused,
            "deadline": {"soft": self.deadline.soft, "hard": self.deadline.hard},
            "peak_running": self.pool.peak,
            "workers": [w.status.as_dict() for w in self.workers],
        }

    def write_state(self) -> None:
        write_json_atomic(self.run_dir / "state.json", self.snapshot())

    async def _keep_state(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            began = time.perf_counter()
            self.write_state()
            # A fleet of a thousand tasks takes ~10 ms a write: at most ~5% of the loop's time.
            await anyio.sleep(max(STATE_WRITE_INTERVAL, 20 * (time.perf_counter() - began)))

    async def _keep_leases(self) -> None:
        timeout = self.config.lease_timeout
        interval = max(0.5, timeout / 4) if timeout else LEASE_RENEWAL_WITHOUT_WATCHDOG
        while True:
            for name, host in self.hosts.items():
                paths = set(self._extra_leases.get(name, ()))
                if name in self._roots:
                    paths.add(posixpath.join(self._roots[name], "lease"))
                for path in paths:
                    with contextlib.suppress(Exception):
                        await host.touch_lease(path)
            await anyio.sleep(interval)

    def pause_machine(self, machine: str, until: float, reason: str) -> None:
        """No new runs on ``machine`` (or everywhere) until ``until``: a usage limit was hit."""
        machines = list(self.hosts) if self.config.usage_limit_scope == "fleet" else [machine]
        for name in machines:
            self.pool.close(name)
        self.log.info(
            "machine-paused",
            msg=f"⏸ new runs on {', '.join(machines)} paused until "
            f"{time.strftime('%H:%M:%S', time.localtime(until))} ({reason})",
            machines=machines,
            until=until,
        )
        if self._services_tg is not None:
            self._services_tg.start_soon(self._reopen_at, machines, until)

    def machine_lost(self, machine: str) -> None:
        """Take no new runs on an unreachable machine for a while, then try it again."""
        if machine in self.pool.closed:
            return
        self.pool.close(machine)
        retry = time.time() + self._unreachable_after(machine)
        self.log.warning("machine-lost", msg=f"machine {machine} unreachable: no new runs there "
                         f"until {_clock(retry)}", machine=machine)
        if self._services_tg is not None:
            self._services_tg.start_soon(self._reopen_at, [machine], retry)

    def _unreachable_after(self, machine: str) -> float:
        for m in self.config.machines:
            if m.name == machine:
                return m.unreachable_after
        return 120.0

    async def _reopen_at(self, machines: list[str], until: float) -> None:
        await anyio.sleep(max(0.0, until - time.time()))
        for name in machines:
            self.pool.reopen(name)
        self.log.info("machine-resumed", msg=f"▶ new runs on {', '.join(machines)} allowed again")

    async def _keep_deadlines(self) -> None:
        soft, hard = self.deadline.soft, self.deadline.hard
        if soft is None:
            return
        await anyio.sleep(max(0.0, soft - time.time()))
        self.deadline_hit = True
        self.starts.close(f"soft deadline {_clock(soft)} reached")
        self.log.info(
            "deadline-soft",
            msg=f"⏰ soft deadline {_clock(soft)}: no new runs; running ones may finish until "
            f"{_clock(hard) if hard else 'they end'}",
        )
        self.changed()
        if hard is None:
            return
        await anyio.sleep(max(0.0, hard - time.time()))
        self.log.info("deadline-hard", msg=f"⏰ hard deadline {_clock(hard)}: stopping all runs")
        self.stop.request("hard deadline")
        self.changed()

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
            use_pidfd_child_watcher()
            async with anyio.create_task_group() as services:
                self._services_tg = services
                services.start_soon(self.mux.flush_periodically)
                services.start_soon(self._handle_signals)
                await self._preflight()
                await self._handle_orphans()
                services.start_soon(self._keep_state)
                services.start_soon(self._keep_leases)
                services.start_soon(self._keep_deadlines)
                await services.start(
                    control.serve, socket_path(self.config.state_path), self.handle_request
                )
                self.log.info(
                    "fleet-started",
                    msg=f"fleet {self.fleet_id}: {len(self.workers)} task(s), cap "
                    f"{self.config.concurrency}, machines "
                    + ", ".join(f"{n}({self.pool.capacity[n]})" for n in self.hosts),
                    run_dir=str(self.run_dir),
                )
                async with anyio.create_task_group() as workers:
                    self._workers_tg = workers
                    for worker in self.workers:
                        workers.start_soon(worker.run)
                    if self.watch is not None:
                        workers.start_soon(self._watch_source)
                self._workers_tg = None
                services.cancel_scope.cancel()
            summary = self._summary()
            self.mux.flush()  # every record on disk before the report, however that ends
            await self._report_unless_interrupted(summary)
        finally:
            # However the fleet ends (a second Ctrl-C included): each watchdog checks that no
            # run it guards is left before it goes.  Signals only queue up meanwhile: the
            # clean-up is short and bounded, and a Ctrl-C landing in it must not cut it off
            # (a watchdog left until its next look, a claim until its lease lapses).
            with (
                anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM),
                anyio.CancelScope(shield=True),
            ):
                with anyio.move_on_after(15):
                    await self._dismiss_watchdogs()
                with anyio.move_on_after(15):
                    await self._release_claims()
                for host in self.hosts.values():
                    with contextlib.suppress(Exception):
                        await host.aclose()
        return self._finish(summary)

    async def _dismiss_watchdogs(self) -> None:
        """Every worker is done: end the machines' lease watchdogs now (each checks first that
        no run it guards is left) instead of letting them linger until their next look."""
        if not self.config.lease_timeout:
            return
        for machine, root in self._roots.items():
            host = self.hosts.get(machine)
            if host is None:
                continue
            lease = posixpath.join(root, "lease")
            with contextlib.suppress(Exception):
                await host.run(["sh", "-c", STOP_WATCHDOG, "sh", lease], check=False, timeout=10)

    async def _watch_source(self) -> None:
        """``--watch``: re-read the task source every poll interval and queue new tasks."""
        assert self.watch is not None
        interval = self.config.tasks.poll_interval
        while not self.stop.requested.is_set() and not self.starts.closed:
            with anyio.move_on_after(interval):
                await self.stop.requested.wait()
            if self.stop.requested.is_set() or self.starts.closed:
                return
            try:
                tasks = await self.watch()
            except Exception as exc:  # a failing source is logged and polled again
                self.log.warning("source-failed", msg=f"task source failed: {exc}")
                continue
            for task in tasks:
                if self.worker_for(task.issue) is None:
                    self.add_task(task)
                    self.log.info("task-added", msg=f"task #{task.issue} found by --watch",
                                  task=task.issue)

    async def _report_unless_interrupted(self, summary: dict[str, Any]) -> None:
        """The report and its notifications, within ``REPORT_TIMEOUT``.  A Ctrl-C or SIGTERM
        meanwhile skips what is left of them, and only that: the fleet still ends in order
        (``agentize-fleet report`` writes the report later)."""
        with (
            anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
            anyio.move_on_after(REPORT_TIMEOUT, shield=True) as scope,
        ):

            async def skip_on_signal() -> None:
                async for signum in signals:
                    self.log.info(
                        "report-skipped",
                        msg=f"{signal.Signals(signum).name}: report and notifications skipped "
                        f"(`agentize-fleet report --run {self.fleet_id}` writes the report)",
                    )
                    scope.cancel()
                    return

            async with anyio.create_task_group() as tg:
                tg.start_soon(skip_on_signal)
                await self._report(summary)
                tg.cancel_scope.cancel()

    async def _report(self, summary: dict[str, Any]) -> None:
        """Write the morning report and run the notification hooks."""
        try:
            data = await report.collect(
                summary,
                self.run_dir,
                self.hosts,
                milestone_globs=self.config.milestone_globs,
                default_branch={
                    key.split("#")[0]: c.default_branch for key, c in self._clones.items()
                },
            )
            _, report_json = report.write_report(self.run_dir, data)
        except Exception as exc:  # the report must never cost the summary or the exit code
            self.log.warning("report-failed", msg=f"could not write the report: {exc!r}")
            return
        notify = self.config.notify
        if notify.command or notify.webhook:
            problems = await report.notify(notify.command, notify.webhook, report_json,
                                           timeout=notify.timeout)
            for problem in problems:
                self.log.warning("notify-failed", msg=f"notification failed: {problem}")
            if not problems:
                self.log.info("notified", msg="notifications sent")

    # steering -------------------------------------------------------------------------------

    async def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one control-socket request (see ``control.py`` for the protocol)."""
        cmd = request["cmd"]
        if cmd == "status":
            return {"ok": True, **self.snapshot(), "workers": await self._live_status()}
        if cmd == "down":
            self.log.info("stopping", msg="down requested: stopping all runs")
            self.stop.request("down")
            self.changed()
            return {"ok": True}
        if cmd in ("pause", "resume"):
            if cmd == "pause":
                self.starts.pause()
            else:
                self.starts.resume()
            effect = "held" if cmd == "pause" else "allowed"
            self.log.info(cmd, msg=f"{cmd} requested: new runs {effect}")
            self.changed()
            return {"ok": True, "paused": self.starts.paused}
        if cmd in ("restart", "add"):
            issue = request.get("task")
            if not isinstance(issue, int) or isinstance(issue, bool) or issue <= 0:
                return {"ok": False, "error": f'"{cmd}" needs "task": a positive issue number'}
            worker = self.worker_for(issue)
            if cmd == "restart":
                if worker is None:
                    return {"ok": False, "error": f"task #{issue} is not in this fleet"}
                restart = worker.request_restart()
                if restart is False:
                    return {"ok": False, "error": f"task #{issue} has no run to restart "
                            f"(state {worker.status.state})"}
                if not isinstance(restart, bool) and self._services_tg is not None:
                    self._services_tg.start_soon(worker.stop_run, restart)
                return {"ok": True}
            if worker is not None and not worker.status.state.final:
                return {"ok": False, "error": f"task #{issue} is already in the fleet "
                        f"(state {worker.status.state})"}
            if self.stop.requested.is_set():
                return {"ok": False, "error": "the fleet is stopping"}
            title = request.get("title") or ""
            prompt = request.get("prompt")
            task = TaskConfig(issue=issue, title=str(title),
                              prompt=str(prompt) if prompt else None)
            added = self.add_task(task)
            self.log.info("task-added", msg=f"task #{issue} added as {added.name}", task=issue)
            return {"ok": True, "worker": added.name}
        known = "add, down, pause, restart, resume, status"
        return {"ok": False, "error": f"unknown command {cmd!r}; known: {known}"}

    async def _live_status(self) -> list[dict[str, Any]]:
        rows = []
        now = time.time()
        for worker in self.workers:
            row = worker.status.as_dict()
            handle = worker.current
            row.update(cpu_percent=None, rss_bytes=None, processes=None)
            if handle is not None:
                with contextlib.suppress(Exception):
                    stats = await handle.stats()
                    row.update(cpu_percent=stats.cpu_percent, rss_bytes=stats.rss_bytes,
                               processes=stats.processes)
            last = self.mux.last_output.get(worker.name)
            row["last_output_age"] = None if last is None else round(now - last, 1)
            rows.append(row)
        return rows

    # orphans of a dead supervisor -----------------------------------------------------------

    async def _handle_orphans(self) -> None:
        """Find runs of earlier fleets that died, and adopt or stop those that still live."""
        for info in unfinished_runs(self.config.state_path):
            if info.run_id == self.fleet_id or info.state is None:
                continue
            handled: list[str] = []
            for row in info.state.get("workers", []):
                note = await self._orphan(info.run_id, info.path, row)
                if note:
                    handled.append(note)
            write_json_atomic(
                info.path / "summary.json",
                {
                    **info.state,
                    "ended_at": None,
                    "exit_code": None,
                    "exit_meaning": f"supervisor died; found by fleet {self.fleet_id}",
                    "orphans": handled,
                },
            )

    async def _orphan(self, run_id: str, run_path: Path, row: dict[str, Any]) -> str | None:
        pid, ticks, run_dir = row.get("pid"), row.get("start_ticks"), row.get("run_dir")
        machine = row.get("machine")
        if not (isinstance(pid, int) and isinstance(ticks, int) and run_dir and machine):
            return None
        host = self.hosts.get(machine)
        if host is None:
            if machine != "local":
                self.log.warning("orphan-unknown-machine",
                                 msg=f"run {run_dir} of dead fleet {run_id} is on machine "
                                 f"{machine}, which is no longer configured: left alone")
                return None
            host = LocalHost("local")
        handle = await host.attach(RunIdentity(machine, run_dir, pid, ticks))
        if handle is None:
            return None
        issue = int(row["task"])
        alive = await handle.alive()
        label = f"#{issue} run {row.get('runs')} (pid {pid}) of dead fleet {run_id}"
        worker = self.worker_for(issue)
        if self.config.on_orphans == "stop" or worker is None or worker.adoption is not None:
            if alive:
                await handle.stop(self.config.stop_timeout)
                self.log.info("orphan-stopped", msg=f"■ stopped orphan {label}", task=issue,
                              pid=pid, from_fleet=run_id)
                return f"stopped {label}"
            return None
        offsets, _seq = last_offsets(run_path, str(row.get("worker")), int(row.get("runs") or 0))
        lease = row.get("lease_path")
        if isinstance(lease, str):
            self._extra_leases.setdefault(machine, set()).add(lease)
            with contextlib.suppress(Exception):
                await host.touch_lease(lease)
        worker.adoption = Adoption(
            machine=machine,
            handle=handle,
            run=int(row.get("runs") or 1),
            workspace=str(row.get("workspace")),
            offsets=offsets,
            before=set(row.get("milestones_before") or []),
            from_fleet=run_id,
            lease_path=str(lease),
            milestones=int(row.get("milestones") or 0),
            crashes=int(row.get("crashes") or 0),
        )
        worker.status.adopted_from = run_id
        return f"adopted {label} as {worker.name}"

    def exit_code(self) -> int:
        states = [w.status.state for w in self.workers]
        if states and all(s is WorkerState.DONE for s in states):
            return EXIT_OK
        if self.deadline_hit:
            return EXIT_DEADLINE
        if self.stop.requested.is_set():
            return EXIT_INTERRUPTED
        if not states:
            return EXIT_NOTHING
        return EXIT_FAILED

    def _summary(self) -> dict[str, Any]:
        code = self.exit_code()
        summary = {
            **self.snapshot(),
            "ended_at": time.time(),
            "exit_code": code,
            "exit_meaning": MEANINGS.get(code, ""),
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.write_state()
        return summary

    def _finish(self, summary: dict[str, Any]) -> FleetResult:
        code = int(summary["exit_code"])
        statuses = [w.status for w in self.workers]
        self.log.info("fleet-ended", msg=f"fleet ended: exit {code} ({MEANINGS.get(code)})",
                      exit_code=code)
        self.mux.close()
        return FleetResult(code, self.fleet_id, self.run_dir, statuses,
                           self.stop.requested.is_set())




def last_offsets(run_path: Path, worker: str, run: int) -> tuple[dict[Stream, int], int]:
    """Where a dead fleet's log stopped reading ``worker``'s run ``run``: the last ``off`` per
    stream, and the worker's last ``seq``.  Rotated segments are read too, oldest first."""
    offsets: dict[Stream, int] = {}
    seq = 0
    needle = f'"worker":{json.dumps(worker)},'.encode()
    for _, raw in lines_containing(log_files(run_path), [needle]):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if record.get("worker") != worker:
            continue
        seq = max(seq, int(record.get("seq") or 0))
        stream = record.get("stream")
        if record.get("run") != run:
            continue
        if "off" in record and stream in ("stdout", "stderr"):
            offsets[stream] = int(record["off"])
        elif record.get("event") == "adopted" and isinstance(record.get("offsets"), dict):
            # adopted earlier, by a fleet that then died before logging a new line
            for name, value in record["offsets"].items():
                if name in ("stdout", "stderr"):
                    offsets[name] = int(value)
    return offsets, seq


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
