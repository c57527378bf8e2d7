"""What the agents cost and when the fleet was held: the report's and ``status``'s share of
issue 13.

Per run the ledger keeps what its agent reported at its end (``runs``: cost in USD, input,
output and cache tokens, turns, the agent's own duration, its last result text); per task the
sums over its runs (SQL ``sum``, written with each run's end).  The report gives per task its
cost and tokens (all its runs, in every shift: what the issue cost), its last outcome and
result text, and this shift's runs one by one; its total is the sum of the tasks', so it is
exactly the sum of the runs' ``total_cost_usd``.  It also lists every usage hold (when, which
machine, why, until) and why new runs were stopped early (a hold longer than
``max_usage_wait``, a cost limit) -- saying when the fleet could go on.

Codex and Gemini report tokens but no USD cost: their cost is ``-``, and ``max_cost_usd``
never stops them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from supervisor.agents.render import usd
from supervisor.ledger import Ledger
from supervisor.ledger_schema import SUMMED_FIELDS

__all__ = ["add_costs", "markdown", "run_rows", "usd"]

#: What a run row keeps of its agent (the ledger's columns; the usage ones are the ledger's).
_RUN_FIELDS = (
    "number",
    "outcome",
    "reason",
    "exit_code",
    "session_id",
    "resumed_from",
    *SUMMED_FIELDS,  # cost, the four token counts, turns
    "agent_duration_ms",
    "started_at",
    "ended_at",
    "machine",
)
_TOKENS = tuple(name for name in SUMMED_FIELDS if name.endswith("_tokens"))
#: A result text longer than this is cut in the Markdown report (report.json has it whole).
RESULT_CHARS = 600


def run_rows(ledger: Ledger, shift: str) -> list[dict[str, Any]]:
    """The runs ``shift`` started or watched, as the summary and the report list them."""
    rows = []
    for run in ledger.runs(shift=shift):
        row: dict[str, Any] = {"task": run.issue}
        row.update((name, getattr(run, name)) for name in _RUN_FIELDS)
        ended = run.ended_at or time.time()
        row["duration"] = round(ended - run.started_at, 3) if run.started_at else None
        rows.append(row)
    return rows


def add_costs(report: dict[str, Any], summary: Mapping[str, Any]) -> None:
    """Put the runs under their tasks, the cost and token totals, the holds and the early stop
    into ``report`` (the report's data, :func:`supervisor.report.collect`)."""
    runs: dict[int, list[dict[str, Any]]] = {}
    for row in summary.get("runs", []):
        runs.setdefault(int(row["task"]), []).append(row)
    tasks: Sequence[dict[str, Any]] = report.get("tasks", [])
    for task in tasks:
        task["runs_detail"] = runs.get(int(task["task"]), [])
    costs = [t["cost_usd"] for t in tasks if isinstance(t.get("cost_usd"), int | float)]
    totals = report.setdefault("totals", {})
    totals["cost_usd"] = sum(costs) if costs else None
    for name in (*_TOKENS, "turns"):
        counts = [t[name] for t in tasks if isinstance(t.get(name), int)]
        totals[name] = sum(counts) if counts else None
    report["holds"] = list(summary.get("holds", []))
    report["starts_closed"] = summary.get("starts_closed")


def markdown(report: Mapping[str, Any]) -> list[str]:
    """The report's lines about cost, holds and an early stop (after its header)."""
    lines: list[str] = []
    totals = report.get("totals", {})
    if totals.get("cost_usd") is not None or totals.get("input_tokens") is not None:
        lines.append(
            f"- cost {usd(totals.get('cost_usd'))}, tokens {_tokens(totals)}, "
            f"turns {totals.get('turns') or 0}"
        )
    if report.get("starts_closed"):
        lines.append(f"- **new runs were stopped early**: {report['starts_closed']}")
    holds = report.get("holds") or []
    if holds:
        lines += [
            "",
            "Usage holds (no new run on the machine until the reset):",
            "",
            "| since | machine | why | until | agent line |",
            "|---|---|---|---|---|",
        ]
        for hold in holds:
            line = str(hold.get("line") or "").replace("|", "\\|")
            line = line if len(line) <= 120 else line[:119] + "…"
            lines.append(
                f"| {_when(hold.get('since'))} | {hold.get('machine')} | "
                f"{hold.get('reason')} | {_when(hold.get('until'))} | `{line}` |"
            )
    return lines


def task_markdown(task: Mapping[str, Any]) -> list[str]:
    """A task's section lines about its outcome, session, cost and runs."""
    lines: list[str] = []
    if task.get("outcome"):
        lines.append(f"Last run: **{task['outcome']}**.")
    if task.get("session_id"):
        lines.append(f"Agent session `{task['session_id']}`.")
    if task.get("cost_usd") is not None or task.get("input_tokens") is not None:
        lines.append(
            f"Cost {usd(task.get('cost_usd'))}, tokens {_tokens(task)}, "
            f"turns {task.get('turns') or 0} (all its runs)."
        )
    if task.get("result_text"):
        text = str(task["result_text"]).strip()
        text = text if len(text) <= RESULT_CHARS else text[: RESULT_CHARS - 1] + "…"
        lines += ["", "Last result:", "", *(f"> {line}" for line in text.splitlines())]
    runs = task.get("runs_detail") or []
    if any(r.get("session_id") or r.get("cost_usd") is not None for r in runs):
        lines += [
            "",
            "| run | outcome | session | cost | turns | duration |",
            "|---|---|---|---|---|---|",
        ]
        for r in runs:
            session = str(r.get("session_id") or "-")[:8]
            duration = f"{float(r['duration']):.0f}s" if r.get("duration") is not None else "-"
            lines.append(
                f"| {r.get('number')} | {r.get('outcome') or '-'} | {session} | "
                f"{usd(r.get('cost_usd'))} | {r.get('turns') or '-'} | {duration} |"
            )
        lines.append("")
    return lines


def _tokens(row: Mapping[str, Any]) -> str:
    counts = [row.get(name) for name in _TOKENS]
    if all(c is None for c in counts):
        return "-"
    inp, out, read, write = (int(c or 0) for c in counts)
    return f"{inp:,} in / {out:,} out / {read:,} cache read / {write:,} cache write"


def _when(epoch: Any) -> str:
    if not isinstance(epoch, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
