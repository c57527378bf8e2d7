"""The ledger's agent columns (schema version 2): a version-1 ledger is migrated by the writer
and still read by a reader; a run's agent facts and its task's sums are written with the run's
end; cost limits and ``logs --session`` read them."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from supervisor.ledger import Ledger, TaskRecord, ledger_path
from supervisor.ledger_schema import MIGRATIONS, SCHEMA_VERSION
from tests.test_ledger import intent, shift


def make_version_1(state: Path) -> None:
    """A ledger as version 1 wrote it: the columns version 2 added are dropped again."""
    with Ledger.open(state) as ledger:
        ledger.begin_shift(shift("s1"))
        intent(ledger, TaskRecord(issue=1, state="running"), "s1")
    db = sqlite3.connect(ledger_path(state))
    for statement in MIGRATIONS[1]:
        table, column = statement.split()[2], statement.split()[5]
        db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()


def test_a_version_1_ledger_is_read_as_is_and_migrated_by_the_writer(tmp_path: Path) -> None:
    make_version_1(tmp_path)
    with Ledger.reader(tmp_path) as reader:  # type: ignore[union-attr]
        (run,) = reader.runs()
        assert run.agent_kind is None and run.result_text is None  # the fields' defaults
        task = reader.task(1)
        assert task is not None and task.next_prompt is None
    with Ledger.open(tmp_path) as ledger:
        (run,) = ledger.runs()
        ledger.run_ended(
            run.id,
            exit_code=0,
            outcome="done",
            usage={"session_id": "s", "result_text": "ok", "cost_usd": 1.0},
        )
        assert ledger.task_usage(1).cost_usd == 1.0
    db = sqlite3.connect(ledger_path(tmp_path))
    (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    db.close()
    assert int(version) == SCHEMA_VERSION == 2


def test_a_runs_usage_and_its_tasks_sums_and_costs(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        ledger.begin_shift(shift("s1"))
        task = TaskRecord(issue=4)
        costs = [0.015625 * n for n in (3, 5, 7)]
        for number, cost in enumerate(costs, 1):
            before = f"sess-{number - 1}" if number > 1 else None
            usage = {
                "cost_usd": cost,
                "turns": number,
                "input_tokens": 100,
                "session_id": f"sess-{number}",
            }
            run = ledger.run_intent(
                task,
                shift="s1" if number < 3 else "s2",
                worker="w1",
                machine="local",
                workspace="/ws",
                run_dir_of=lambda n: f"/r/{n}",
                lease_path=None,
                prompt_kind="first",
                milestones_before=[],
                agent_kind="claude",
                session_id=f"sess-{number}",
                resumed_from=before,
            )
            ledger.run_started(run.id, 100 + number, 1)
            ledger.run_ended(
                run.id, exit_code=0, outcome="done", task=task, shift="s1", worker="w1", usage=usage
            )
        usage = ledger.task_usage(4)
        assert usage.cost_usd == sum(costs) and usage.turns == 6 and usage.input_tokens == 300
        assert usage.session_id == "sess-3"
        assert ledger.cost_of(issue=4, after_run=1) == costs[1] + costs[2]
        assert ledger.cost_of(shift="s1") == costs[0] + costs[1]
        assert [r.number for r in ledger.runs_of_session("sess-2")] == [2, 3]  # and its resumer
        assert ledger.runs_of_session("nope") == []
        ledger.hold("local", "usage limit", time.time() + 60, shift="s2", line="x")
        assert [h["shift"] for h in ledger.holds(shift="s2")] == ["s2"]
        assert ledger.holds(shift="s1") == []
