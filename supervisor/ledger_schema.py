"""The ledger's tables, and their rows as Python types (the ledger itself: ``ledger.py``).

Schema (version :data:`SCHEMA_VERSION`, in the ``meta`` table; a ledger written by a newer
version is refused with :class:`LedgerTooNew`)::

    meta(key PK, value)                      schema_version
    shifts(id PK, pid, pid_ticks, host, config, dir, name, concurrency, started_at,
           ended_at, exit_code, exit_meaning, state running|ended|died, found_by)
        one row per ``up``; a shift left ``running`` by a dead ``up`` becomes ``died`` when
        the next one starts (``found_by`` names it)
    tasks(issue PK, title, prompt, pin, origin config|add|github, state, reason, machine,
          workspace, runs, milestones, crashes, last_crash_run, usage_pauses, last_exit,
          history JSON, listed, first_shift, last_shift, started_at, ended_at, updated_at,
          outcome, result_text, next_resume, next_prompt, session_id, cost_usd, input_tokens,
          output_tokens, cache_read_tokens, cache_write_tokens, turns)
        a task across ``up``s: ``runs`` is its run counter (runs are numbered per task across
        shifts), ``history`` the restart policy's memory, ``listed`` whether the current
        config (or task source) lists it; ``outcome``/``result_text`` what its last run ended
        with (``supervisor.agents.Outcome``, or milestone), ``next_resume``/``next_prompt`` how
        its next run starts (the agent session to resume, the prompt kind), so that the next
        ``up`` goes on the same way; the usage columns are the sums over its runs (SQL ``sum``,
        written with each run's end: a report's total is exactly the sum of the runs)
    workers(shift, worker, issue, state, reason, adopted_from, started_at, ended_at,
            PK(shift, worker))
        a task's life within one shift: what ``shifts`` and a dead shift's report show
    runs(id PK, issue, number, shift, worker, machine, workspace, run_dir, lease_path,
         prompt_kind, milestones_before JSON, state intent|running|ended|abandoned, pid,
         start_ticks, intent_at, started_at, ended_at, exit_code, lost, outcome, reason,
         supervised_by, supervisors JSON, agent_kind, resumed_from, agent_duration_ms,
         result_text, limit_line, session_id, cost_usd, input_tokens, output_tokens,
         cache_read_tokens, cache_write_tokens, turns, UNIQUE(issue, number))
        one row per agent run; ``supervised_by`` is the shift watching it now (an adopter
        takes it over), ``supervisors`` every shift that did, in order: the logs in which its
        output lies.  The agent columns (issue 13): ``agent_kind`` (which reader reads its
        output, also after an adoption), ``session_id`` (pinned or resumed before the start,
        updated as soon as the agent tells another), ``resumed_from`` (the session it
        continued), and what the agent reported at its end (cost, tokens, turns, its own
        ``duration_ms``, its last result text, the line of a usage limit); NULL where the kind
        reports nothing (kind ``command``)
    holds(id PK, machine, reason, since, until, shift, line)
        usage-limit holds: no new run on ``machine`` until ``until``
    machine_events(id PK, machine, state, at, shift, detail)
        each change of a machine's reachability in a shift (``connecting``, ``up``, ``slow``,
        ``unreachable``, ``back``), ``refused`` (left out of the shift), ``noisy-login`` (its
        login shell prints before every command); ``retrying`` in older ledgers

Version 2 added the agent columns (``runs.agent_kind`` ... ``limit_line``, ``tasks.outcome`` ...
``next_prompt``); a version-1 ledger gets them when the writer opens it (:data:`MIGRATIONS`).

A run's states: ``intent`` (committed before the start; the run may not exist), ``running``
(pid known), ``ended`` (exit recorded), ``abandoned`` (it never started: the intent's supervisor
died before the wrapper ran, or the start failed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

SCHEMA_VERSION = 2
RunState = Literal["intent", "running", "ended", "abandoned"]
_R = TypeVar("_R")

_USAGE_COLUMNS = """session_id TEXT, cost_usd REAL, input_tokens INTEGER, output_tokens INTEGER,
    cache_read_tokens INTEGER, cache_write_tokens INTEGER, turns INTEGER"""
_TASK_AGENT_COLUMNS = "outcome TEXT, result_text TEXT, next_resume TEXT, next_prompt TEXT"
_RUN_AGENT_COLUMNS = """agent_kind TEXT, resumed_from TEXT, agent_duration_ms INTEGER,
    result_text TEXT, limit_line TEXT"""
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shifts(
    id TEXT PRIMARY KEY, pid INTEGER NOT NULL, pid_ticks INTEGER, host TEXT NOT NULL,
    config TEXT NOT NULL, dir TEXT NOT NULL, name TEXT NOT NULL DEFAULT '', concurrency INTEGER,
    started_at REAL NOT NULL, ended_at REAL, exit_code INTEGER, exit_meaning TEXT,
    state TEXT NOT NULL CHECK (state IN ('running', 'ended', 'died')), found_by TEXT);
CREATE TABLE IF NOT EXISTS tasks(
    issue INTEGER PRIMARY KEY, title TEXT NOT NULL DEFAULT '', prompt TEXT, pin TEXT,
    origin TEXT NOT NULL DEFAULT 'config', state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    machine TEXT, workspace TEXT, runs INTEGER NOT NULL DEFAULT 0,
    milestones INTEGER NOT NULL DEFAULT 0, crashes INTEGER NOT NULL DEFAULT 0,
    last_crash_run INTEGER, usage_pauses INTEGER NOT NULL DEFAULT 0, last_exit INTEGER,
    history TEXT NOT NULL DEFAULT '{{}}', listed INTEGER NOT NULL DEFAULT 1, first_shift TEXT,
    last_shift TEXT, started_at REAL, ended_at REAL, updated_at REAL NOT NULL,
    {_USAGE_COLUMNS}, {_TASK_AGENT_COLUMNS});
CREATE TABLE IF NOT EXISTS workers(
    shift TEXT NOT NULL, worker TEXT NOT NULL, issue INTEGER NOT NULL, state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', adopted_from TEXT, started_at REAL, ended_at REAL,
    PRIMARY KEY (shift, worker));
CREATE TABLE IF NOT EXISTS runs(
    id INTEGER PRIMARY KEY, issue INTEGER NOT NULL, number INTEGER NOT NULL,
    shift TEXT NOT NULL, worker TEXT NOT NULL, machine TEXT NOT NULL, workspace TEXT,
    run_dir TEXT NOT NULL, lease_path TEXT, prompt_kind TEXT,
    milestones_before TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL CHECK (state IN ('intent', 'running', 'ended', 'abandoned')),
    pid INTEGER, start_ticks INTEGER, intent_at REAL NOT NULL, started_at REAL, ended_at REAL,
    exit_code INTEGER, lost INTEGER NOT NULL DEFAULT 0, outcome TEXT,
    reason TEXT NOT NULL DEFAULT '', supervised_by TEXT, supervisors TEXT NOT NULL DEFAULT '[]',
    {_USAGE_COLUMNS}, {_RUN_AGENT_COLUMNS}, UNIQUE (issue, number));
CREATE INDEX IF NOT EXISTS runs_open ON runs(state) WHERE state IN ('intent', 'running');
CREATE INDEX IF NOT EXISTS runs_shift ON runs(shift);
CREATE INDEX IF NOT EXISTS runs_dir ON runs(run_dir);
CREATE TABLE IF NOT EXISTS holds(
    id INTEGER PRIMARY KEY, machine TEXT NOT NULL, reason TEXT NOT NULL, since REAL NOT NULL,
    until REAL NOT NULL, shift TEXT NOT NULL, line TEXT);
CREATE TABLE IF NOT EXISTS machine_events(
    id INTEGER PRIMARY KEY, machine TEXT NOT NULL, state TEXT NOT NULL, at REAL NOT NULL,
    shift TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
"""


def _add_columns(table: str, columns: str) -> list[str]:
    return [f"ALTER TABLE {table} ADD COLUMN {c.strip()}" for c in columns.split(",")]


#: What brings a ledger of version N up to N + 1 (the writer applies them in one transaction).
MIGRATIONS: dict[int, list[str]] = {
    1: _add_columns("tasks", _TASK_AGENT_COLUMNS) + _add_columns("runs", _RUN_AGENT_COLUMNS),
}

#: The usage an agent kind may report for a run (issue 13); NULL until one does.
USAGE_FIELDS = (
    "session_id",
    "cost_usd",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "turns",
    "agent_duration_ms",
    "result_text",
    "limit_line",
)
#: The usage columns a task sums over its runs.
SUMMED_FIELDS = USAGE_FIELDS[1:7]


@dataclass
class TaskRecord:
    """A task as the ledger keeps it across ``up`` invocations."""

    issue: int
    state: str = "pending"
    title: str = ""
    prompt: str | None = None
    pin: str | None = None
    origin: str = "config"
    reason: str = ""
    machine: str | None = None
    workspace: str | None = None
    runs: int = 0
    milestones: int = 0
    crashes: int = 0
    last_crash_run: int | None = None
    usage_pauses: int = 0
    last_exit: int | None = None
    history: dict[str, Any] = field(default_factory=dict)
    listed: bool = True
    first_shift: str | None = None
    last_shift: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    outcome: str | None = None
    result_text: str | None = None
    next_resume: str | None = None
    next_prompt: str | None = None


@dataclass(frozen=True)
class TaskUsage:
    """What a task's runs cost so far, as its agents reported it (sums; None: none said)."""

    session_id: str | None = None
    cost_usd: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    turns: int | None = None


@dataclass(frozen=True)
class RunRecord:
    """One agent run as the ledger knows it."""

    id: int
    issue: int
    number: int
    shift: str
    worker: str
    machine: str
    workspace: str | None
    run_dir: str
    lease_path: str | None
    prompt_kind: str | None
    milestones_before: tuple[str, ...]
    state: str
    pid: int | None
    start_ticks: int | None
    intent_at: float
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    lost: bool
    outcome: str | None
    reason: str
    supervised_by: str | None
    supervisors: tuple[str, ...]
    agent_kind: str | None = None
    session_id: str | None = None
    resumed_from: str | None = None
    cost_usd: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    turns: int | None = None
    agent_duration_ms: int | None = None
    result_text: str | None = None
    limit_line: str | None = None


@dataclass(frozen=True)
class ShiftRecord:
    """One ``up``."""

    id: str
    pid: int
    pid_ticks: int | None
    host: str
    config: str
    dir: str
    name: str
    concurrency: int | None
    started_at: float
    ended_at: float | None
    exit_code: int | None
    exit_meaning: str | None
    state: str
    found_by: str | None


@dataclass(frozen=True)
class WorkerRecord:
    """A task's life within one shift."""

    shift: str
    worker: str
    issue: int
    state: str
    reason: str
    adopted_from: str | None
    started_at: float | None
    ended_at: float | None


TASK_COLUMNS = tuple(f.name for f in fields(TaskRecord))

_JSON_FIELDS = {"history": dict, "milestones_before": tuple, "supervisors": tuple}
_BOOL_FIELDS = frozenset({"listed", "lost"})


def record_of(cls: type[_R], row: Sequence[Any], description: Any) -> _R:
    """A row as its record type: JSON columns decoded, 0/1 columns as bools; a column an older
    ledger lacks (a reader does not migrate) keeps the field's default."""
    data = dict(zip((d[0] for d in description), row, strict=True))
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name in _JSON_FIELDS:
            value = _JSON_FIELDS[f.name](json.loads(value or "null") or ())
        elif f.name in _BOOL_FIELDS:
            value = bool(value)
        values[f.name] = value
    return cls(**values)
