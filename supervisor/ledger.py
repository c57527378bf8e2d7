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
is a state, not a crash: a transition that announces an act raises :class:`LedgerUnwritable`
(the act waits), one that records an act already done waits in memory and is written later
(:mod:`supervisor.ledger_tx`, the discipline of every write).

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from supervisor.ledger_schema import (
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    SUMMED_FIELDS,
    TASK_COLUMNS,
    USAGE_FIELDS,
    RunRecord,
    RunState,
    ShiftRecord,
    TaskRecord,
    TaskUsage,
    WorkerRecord,
    record_of,
)
from supervisor.ledger_tx import (
    RETRY_INTERVAL,
    Committer,
    LedgerError,
    LedgerUnwritable,
    Tx,
    cannot_use,
)

__all__ = [
    "RETRY_INTERVAL",
    "SCHEMA_VERSION",
    "Ledger",
    "LedgerError",
    "LedgerTooNew",
    "LedgerUnwritable",
    "RunRecord",
    "ShiftRecord",
    "TaskRecord",
    "TaskUsage",
    "WorkerRecord",
    "ledger_path",
]

LEDGER_NAME = "ledger.sqlite3"
BUSY_TIMEOUT = 10.0
_R = TypeVar("_R")


class LedgerTooNew(LedgerError):
    """The ledger was written by a newer agentize-fleet: reading it could misread it."""


def ledger_path(state_dir: Path) -> Path:
    return state_dir / LEDGER_NAME


class Ledger(Committer):
    """The open ledger: the writer (:meth:`open`) or a reader (:meth:`reader`)."""

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
            raise LedgerError(cannot_use(path, exc)) from None
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
            db = sqlite3.connect(
                target, uri=not writable, timeout=BUSY_TIMEOUT, isolation_level=None
            )
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
            raise LedgerError(cannot_use(path, exc)) from None
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
        if found < SCHEMA_VERSION and create:
            with self._tx() as db:
                for version in range(found, SCHEMA_VERSION):
                    for statement in MIGRATIONS[version]:
                        db.execute(statement)
                db.execute(
                    "UPDATE meta SET value = ? WHERE key = 'schema_version'",
                    (str(SCHEMA_VERSION),),
                )

    def _version(self) -> int | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
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
                (
                    shift.id,
                    shift.pid,
                    shift.pid_ticks,
                    shift.host,
                    shift.config,
                    shift.dir,
                    shift.name,
                    shift.concurrency,
                    shift.started_at,
                ),
            )
        return died

    def end_shift(self, shift_id: str, exit_code: int, meaning: str) -> None:
        values = (time.time(), exit_code, meaning, shift_id)
        self._commit(
            lambda db: db.execute(
                "UPDATE shifts SET state = 'ended', ended_at = ?, exit_code = ?, "
                "exit_meaning = ? WHERE id = ?",
                values,
            ),
            done=True,
        )

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

        def mark(db: Tx) -> None:
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
        rows = [
            (dataclasses.replace(task), worker, adopted_from)
            for task, worker, adopted_from in items
        ]

        def put(db: Tx) -> None:
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
        agent_kind: str | None = None,
        session_id: str | None = None,
        resumed_from: str | None = None,
    ) -> RunRecord:
        """Commit the intent of the task's next run, before anything is started.

        The run's number is the task's counter plus one (runs are numbered per task across
        shifts); ``run_dir_of(number)`` names its run directory.  The task's counter moves in
        the same transaction: a crash leaves both or neither.  ``session_id`` is the agent
        session the run will be in when it is known before the start (pinned, or resumed
        from ``resumed_from``): a run killed before its first line can still be resumed.  The
        start waits for it: raises :class:`LedgerUnwritable` when it cannot be written.
        """
        now = time.time()

        def intent(db: Tx) -> tuple[int, int, str]:
            row = db.execute(
                "SELECT MAX(number) FROM runs WHERE issue = ?", (task.issue,)
            ).fetchone()
            number = max(task.runs, int(row[0] or 0)) + 1
            run_dir = run_dir_of(number)
            cur = db.execute(
                "INSERT INTO runs(issue, number, shift, worker, machine, workspace, run_dir, "
                "lease_path, prompt_kind, milestones_before, state, intent_at, supervised_by, "
                "supervisors, agent_kind, session_id, resumed_from) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'intent', ?, ?, ?, ?, ?, ?)",
                (
                    task.issue,
                    number,
                    shift,
                    worker,
                    machine,
                    workspace,
                    run_dir,
                    lease_path,
                    prompt_kind,
                    json.dumps(sorted(milestones_before)),
                    now,
                    shift,
                    json.dumps([shift]),
                    agent_kind,
                    session_id,
                    resumed_from,
                ),
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
            id=run_id,
            issue=task.issue,
            number=number,
            shift=shift,
            worker=worker,
            machine=machine,
            workspace=workspace,
            run_dir=run_dir,
            lease_path=lease_path,
            prompt_kind=prompt_kind,
            milestones_before=tuple(sorted(milestones_before)),
            state="intent",
            pid=None,
            start_ticks=None,
            intent_at=now,
            started_at=None,
            ended_at=None,
            exit_code=None,
            lost=False,
            outcome=None,
            reason="",
            supervised_by=shift,
            supervisors=(shift,),
            agent_kind=agent_kind,
            session_id=session_id,
            resumed_from=resumed_from,
        )

    def run_started(self, run_id: int, pid: int, start_ticks: int) -> None:
        values = (pid, start_ticks, time.time(), run_id)
        self._commit(
            lambda db: db.execute(
                "UPDATE runs SET state = 'running', pid = ?, start_ticks = ?, started_at = ? "
                "WHERE id = ?",
                values,
            ),
            done=True,
        )

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
        usage: Mapping[str, Any] | None = None,
    ) -> None:
        """A run's end (or abandonment) and, in the same transaction, what its agent reported
        (``usage``: see :meth:`record_usage`) and its task's new state."""
        now = time.time()
        values = (state, now, exit_code, int(lost), outcome, reason, run_id)
        task = dataclasses.replace(task) if task is not None else None
        usage = _checked_usage(usage)

        def end(db: Tx) -> None:
            db.execute(
                "UPDATE runs SET state = ?, ended_at = ?, exit_code = ?, lost = ?, outcome = ?, "
                "reason = ? WHERE id = ?",
                values,
            )
            if usage:
                _put_usage(db, run_id, usage)
            if task is not None:
                assert shift is not None and worker is not None
                _put_task(db, task, shift, now)
                _put_worker(db, task, shift, worker, None)

        self._commit(end, done=True)

    def run_supervised(self, run_id: int, shift: str) -> None:
        """``shift`` watches the run from now on (it adopted it).  Its output is logged only
        once this is written (a later adopter reads the logs of the shifts named here, to know
        where to resume): raises :class:`LedgerUnwritable` when it cannot be."""

        def supervise(db: Tx) -> None:
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
        """What an agent kind reported of a run (:data:`USAGE_FIELDS`: session, cost, tokens,
        turns, its own duration, last result text, limit line); the task's sums follow."""
        usage = _checked_usage(usage)
        if usage:
            self._commit(lambda db: _put_usage(db, run_id, usage), done=True)

    def task_usage(self, issue: int) -> TaskUsage:
        """What the task's runs cost so far (the sums :meth:`record_usage` keeps)."""
        return self._one(TaskUsage, "SELECT * FROM tasks WHERE issue = ?", (issue,)) or (
            TaskUsage()
        )

    def cost_of(
        self, *, issue: int | None = None, after_run: int = 0, shift: str | None = None
    ) -> float:
        """The USD cost of a task's runs numbered above ``after_run``, or of the runs a shift
        started (what ``max_cost_usd`` counts)."""
        where, args = (
            ("issue = ? AND number > ?", (issue, after_run))
            if issue is not None
            else ("shift = ?", (shift,))
        )
        row = self._db.execute(
            f"SELECT COALESCE(SUM(cost_usd), 0) FROM runs WHERE {where}", args
        ).fetchone()
        return float(row[0])

    def runs_of_session(self, session: str) -> list[RunRecord]:
        """The runs in agent session ``session`` (or an id starting with it), and the runs that
        resumed it (a resumed Claude session may go on under a new id)."""
        return self._all(
            RunRecord,
            "SELECT * FROM runs WHERE substr(session_id, 1, ?) = ? "
            "OR substr(resumed_from, 1, ?) = ? ORDER BY id",
            (len(session), session, len(session), session),
        )

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
        self._commit(
            lambda db: db.execute(
                "INSERT INTO holds(machine, reason, since, until, shift, line) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                values,
            ),
            done=True,
        )

    def holds(
        self, *, active_at: float | None = None, shift: str | None = None
    ) -> list[dict[str, Any]]:
        """Usage holds: all, those still in force at ``active_at``, or those of a shift."""
        if shift is not None:
            return self._dicts("SELECT * FROM holds WHERE shift = ? ORDER BY id", (shift,))
        if active_at is None:
            return self._dicts("SELECT * FROM holds ORDER BY id")
        return self._dicts("SELECT * FROM holds WHERE until > ? ORDER BY id", (active_at,))

    def machine_event(self, machine: str, state: str, *, shift: str, detail: str = "") -> None:
        values = (machine, state, time.time(), shift, detail)
        self._commit(
            lambda db: db.execute(
                "INSERT INTO machine_events(machine, state, at, shift, detail) "
                "VALUES (?, ?, ?, ?, ?)",
                values,
            ),
            done=True,
        )

    def machine_events(
        self, machine: str | None = None, *, shift: str | None = None
    ) -> list[dict[str, Any]]:
        """Reachability changes, oldest first (of one machine, of one shift)."""
        where = [(c, v) for c, v in (("machine", machine), ("shift", shift)) if v is not None]
        sql = "SELECT * FROM machine_events"
        if where:
            sql += " WHERE " + " AND ".join(f"{c} = ?" for c, _ in where)
        return self._dicts(sql + " ORDER BY id", [v for _, v in where])


_TASK_NAMES = (*TASK_COLUMNS, "updated_at")
_PUT_TASK = (
    f"INSERT INTO tasks({', '.join(_TASK_NAMES)}) VALUES ({', '.join('?' * len(_TASK_NAMES))}) "
    "ON CONFLICT(issue) DO UPDATE SET "
    + ", ".join(f"{n} = excluded.{n}" for n in _TASK_NAMES if n not in ("issue", "first_shift"))
)


def _put_task(db: Tx, task: TaskRecord, shift: str, now: float) -> None:
    task.first_shift, task.last_shift = task.first_shift or shift, shift
    values = {name: getattr(task, name) for name in TASK_COLUMNS}
    values["history"] = json.dumps(task.history)
    values["listed"] = int(task.listed)
    db.execute(_PUT_TASK, [*values.values(), now])


_SUM_USAGE = (
    "UPDATE tasks SET "
    + ", ".join(
        f"{n} = (SELECT SUM({n}) FROM runs WHERE issue = tasks.issue)" for n in SUMMED_FIELDS
    )
    + ", session_id = COALESCE((SELECT session_id FROM runs WHERE issue = tasks.issue AND "
    "session_id IS NOT NULL ORDER BY number DESC LIMIT 1), session_id) "
    "WHERE issue = (SELECT issue FROM runs WHERE id = ?)"
)


def _checked_usage(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """``usage`` (copied: a transition that waits must write what was said when it was said),
    its fields checked when it is given, not when it is written."""
    unknown = set(usage or ()) - set(USAGE_FIELDS)
    if unknown:
        raise ValueError(f"unknown usage fields: {sorted(unknown)}")
    return dict(usage or {})


def _put_usage(db: Tx, run_id: int, usage: Mapping[str, Any]) -> None:
    """A run's agent facts, and its task's sums over its runs (one SQL ``sum`` each, so a
    task's cost is exactly the sum of its runs' costs as SQLite adds them)."""
    names = sorted(usage)
    db.execute(
        f"UPDATE runs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
        (*(usage[n] for n in names), run_id),
    )
    db.execute(_SUM_USAGE, (run_id,))


def _put_worker(
    db: Tx, task: TaskRecord, shift: str, worker: str, adopted_from: str | None
) -> None:
    db.execute(
        "INSERT INTO workers(shift, worker, issue, state, reason, adopted_from, started_at, "
        "ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(shift, worker) DO UPDATE SET "
        "state = excluded.state, reason = excluded.reason, "
        "adopted_from = COALESCE(excluded.adopted_from, workers.adopted_from), "
        "started_at = COALESCE(workers.started_at, excluded.started_at), "
        "ended_at = excluded.ended_at",
        (
            shift,
            worker,
            task.issue,
            task.state,
            task.reason,
            adopted_from,
            task.started_at,
            task.ended_at,
        ),
    )


def _uri_path(path: Path) -> str:
    from urllib.parse import quote

    return quote(str(path.resolve()))
