"""One shift: one start of ``agentize-fleet up``, the top task group that owns every worker.

Orchestration only -- the start-up order, the task groups, shutdown; every rule lives in the
module that owns it (machines in :mod:`supervisor.machines`, what earlier shifts left behind in
:mod:`supervisor.recovery`, the control commands in :mod:`supervisor.commands`, a task's life in
:mod:`supervisor.worker`, the durable record in :mod:`supervisor.ledger`).

Start-up order (the caller, ``cli.cmd_up``, has made the state directory private and holds its
lock): the ledger records the shift (shifts a dead ``up`` left running become ``died``) and
which tasks the config lists; the machines are connected and claimed; **recovery** deals with
every run earlier shifts left -- adopted runs take their slots at once -- and only then do the
workers start, and new runs with them.  SIGINT/SIGTERM stop the fleet in order (a second one
skips the wait); the shift ends with ``summary.json``, the report and a clean-up of leases,
watchdogs and claims.  Exit codes: :mod:`supervisor.exitcodes`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.abc

from supervisor import commands, control, report, spend, stall, watches
from supervisor.agents.render import render_line
from supervisor.config import FleetConfig, TaskConfig
from supervisor.console import ConsoleRenderer
from supervisor.exitcodes import (
    EXIT_DEADLINE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOTHING,
    EXIT_OK,
    EXIT_USAGE,
    MEANINGS,
)
from supervisor.hosts.base import Host, RunHandle
from supervisor.hosts.local import use_pidfd_child_watcher
from supervisor.hosts.runfiles import read_start_ticks
from supervisor.ledger import RETRY_INTERVAL as LEDGER_RETRY
from supervisor.ledger import Ledger, LedgerUnwritable, ShiftRecord, TaskRecord
from supervisor.lifecycle import WorkerState
from supervisor.limits import LimitDetector, LimitPatterns, shared_detector
from supervisor.logwriter import LogMux, LogUnwritable, Tag, route_structlog
from supervisor.machines import Machines, build_hosts
from supervisor.outcome import WorkerStatus, usage_wait_too_long
from supervisor.recovery import Recovery, recover
from supervisor.rundir import (
    StateDirUnusable,
    prepare_socket_dir,
    prepare_state_dir,
    write_json_atomic,
)
from supervisor.scheduling import SlotPool, StartGate, StartsGate, StopControl
from supervisor.worker import Worker
from supervisor.workspace import Clone

CLEANUP_TIMEOUT = 15.0
_AGAIN = frozenset({"failed", "stopped", "lost"})


@dataclass(frozen=True)
class Deadline:
    """``soft``: no new run starts after it; ``hard``: running ones are stopped (epoch seconds)."""

    soft: float | None = None
    hard: float | None = None


def new_shift_id() -> str:
    """``20261128-070712-345-c8``: sorts by start time (to the millisecond), then is unique."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{stamp}-{int(now * 1000) % 1000:03d}-{secrets.token_hex(1)}"


@dataclass
class FleetResult:
    exit_code: int
    shift_id: str
    run_dir: Path
    workers: list[WorkerStatus]


class Fleet:
    """Everything one ``up`` owns (it is the ``FleetServices`` its workers see)."""

    make_hosts = staticmethod(build_hosts)

    def __init__(
        self,
        config: FleetConfig,
        *,
        console: TextIO | None = None,
        colour: bool | None = None,
        hosts: Mapping[str, Host] | None = None,
        deadline: Deadline | None = None,
        watch: Callable[[], Awaitable[list[TaskConfig]]] | None = None,
        rerun: Iterable[int] = (),
        fresh: bool = False,
    ) -> None:
        self.config = config
        self.watch = watch
        self.deadline = deadline or Deadline()
        # First: a state directory, ledger or log that cannot be used ends `up` before
        # anything (exit 2 with a message: StateDirUnusable, LedgerError, LogUnwritable).
        prepare_state_dir(config.state_path)
        self.ledger = Ledger.open(config.state_path)
        self.shift_id = new_shift_id()
        self.run_dir = config.state_path / "runs" / self.shift_id
        self.gate = StartGate(config.start_interval)
        self.stop = StopControl()
        self.starts = StartsGate()
        width = max(
            [len(f"w{len(config.tasks.items)} #{t.issue}") for t in config.tasks.items] + [5]
        )
        # Stream-JSON agents are shown as people read them; plain text agents as they print.
        lines = render_line if config.agent.kind != "command" else None
        renderer = (
            ConsoleRenderer(console, colour=colour, width=width, line_renderer=lines)
            if console
            else None
        )
        self.started_at = time.time()
        try:
            self.died = self.ledger.begin_shift(self._shift_record())
            self.mux = self._open_log(renderer)
        except BaseException:
            self.ledger.close()
            raise
        self.log = self.mux.logger(Tag("fleet", None, "-", 0))
        self.ledger.on_fault = self._ledger_fault
        route_structlog(self.mux)
        self.pool = SlotPool(config.concurrency, {})
        self.machines = Machines(
            config,
            shift_id=self.shift_id,
            shift_dir=self.run_dir,
            pool=self.pool,
            ledger=self.ledger,
            log=self.log,
            hosts=hosts,
        )
        self.workers: list[Worker] = []
        self.unlisted: list[TaskRecord] = []
        self.deadline_hit = False
        self._services: anyio.abc.TaskGroup | None = None
        self._workers_tg: anyio.abc.TaskGroup | None = None
        self._limit_patterns = LimitPatterns(
            usage=tuple(config.agent.usage_limit_patterns or LimitPatterns().usage),
            rate=tuple(config.agent.rate_limit_patterns or LimitPatterns().rate),
        )
        self._plan(config.tasks.items, set(rerun), fresh)
        self._write_state("shift.json", self.run_dir, self._shift_info())

    # construction ----------------------------------------------------------------------

    def _open_log(self, renderer: ConsoleRenderer | None) -> LogMux:
        """The shift's directory and its log.  When either cannot be made, the shift ends
        there (exit 2, recorded in the ledger) and leaves no directory behind."""
        try:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateDirUnusable(
                    self.run_dir,
                    f"cannot be made ({exc.strerror})",
                    "make the state directory writable by you and give its disk room, or "
                    "point state_dir at another directory",
                    "the shift's directory",
                ) from None
            return LogMux(
                self.shift_id,
                self.run_dir / "fleet.jsonl",
                renderer,
                rotate_bytes=self.config.log_rotate_bytes,
                on_fault=self._log_fault,
            )
        except (StateDirUnusable, LogUnwritable) as exc:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()
            self.ledger.end_shift(self.shift_id, EXIT_USAGE, str(exc))
            raise

    def _shift_record(self) -> ShiftRecord:
        return ShiftRecord(
            id=self.shift_id,
            pid=os.getpid(),
            pid_ticks=read_start_ticks(os.getpid()),
            host=socket.gethostname(),
            config=str(self.config.source_file),
            dir=str(self.run_dir),
            name=self.config.name,
            concurrency=self.config.concurrency,
            started_at=self.started_at,
            ended_at=None,
            exit_code=None,
            exit_meaning=None,
            state="running",
            found_by=None,
        )

    def _shift_info(self) -> dict[str, Any]:
        """``shift.json``: who runs this shift, so that ``logs -f`` can tell whether it lives."""
        record = self._shift_record()
        return {
            "id": self.shift_id,
            "fleet": self.shift_id,
            "pid": record.pid,
            "pid_ticks": record.pid_ticks,
            "host": record.host,
            "started_at": self.started_at,
            "config": record.config,
            "name": self.config.name,
            "workers": [{"worker": w.name, "task": w.task.issue} for w in self.workers],
        }

    def _plan(self, tasks: list[TaskConfig], rerun: set[int], fresh: bool) -> None:
        """A worker per task the config lists, as the ledger remembers it: a done task is not
        run again unless asked; a failed, stopped or lost one starts again; one still going
        goes on.  Tasks the config no longer lists are reported, not dropped."""
        records = self.ledger.tasks()
        listed = {t.issue for t in tasks}
        self.ledger.set_listed(listed)
        for task in tasks:
            record = records.get(task.issue)
            anew = fresh or task.issue in rerun
            again = anew or (record is not None and record.state in _AGAIN)
            self._new_worker(task, record, again, "config", anew=anew)
            if record is None:
                continue
            if record.state == WorkerState.DONE:
                self.log.info(
                    "task-done-before",
                    msg=f"task #{task.issue} was done in shift {record.last_shift}: "
                    + (
                        "run again as asked"
                        if again
                        else f"not started again (`up --rerun {task.issue}` runs it again)"
                    ),
                    task=task.issue,
                )
            elif record.state in _AGAIN:
                self.log.info(
                    "task-again",
                    msg=f"task #{task.issue} ended {record.state} in "
                    f"shift {record.last_shift}: starting it again",
                    task=task.issue,
                )
        for record in records.values():
            if record.issue in listed:
                continue
            if record.origin == "add" and not WorkerState(record.state).final:
                task = TaskConfig(
                    issue=record.issue, title=record.title, prompt=record.prompt, machine=record.pin
                )
                self._new_worker(task, record, False, "add")
                self.log.info(
                    "task-carried",
                    msg=f"task #{record.issue} (added by `add`) is not finished: carried on",
                    task=record.issue,
                )
            elif record.state != WorkerState.DONE:
                self.unlisted.append(record)
                self.log.warning(
                    "task-unlisted",
                    msg=f"task #{record.issue} is in the ledger but no longer in the config: "
                    f"left as it was ({record.state})",
                    task=record.issue,
                )
        self.ledger.save_tasks(
            [(w.record(), w.name, None) for w in self.workers], shift=self.shift_id
        )

    def _new_worker(
        self,
        task: TaskConfig,
        record: TaskRecord | None,
        again: bool,
        origin: str,
        *,
        anew: bool = False,
    ) -> Worker:
        worker = Worker(
            f"w{len(self.workers) + 1}",
            task,
            self,
            record=record,
            again=again,
            anew=anew,
            origin=origin,
        )
        self.workers.append(worker)
        return worker

    def add_task(
        self,
        task: TaskConfig,
        *,
        record: TaskRecord | None = None,
        again: bool = False,
        origin: str = "config",
    ) -> Worker:
        """Queue a task; once the fleet runs, its worker starts at once (``add``, ``--watch``)."""
        worker = self._new_worker(task, record, again, origin)
        worker.persist()
        if self._workers_tg is not None:
            self._workers_tg.start_soon(worker.run)
        return worker

    def requeue(self, worker: Worker) -> None:
        if worker.requeue() and self._workers_tg is not None:
            self._workers_tg.start_soon(worker.run)

    def worker_for(self, issue: int) -> Worker | None:
        for worker in self.workers:
            if worker.task.issue == issue:
                return worker
        return None

    adopter_for = worker_for

    def stop_run_soon(self, worker: Worker, handle: RunHandle) -> None:
        if self._services is not None:
            self._services.start_soon(worker.stop_run, handle)

    # FleetServices ---------------------------------------------------------------------

    @property
    def hosts(self) -> dict[str, Host]:
        return self.machines.hosts

    async def clone_on(self, machine: str) -> Clone:
        return await self.machines.clone_on(machine)

    async def run_root(self, machine: str) -> str:
        return await self.machines.run_root(machine)

    async def lease_path(self, machine: str) -> str:
        return await self.machines.lease_path(machine)

    def limit_detector(self, machine: str) -> LimitDetector:
        view = self.machines.get(machine)
        return shared_detector(self._limit_patterns, view.timezone if view else None)

    def pause_machine(self, machine: str, until: float, reason: str, line: str) -> None:
        self.machines.hold(machine, until, reason, line)

    @property
    def given_up(self) -> StopControl:
        return self.machines.abandon

    async def machine_up(self, machine: str) -> bool:
        return await self.machines.wait_up(machine)

    def machine_away(self, machine: str) -> str:
        view = self.machines.get(machine)
        return view.away if view is not None else ""

    def supervised_runs(self) -> dict[str, list[str]]:
        """Machine -> the run directories this shift supervises now (each worker's current
        run): exactly the runs whose leases it renews."""
        found: dict[str, list[str]] = {}
        for worker in self.workers:
            handle = worker.current
            if handle is not None:
                found.setdefault(handle.identity.host, []).append(handle.identity.run_dir)
        return found

    def adopted_run_ended(self, machine: str, lease: str | None) -> None:
        self.machines.drop_lease(machine, lease)

    def close_starts(self, reason: str) -> None:
        """No new run starts any more (a usage hold longer than ``max_usage_wait``, a cost
        limit): running runs end, waiting tasks stop waiting, ``up`` exits 5."""
        if not self.starts.closed:
            self.log.warning("starts-closed", msg=f"■ no new runs: {reason}", reason=reason)
        self.starts.close(reason)
        self.wake_workers()

    def wake_workers(self) -> None:
        """New runs were closed: a task waiting out a backoff or a usage hold stops waiting
        (it would never start again), so the shift ends with its running runs."""
        for worker in self.workers:
            worker.wake()

    @property
    def stallable(self) -> list[Worker]:
        return self.workers

    def stop_stalled(self, handle: RunHandle) -> None:
        if self._services is not None:
            self._services.start_soon(handle.stop, self.config.stop_timeout)

    # the shift ---------------------------------------------------------------------------

    async def run(self) -> FleetResult:
        """Run every task to its end (or until stopped) and return the result."""
        recovery = Recovery([], {})
        try:
            use_pidfd_child_watcher()
            async with anyio.create_task_group() as services:
                self._services = self.machines.tg = services
                services.start_soon(self.mux.flush_periodically)
                services.start_soon(self.ledger.keep_writing)
                services.start_soon(watches.handle_signals, self)
                await self.machines.preflight()
                self._fail_without_machines()
                recovery = await recover(self, self.died)
                self._close_dead_shifts(recovery)
                services.start_soon(self.machines.keep_leases, self.supervised_runs)
                services.start_soon(watches.keep_deadlines, self)
                services.start_soon(watches.give_up_when_stuck, self)
                services.start_soon(stall.watch, self)
                self._restore_holds()
                await self._serve_control(services)
                self.log.info(
                    "fleet-started",
                    msg=f"fleet {self.shift_id}: {len(self.workers)} task(s), cap "
                    f"{self.config.concurrency}, machines {self.machines.summary()}",
                    run_dir=str(self.run_dir),
                )
                async with anyio.create_task_group() as workers:
                    self._workers_tg = workers
                    for worker in self.workers:
                        workers.start_soon(worker.run)
                    if self.watch is not None:
                        workers.start_soon(watches.watch_source, self)
                self._workers_tg = None
                services.cancel_scope.cancel()
            summary = self._summary()
            self.mux.flush()  # every record on disk before the report, however that ends
            await report.write_and_notify(
                summary,
                self.run_dir,
                self.hosts,
                self.config,
                self.log,
                default_branch=self.machines.default_branches(),
            )
        finally:
            self._services = self.machines.tg = None  # that task group has ended
            # However the shift ends (a second Ctrl-C included): each watchdog checks that no
            # run it guards is left before it goes.  Signals only queue up meanwhile: the
            # clean-up is short and bounded, and a Ctrl-C landing in it must not cut it off
            # (a watchdog left until its next look, a claim until its lease lapses).
            with (
                anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM),
                anyio.CancelScope(shield=True),
            ):
                with anyio.move_on_after(CLEANUP_TIMEOUT):
                    await self.machines.dismiss_all(recovery.leases)
                lost = {
                    w.status.machine
                    for w in self.workers
                    if w.status.state is WorkerState.LOST and w.status.machine
                }
                with anyio.move_on_after(CLEANUP_TIMEOUT):
                    await self.machines.release_claims(lost)
                await self.machines.aclose()
        return self._finish(summary)

    async def _serve_control(self, services: anyio.abc.TaskGroup) -> None:
        """The control socket.  One that cannot be made (no room, a directory that refuses)
        costs the commands that steer the fleet, not the shift: a line says so."""
        path = prepare_socket_dir(self.config.state_path)
        try:
            await services.start(control.serve, path, self.handle_request)
        except OSError as exc:
            self.log.error(
                "control-unavailable",
                msg=f"✗ cannot make the control socket {path}: {exc.strerror or exc}; "
                "`status`, `down`, `pause` and `add` cannot reach this fleet (Ctrl-C or SIGTERM "
                "stop it)",
                error=str(exc),
            )

    def _restore_holds(self) -> None:
        """Usage holds of earlier shifts still in force hold this one too; one longer than
        ``max_usage_wait`` ends it at once (exit 5), as it would have ended the shift that met
        it."""
        limit = self.config.max_usage_wait
        for machine, until in self.machines.restore_holds().items():
            if until - time.time() > limit:
                self.close_starts(usage_wait_too_long(machine, until, limit))

    def _fail_without_machines(self) -> None:
        if any(self.pool.capacity.values()):
            return
        self.log.error("no-machines", msg="✗ no machine can run agents: every task fails")
        for worker in self.workers:
            if not worker.status.state.final:
                worker.status.state = WorkerState.FAILED
                worker.status.reason = "no usable machine"
                worker.persist()

    def _close_dead_shifts(self, recovery: Recovery) -> None:
        """Give each shift whose ``up`` died a ``summary.json`` saying so, and what this shift
        did with the runs it left (the ledger has marked it ``died``)."""
        for shift_id in self.died:
            shift_dir = self.config.state_path / "runs" / shift_id
            if shift_dir.is_dir():
                notes = [note for shift, note in recovery.notes if shift == shift_id]
                self._write_state(
                    "summary.json",
                    shift_dir,
                    report.dead_shift_summary(
                        self.ledger, shift_id, shift_dir, found_by=self.shift_id, notes=notes
                    ),
                )

    # steering ---------------------------------------------------------------------------------

    async def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one control-socket request (the commands' table: ``commands.py``)."""
        return await commands.dispatch(self, request)

    def snapshot(self) -> dict[str, Any]:
        return {
            "fleet": self.shift_id,
            "shift": self.shift_id,
            "name": self.config.name,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "run_dir": str(self.run_dir),
            "config": str(self.config.base_dir),
            "concurrency": self.config.concurrency,
            "stopping": self.stop.requested.is_set(),
            "paused": self.starts.paused,
            "held": dict(self.starts.holds),
            "machines": [{"name": v.name, "reach": v.reach, "away": v.away} for v in self.machines],
            "deadline": {"soft": self.deadline.soft, "hard": self.deadline.hard},
            "peak_running": self.pool.peak,
            "workers": [w.status.as_dict() for w in self.workers],
        }

    # faults: the log or the ledger cannot be written ---------------------------------------

    def _log_fault(self, error: OSError | None) -> None:
        """The log cannot be written (the writer's own line says so): no new runs meanwhile --
        a run started now could not be recorded -- while running ones go on."""
        self._hold_starts("log", None if error is None else "the log cannot be written")

    def _ledger_fault(self, error: LedgerUnwritable | None) -> None:
        """The ledger cannot be written: no new runs meanwhile (a run's intent must be written
        before its start); what running ones do waits in memory and is written when it can."""
        if error is not None:
            self.log.error(
                "ledger-unwritable",
                msg=f"✗ cannot write the ledger {error.path}: {error.detail}; no new runs "
                "meanwhile, running agents go on (how their runs end is written to the ledger "
                f"when it can be: tried again every {LEDGER_RETRY:g}s)",
                error=error.detail,
            )
        else:
            self.log.info(
                "ledger-writable",
                msg=f"✓ the ledger {self.ledger.path} can be written again after "
                f"{time.time() - self.ledger.fault_since:.0f}s",
            )
        self._hold_starts("ledger", None if error is None else "the ledger cannot be written")

    def _hold_starts(self, key: str, why: str | None) -> None:
        """Hold new runs for ``key`` (``why``), or end that hold (None); say when they may
        start again."""
        if why is not None:
            self.starts.hold(key, why)
        elif self.starts.release(key) and not self.starts.holds:
            self.log.info("starts-resumed", msg="▶ new runs allowed again")

    def _write_state(self, name: str, shift_dir: Path, data: dict[str, Any]) -> None:
        """Write a shift's ``shift.json`` or ``summary.json``; a disk that refuses it costs a
        line in the log, never the shift (the ledger has what they say)."""
        try:
            write_json_atomic(shift_dir / name, data)
        except OSError as exc:
            self.log.warning(
                "state-file-unwritable",
                msg=f"✗ cannot write {shift_dir / name}: {exc.strerror or exc}; the ledger has "
                f"what it says (`agentize-fleet report --shift {shift_dir.name}`)",
                error=str(exc),
            )

    # the end ----------------------------------------------------------------------------------

    def exit_code(self) -> int:
        states = [w.status.state for w in self.workers]
        if states and all(s is WorkerState.DONE for s in states):
            return EXIT_OK
        if self.deadline_hit or self.starts.closed:  # a deadline, a usage hold, a cost limit
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
            "not_in_config": [
                {"task": r.issue, "title": r.title, "state": r.state, "reason": r.reason}
                for r in self.unlisted
            ],
            "machine_events": self.ledger.machine_events(shift=self.shift_id),
            "starts_closed": self.starts.closed_reason or None,
            "holds": self.ledger.holds(shift=self.shift_id),
            "runs": spend.run_rows(self.ledger, self.shift_id),
        }
        self._write_state("summary.json", self.run_dir, summary)
        self.ledger.end_shift(self.shift_id, code, MEANINGS.get(code, ""))
        return summary

    def _finish(self, summary: dict[str, Any]) -> FleetResult:
        code = int(summary["exit_code"])
        if not self.ledger.retry():
            self.log.error(
                "ledger-unwritten",
                msg=f"✗ {self.ledger.waiting} transitions could not be written to the ledger "
                f"{self.ledger.path} ({self.ledger.fault.detail if self.ledger.fault else ''});"
                " the next `up` reads how the runs ended from their run directories",
            )
        self.log.info(
            "fleet-ended", msg=f"fleet ended: exit {code} ({MEANINGS.get(code)})", exit_code=code
        )
        self.mux.close()
        self.ledger.close()
        return FleetResult(code, self.shift_id, self.run_dir, [w.status for w in self.workers])
