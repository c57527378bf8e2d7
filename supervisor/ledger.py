"""The ledger: a supervisor's memory of tasks, runs and shifts, written before each act.

A fleet is left overnight and its supervisor may die at any instant (SIGKILL, OOM, a reboot);
the next ``up`` must know what the dead one was doing *at that instant*: which run of which
task it was about to start, which ones it had started, which had ended and how.  A snapshot
written every so often cannot know that (a run started between two snapshots is forgotten and
started twice), so every transition is committed here *before* the act it announces:

* the **intent** of a run (task T, run N, machine M, worktree W, run directory D) before the
  host is asked to start anything; the pid and its start ticks right after the start; the exit
  status and the outcome after the end, in the same transaction as the task's new state;
* every change of a task's state as it happens; a shift's start and end; usage-limit holds and
  machine reachability.

**Why SQLite** (the standard library's ``sqlite3``, no server, one file
``<state_dir>/ledger.sqlite3``, mode 0600): one transaction per transition, so a crash leaves
the old state or the new, never half of each; any number of readers (``status``, ``shifts``,
``report``, ``logs``) while the one writer writes; queries instead of scans of JSON files.

**WAL with ``synchronous=NORMAL``.**  A commit appends the transaction's pages to the
write-ahead log with ``write(2)``; only checkpoints ``fsync``.  A *killed supervisor* loses
nothing committed (the pages are in the kernel's page cache, which outlives the process), and a
commit costs tens of microseconds, not an ``fsync``'s milliseconds: transitions are rare next to
output lines, but a fleet of a thousand short tasks makes thousands of them.  A *power cut* may
lose the last transactions before a checkpoint; what they said is still on the machines: each run
directory carries its own ``meta`` (task, run, shift, worker), ``pid`` and ``exit`` files, and
the next ``up`` scans the run directories for any run the ledger does not know
(:mod:`supervisor.recovery`).  ``synchronous=FULL`` would close that window at an ``fsync`` per
transition; the scan already covers it.

**One writer**: the ``up`` that holds the state directory's lock (:mod:`supervisor.rundir`).
Readers open the file read-only and never create it.  The ledger records transitions, never
output lines: the line path does not touch it.

**A ledger that cannot be written** (a full disk, a file system gone read-only, an I/O error)
is a state, not a crash.  What a failed write means depends on where it stands: a transition
committed *before* an act (a run's intent, an adoption) is the act's licence, so when it cannot
be committed the act does not happen -- :class:`LedgerUnwritable` is raised and the caller
waits (:meth:`Ledger.writable`) and tries again; a transition that records an act *already
done* (a pid, an exit, a task's new state) cannot be undone, so it is kept in memory, in order,
and written again by :meth:`Ledger.retry` (the fleet calls it every :data:`RETRY_INTERVAL`
through :meth:`Ledger.keep_writing`).  ``on_fault`` tells the fleet when writing starts failing
(it holds new starts) and when it works again.  Reads meanwhile see the ledger without what
waits; a supervisor killed meanwhile loses what waits, which the next ``up`` reads back from the
run directories (as after a power cut).

See :mod:`supervisor.ledger_schema` for the tables (a ledger written by a newer version is
refused with :class:`LedgerTooNew`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio

from supervisor.ledger_schema import (
    SCHEMA,
    SCHEMA_VERSION,
    TASK_COLUMNS,
    USAGE_FIELDS,
    RunRecord,
    RunState,
    ShiftRecord,
    TaskRecord,
    WorkerRecord,
    record_of,
)

__all__ = [
    "SCHEMA_VERSION",
    "Ledger",
    "LedgerError",
    "LedgerTooNew",
    "LedgerUnwritable",
    "RunRecord",
    "ShiftRecord",
    "TaskRecord",
    "WorkerRecord",
    "ledger_path",
]

LEDGER_NAME = "ledger.sqlite3"
BUSY_TIMEOUT = 10.0
#: While the ledger cannot be written, a write is tried again this often.
RETRY_INTERVAL: Final = 1.0
_R = TypeVar("_R")
Transition = Callable[["_Tx"], object]


class LedgerError(Exception):
    """The ledger cannot be used; the message names the file and the fix."""


class LedgerTooNew(LedgerError):
    """The ledger was written by a newer agentize-fleet: reading it could misread it."""


class LedgerUnwritable(LedgerError):
    """A transaction could not be committed: the disk is full, the file system read-only, an
    I/O error (SQLite's ``OperationalError``).  A state that passes: the write is tried again."""

    def __init__(self, path: Path, error: sqlite3.Error) -> None:
        self.path = path
        self.error = error
        self.detail = f"{error} ({getattr(error, 'sqlite_errorname', None) or 'SQLITE_ERROR'})"
        super().__init__(_cannot(path, error))


def ledger_path(state_dir: Path) -> Path:
    return state_dir / LEDGER_NAME


class Ledger:
    """The open ledger: the writer (:meth:`open`) or a reader (:meth:`reader`)."""

    def __init__(self, path: Path, connection: sqlite3.Connection, *, writable: bool) -> None:
        self.path = path
        self._db = connection
        self.read_only = not writable
        #: Called with the error when writing starts failing, with None when it works again.
        self.on_fault: Callable[[LedgerUnwritable | None], None] | None = None
        self.fault: LedgerUnwritable | None = None
        self.fault_since = 0.0
        #: Transitions that record acts already done, not yet committed (oldest first).
        self._waiting: list[Transition] = []
        self._next_try = 0.0
        self._waiters: list[anyio.Event] = []
        self._wanted: anyio.Event | None = None

    # opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path) -> Ledger:
        """The writer's ledger (made on first use, mode 0600); only the lock holder opens it."""
        path = ledger_path(state_dir)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.fchmod(fd, 0o600)
            os.close(fd)
        except OSError as exc:
            raise LedgerError(_cannot(path, exc)) from None
        return cls._connect(path, str(path), writable=True)

    @classmethod
    def reader(cls, state_dir: Path) -> Ledger | None:
        """A read-only view for ``status``, ``shifts``, ``report``; None when there is none."""
        path = ledger_path(state_dir)
        if not path.exists():
            return None
        return cls._connect(path, f"file:{_uri_path(path)}?mode=ro", writable=False)

    @classmethod
    def _connect(cls, path: Path, target: str, *, writable: bool) -> Ledger:
        """Open ``target``, set the writer's journal up, check (or make) the schema."""
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(target, uri=not writable, timeout=BUSY_TIMEOUT,
                                 isolation_level=None)
            ledger = cls(path, db, writable=writable)
            if writable:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            ledger._check_version(create=writable)
        except (sqlite3.Error, LedgerError) as exc:
            if db is not None:
                db.close()
            if isinstance(exc, LedgerError):
                raise
            raise LedgerError(_cannot(path, exc)) from None
        return ledger

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _check_version(self, *, create: bool) -> None:
        found = self._version()
        if found is None and create:
            with self._tx() as db:
                db.executescript_in_tx(SCHEMA)
                db.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            return
        if found is None:
            raise LedgerError(
                f"{self.path} is not an agentize-fleet ledger (no schema version); fix: move "
                f"it aside, or point state_dir at another directory"
            )
        if found > SCHEMA_VERSION:
            raise LedgerTooNew(
                f"{self.path} was written by a newer agentize-fleet (ledger version {found}; "
                f"this one reads up to {SCHEMA_VERSION}); fix: upgrade agentize-fleet, or point "
                f"state_dir at another directory"
            )

    def _version(self) -> int | None:
        try:
            row = self._db.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        if row is None:
            return None
        try:
            return int(row[0])
        except ValueError:
            return None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[_Tx]:
        """One transaction: all of it is committed, or none of it.  A write the disk or the
        file system refuses raises :class:`LedgerUnwritable`."""
        if self.read_only:
            raise LedgerError(f"{self.path} is open read-only")
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise LedgerUnwritable(self.path, exc) from None
        except sqlite3.Error as exc:
            raise LedgerError(_cannot(self.path, exc)) from None
        try:
            yield _Tx(self._db)
            self._db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise LedgerUnwritable(self.path, exc) from None
            raise

    # writing, and what a failed write means ----------------------------------------------

    def _commit(self, transition: Callable[[_Tx], _R], *, done: bool) -> _R | None:
        """Commit one transition.

        ``done``: it records an act already done; when it cannot be committed it waits, in
        order after any that wait already, and None is returned.  Otherwise the act it
        announces must not happen unless it is committed: :class:`LedgerUnwritable` is raised
        (after what waits, in order: a transition never overtakes an earlier one).
        """
        if self._waiting:
            if done:
                self._waiting.append(transition)
                if time.monotonic() >= self._next_try:
                    self.retry()
                return None
            if not self.retry():
                assert self.fault is not None
                raise self.fault
        try:
            with self._tx() as db:
                result = transition(db)
        except LedgerUnwritable as exc:
            self._failing(exc)
            if not done:
                raise
            self._waiting.append(transition)
            return None
        if self.fault is not None:
            self._recovered()  # nothing waited: this write was the probe
        return result

    def _failing(self, error: LedgerUnwritable) -> None:
        self._next_try = time.monotonic() + RETRY_INTERVAL
        first = self.fault is None
        self.fault = error
        if not first:
            return
        self.fault_since = time.time()
        if self._wanted is not None:
            self._wanted.set()
        if self.on_fault is not None:
            self.on_fault(error)

    @property
    def waiting(self) -> int:
        """How many transitions wait to be written."""
        return len(self._waiting)

    def retry(self) -> bool:
        """Write the transitions that wait, oldest first, one transaction each (or, when none
        waits, a probe); True once the ledger can be written again."""
        if self.fault is None:
            return True
        self._next_try = time.monotonic() + RETRY_INTERVAL
        try:
            if not self._waiting:
                with self._tx() as db:
                    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('probe', ?)",
                               (str(time.time()),))
            while self._waiting:
                with self._tx() as db:
                    self._waiting[0](db)
                del self._waiting[0]
        except LedgerUnwritable as exc:
            self.fault = exc
            return False
        self._recovered()
        return True

    def _recovered(self) -> None:
        self.fault = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.set()
        if self.on_fault is not None:
            self.on_fault(None)

    async def writable(self) -> None:
        """Return once the ledger can be written (at once when it can)."""
        while self.fault is not None:
            waiter = anyio.Event()
            self._waiters.append(waiter)
            await waiter.wait()

    async def keep_writing(self) -> None:
        """While the ledger cannot be written, try again every :data:`RETRY_INTERVAL`; an
        idle ledger costs no wake-ups.  Runs until cancelled."""
        while True:
            self._wanted = anyio.Event()
            if self.fault is None:
                await self._wanted.wait()
            await anyio.sleep(RETRY_INTERVAL)
            if self.fault is not None and time.monotonic() >= self._next_try - 0.01:
                self.retry()

    def _all(self, cls: type[_R], sql: str, args: Sequence[Any] = ()) -> list[_R]:
        cur = self._db.execute(sql, args)
        return [record_of(cls, r, cur.description) for r in cur.fetchall()]

    def _one(self, cls: type[_R], sql: str, args: Sequence[Any] = ()) -> _R | None:
        found = self._all(cls, sql, args)
        return found[0] if found else None

    def _dicts(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self._db.execute(sql, args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    # shifts ---------------------------------------------------------------------------------

    def begin_shift(self, shift: ShiftRecord) -> list[str]:
        """Record a new shift; shifts left ``running`` (their ``up`` died: we hold the lock)
        become ``died``.  Returns the ids of those.  (Before anything: raises when it cannot
        be written.)"""
        with self._tx() as db:
            died = [r[0] for r in db.execute("SELECT id FROM shifts WHERE state = 'running'")]
            db.execute(
                "UPDATE shifts SET state = 'died', found_by = ? WHERE state = 'running'",
                (shift.id,),
            )
            db.execute(
                "INSERT INTO shifts(id, pid, pid_ticks, host, config, dir, name, concurrency, "
                "started_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')",
                (shift.id, shift.pid, shift.pid_ticks, shift.host, shift.config, shift.dir,
                 shift.name, shift.concurrency, shift.started_at),
            )
        return died

    def end_shift(self, shift_id: str, exit_code: int, meaning: str) -> None:
        values = (time.time(), exit_code, meaning, shift_id)
        self._commit(lambda db: db.execute(
            "UPDATE shifts SET state = 'ended', ended_at = ?, exit_code = ?, "
            "exit_meaning = ? WHERE id = ?", values,
        ), done=True)

    def shifts(self) -> list[ShiftRecord]:
        """Every shift, oldest first."""
        return self._all(ShiftRecord, "SELECT * FROM shifts ORDER BY started_at, id")

    def shift(self, shift_id: str) -> ShiftRecord | None:
        return self._one(ShiftRecord, "SELECT * FROM shifts WHERE id = ?", (shift_id,))

    # tasks ----------------------------------------------------------------------------------

    def tasks(self) -> dict[int, TaskRecord]:
        return {t.issue: t for t in self._all(TaskRecord, "SELECT * FROM tasks ORDER BY issue")}

    def task(self, issue: int) -> TaskRecord | None:
        return self._one(TaskRecord, "SELECT * FROM tasks WHERE issue = ?", (issue,))

    def set_listed(self, issues: Iterable[int]) -> None:
        """Mark which tasks the current config lists (the others stay, unlisted)."""
        listed = [(i,) for i in sorted(set(issues))]

        def mark(db: _Tx) -> None:
            db.execute("UPDATE tasks SET listed = 0")
            db.executemany("UPDATE tasks SET listed = 1 WHERE issue = ?", listed)

        self._commit(mark, done=True)

    def save_task(
        self,
        task: TaskRecord,
        *,
        shift: str,
        worker: str,
        adopted_from: str | None = None,
    ) -> None:
        """A task's new state (and its row in this shift's workers), in one transaction."""
        self.save_tasks([(task, worker, adopted_from)], shift=shift)

    def save_tasks(
        self, items: Sequence[tuple[TaskRecord, str, str | None]], *, shift: str
    ) -> None:
        """Several tasks (task, worker, adopted_from) in one transaction: a shift's start.
        A task's state follows what happened: it waits when it cannot be written."""
        now = time.time()
        rows = [(dataclasses.replace(task), worker, adopted_from)
                for task, worker, adopted_from in items]

        def put(db: _Tx) -> None:
            for task, worker, adopted_from in rows:
                _put_task(db, task, shift, now)
                if worker != "-":
                    _put_worker(db, task, shift, worker, adopted_from)

        self._commit(put, done=True)

    def worker_names(self, issue: int) -> dict[str, str]:
        """Shift -> the name of ``issue``'s worker in it (names differ between shifts)."""
        rows = self._db.execute("SELECT shift, worker FROM workers WHERE issue = ?", (issue,))
        return {str(shift): str(worker) for shift, worker in rows}

    def workers(self, shift: str) -> list[WorkerRecord]:
        return self._all(
            WorkerRecord,
            "SELECT * FROM workers WHERE shift = ? ORDER BY CAST(substr(worker, 2) AS INTEGER)",
            (shift,),
        )

    # runs -----------------------------------------------------------------------------------

    def run_intent(
        self,
        task: TaskRecord,
        *,
        shift: str,
        worker: str,
        machine: str,
        workspace: str | None,
        run_dir_of: Callable[[int], str],
        lease_path: str | None,
        prompt_kind: str,
        milestones_before: Sequence[str],
    ) -> RunRecord:
        """Commit the intent of the task's next run, before anything is started.

        The run's number is the task's counter plus one (runs are numbered per task across
        shifts); ``run_dir_of(number)`` names its run directory.  The task's counter moves in
        the same transaction: a crash leaves both or neither.  The start waits for it: raises
        :class:`LedgerUnwritable` when it cannot be written.
        """
        now = time.time()

        def intent(db: _Tx) -> tuple[int, int, str]:
            row = db.execute(
                "SELECT MAX(number) FROM runs WHERE issue = ?", (task.issue,)
            ).fetchone()
            number = max(task.runs, int(row[0] or 0)) + 1
            run_dir = run_dir_of(number)
            cur = db.execute(
                "INSERT INTO runs(issue, number, shift, worker, machine, workspace, run_dir, "
                "lease_path, prompt_kind, milestones_before, state, intent_at, supervised_by, "
                "supervisors) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'intent', ?, ?, ?)",
                (task.issue, number, shift, worker, machine, workspace, run_dir, lease_path,
                 prompt_kind, json.dumps(sorted(milestones_before)), now, shift,
                 json.dumps([shift])),
            )
            _put_task(db, dataclasses.replace(task, runs=number), shift, now)
            _put_worker(db, task, shift, worker, None)
            return int(cur.lastrowid or 0), number, run_dir

        committed = self._commit(intent, done=False)
        assert committed is not None
        run_id, number, run_dir = committed
        task.runs = number
        task.first_shift, task.last_shift = task.first_shift or shift, shift
        return RunRecord(
            id=run_id, issue=task.issue, number=number, shift=shift, worker=worker,
            machine=machine, workspace=workspace, run_dir=run_dir, lease_path=lease_path,
            prompt_kind=prompt_kind, milestones_before=tuple(sorted(milestones_before)),
            state="intent", pid=None, start_ticks=None, intent_at=now, started_at=None,
            ended_at=None, exit_code=None, lost=False, outcome=None, reason="",
            supervised_by=shift, supervisors=(shift,),
        )

    def run_started(self, run_id: int, pid: int, start_ticks: int) -> None:
        values = (pid, start_ticks, time.time(), run_id)
        self._commit(lambda db: db.execute(
            "UPDATE runs SET state = 'running', pid = ?, start_ticks = ?, started_at = ? "
            "WHERE id = ?", values,
        ), done=True)

    def run_ended(
        self,
        run_id: int,
        *,
        state: RunState = "ended",
        exit_code: int | None = None,
        lost: bool = False,
        outcome: str | None = None,
        reason: str = "",
        task: TaskRecord | None = None,
        shift: str | None = None,
        worker: str | None = None,
    ) -> None:
        """A run's end (or abandonment) and, in the same transaction, its task's new state."""
        now = time.time()
        values = (state, now, exit_code, int(lost), outcome, reason, run_id)
        task = dataclasses.replace(task) if task is not None else None

        def end(db: _Tx) -> None:
            db.execute(
                "UPDATE runs SET state = ?, ended_at = ?, exit_code = ?, lost = ?, outcome = ?, "
                "reason = ? WHERE id = ?", values,
            )
            if task is not None:
                assert shift is not None and worker is not None
                _put_task(db, task, shift, now)
                _put_worker(db, task, shift, worker, None)

        self._commit(end, done=True)

    def run_supervised(self, run_id: int, shift: str) -> None:
        """``shift`` watches the run from now on (it adopted it).  Its output is logged only
        once this is written (a later adopter reads the logs of the shifts named here, to know
        where to resume): raises :class:`LedgerUnwritable` when it cannot be."""

        def supervise(db: _Tx) -> None:
            row = db.execute("SELECT supervisors FROM runs WHERE id = ?", (run_id,)).fetchone()
            chain = list(json.loads(row[0])) if row else []
            if shift not in chain:
                chain.append(shift)
            db.execute(
                "UPDATE runs SET supervised_by = ?, supervisors = ? WHERE id = ?",
                (shift, json.dumps(chain), run_id),
            )

        self._commit(supervise, done=False)

    def record_usage(self, run_id: int, usage: Mapping[str, Any]) -> None:
        """What an agent kind reported of a run (session, cost, tokens, turns)."""
        unknown = set(usage) - set(USAGE_FIELDS)
        if unknown:
            raise ValueError(f"unknown usage fields: {sorted(unknown)}")
        if not usage:
            return
        names = sorted(usage)
        sql = f"UPDATE runs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?"
        values = (*(usage[n] for n in names), run_id)
        self._commit(lambda db: db.execute(sql, values), done=True)

    def run(self, run_id: int) -> RunRecord | None:
        return self._one(RunRecord, "SELECT * FROM runs WHERE id = ?", (run_id,))

    def open_runs(self) -> list[RunRecord]:
        """Runs in ``intent`` or ``running``, whichever shift made them, oldest first."""
        return self._all(
            RunRecord, "SELECT * FROM runs WHERE state IN ('intent', 'running') ORDER BY id"
        )

    def runs(self, *, issue: int | None = None, shift: str | None = None) -> list[RunRecord]:
        where: list[str] = []
        args: list[Any] = []
        if issue is not None:
            where.append("issue = ?")
            args.append(issue)
        if shift is not None:
            where.append("(shift = ? OR supervisors LIKE ?)")
            args += [shift, f'%"{shift}"%']
        sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "")
        return self._all(RunRecord, sql + " ORDER BY id", args)

    def run_by_dir(self, run_dir: str) -> RunRecord | None:
        return self._one(RunRecord, "SELECT * FROM runs WHERE run_dir = ?", (run_dir,))

    # machines ---------------------------------------------------------------------------------

    def hold(
        self, machine: str, reason: str, until: float, *, shift: str, line: str | None = None
    ) -> None:
        values = (machine, reason, time.time(), until, shift, line)
        self._commit(lambda db: db.execute(
            "INSERT INTO holds(machine, reason, since, until, shift, line) "
            "VALUES (?, ?, ?, ?, ?, ?)", values,
        ), done=True)

    def holds(self, *, active_at: float | None = None) -> list[dict[str, Any]]:
        if active_at is None:
            return self._dicts("SELECT * FROM holds ORDER BY id")
        return self._dicts("SELECT * FROM holds WHERE until > ? ORDER BY id", (active_at,))

    def machine_event(self, machine: str, state: str, *, shift: str, detail: str = "") -> None:
        values = (machine, state, time.time(), shift, detail)
        self._commit(lambda db: db.execute(
            "INSERT INTO machine_events(machine, state, at, shift, detail) "
            "VALUES (?, ?, ?, ?, ?)", values,
        ), done=True)

    def machine_events(
        self, machine: str | None = None, *, shift: str | None = None
    ) -> list[dict[str, Any]]:
        """Reachability changes, oldest first (of one machine, of one shift)."""
        where = [(c, v) for c, v in (("machine", machine), ("shift", shift)) if v is not None]
        sql = "SELECT * FROM machine_events"
        if where:
            sql += " WHERE " + " AND ".join(f"{c} = ?" for c, _ in where)
        return self._dicts(sql + " ORDER BY id", [v for _, v in where])


class _Tx:
    """The connection inside one transaction (``executescript`` would commit it: not here)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, args)

    def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return self._db.executemany(sql, args)

    def executescript_in_tx(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)


_TASK_NAMES = (*TASK_COLUMNS, "updated_at")
_PUT_TASK = (
    f"INSERT INTO tasks({', '.join(_TASK_NAMES)}) VALUES ({', '.join('?' * len(_TASK_NAMES))}) "
    "ON CONFLICT(issue) DO UPDATE SET "
    + ", ".join(f"{n} = excluded.{n}" for n in _TASK_NAMES if n not in ("issue", "first_shift"))
)


def _put_task(db: _Tx, task: TaskRecord, shift: str, now: float) -> None:
    task.first_shift, task.last_shift = task.first_shift or shift, shift
    values = {name: getattr(task, name) for name in TASK_COLUMNS}
    values["history"] = json.dumps(task.history)
    values["listed"] = int(task.listed)
    db.execute(_PUT_TASK, [*values.values(), now])


def _put_worker(
    db: _Tx, task: TaskRecord, shift: str, worker: str, adopted_from: str | None
) -> None:
    db.execute(
        "INSERT INTO workers(shift, worker, issue, state, reason, adopted_from, started_at, "
        "ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(shift, worker) DO UPDATE SET "
        "state = excluded.state, reason = excluded.reason, "
        "adopted_from = COALESCE(excluded.adopted_from, workers.adopted_from), "
        "started_at = COALESCE(workers.started_at, excluded.started_at), "
        "ended_at = excluded.ended_at",
        (shift, worker, task.issue, task.state, task.reason, adopted_from, task.started_at,
         task.ended_at),
    )




def _uri_path(path: Path) -> str:
    from urllib.parse import quote

    return quote(str(path.resolve()))


def _cannot(path: Path, exc: BaseException) -> str:
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (
        f"cannot use the ledger {path}: {detail}; fix: make its state directory writable by "
        f"you (and the disk not full), or point state_dir at another directory"
    )
