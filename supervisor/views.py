"""The read-only views of the command line: ``status``, ``shifts`` (``runs``) and ``report``.

Each reads what a shift left (the running fleet's answer, the ledger, a shift's directory) and
prints it for people (a table) or for scripts (``--json``); none changes a fleet.  ``report``
writes a shift's report files again, from its summary or, for a shift whose ``up`` died, from
the ledger.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from supervisor import report
from supervisor.agents.render import usd
from supervisor.clicommon import (
    PROG,
    UsageError,
    ask,
    config_from,
    error,
    state_dir_from,
)
from supervisor.console import text_table
from supervisor.exitcodes import EXIT_FAILED, EXIT_NOTHING
from supervisor.fleet import Fleet
from supervisor.ledger import Ledger, LedgerError
from supervisor.rundir import UnknownShift, find_shift, list_shifts, lock_holder

# -- status -----------------------------------------------------------------------------------


def _human_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}G"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _state(worker: dict[str, Any]) -> str:
    """A task's state, and which outcome of its last run put it there (``backoff
    (rate-limited)``, ``paused (usage-limited)``, ``failed (turn limit ...)``)."""
    state, outcome = str(worker["state"]), worker.get("outcome")
    if state == "failed" and worker.get("reason"):
        reason = str(worker["reason"])
        return f"failed ({reason if len(reason) <= 40 else reason[:39] + '…'})"
    if (
        outcome
        and outcome not in (state, "done", "stopped", "restarted")
        and state not in ("running", "preparing", "pending", "stopping")
    ):
        return f"{state} ({outcome})"
    return state


def status_table(workers: list[dict[str, Any]], now: float) -> str:
    header = (
        "task",
        "worker",
        "machine",
        "state",
        "pid",
        "run",
        "milestones",
        "crashes",
        "uptime",
        "last out",
        "cpu%",
        "rss",
        "cost",
    )
    rows = [header]
    for w in workers:
        started = w.get("run_started_at") if w.get("pid") else None
        cpu = w.get("cpu_percent")
        rows.append(
            (
                f"#{w['task']}",
                str(w["worker"]),
                str(w.get("machine") or "-"),
                _state(w),
                str(w.get("pid") or "-"),
                str(w.get("runs") or 0),
                str(w.get("milestones") or 0),
                str(w.get("crashes") or 0),
                _age(now - started) if started else "-",
                _age(w.get("last_output_age")),
                "-" if cpu is None else f"{cpu:.0f}",
                _human_bytes(w.get("rss_bytes")),
                usd(w.get("cost_usd")),
            )
        )
    return text_table(rows)


def cmd_status(args: argparse.Namespace) -> int:
    """Show the running fleet's workers."""
    answer = ask(args, {"cmd": "status"})
    if isinstance(answer, int):
        return answer
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
        return 0
    paused = " (new runs paused)" if answer.get("paused") else ""
    start_holds = answer.get("held") or {}
    if start_holds:
        paused += f" (new runs held: {'; '.join(map(str, start_holds.values()))})"
    print(f"fleet {answer.get('fleet')} (pid {answer.get('pid')}){paused}")
    for machine in answer.get("machines", []):
        if machine.get("away") or machine.get("reach") not in ("up", "connecting"):
            print(f"machine {machine.get('away') or machine.get('name')} ({machine.get('reach')})")
    held: dict[str, dict[str, Any]] = {}
    for hold in answer.get("holds") or []:  # the latest reset per machine
        if float(hold["until"]) > float(held.get(hold["machine"], {}).get("until", 0)):
            held[hold["machine"]] = hold
    for machine, hold in sorted(held.items()):
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(hold["until"])))
        print(f"machine {machine} held until {until}: {hold['reason']}")
    print(status_table(answer.get("workers", []), time.time()))
    return 0


# -- shifts and report -------------------------------------------------------------------------


def _open_ledger(state_dir: Path) -> Ledger | None:
    try:
        return Ledger.reader(state_dir)
    except LedgerError as exc:
        raise UsageError(str(exc)) from None


def cmd_runs(args: argparse.Namespace) -> int:
    """List the shifts (one per ``up``) with what became of their tasks, from the ledger."""
    state_dir = state_dir_from(args)
    ledger = _open_ledger(state_dir)
    try:
        shifts = list_shifts(state_dir, ledger)
        if not shifts:
            print(f"{PROG}: no fleet runs (shifts) in {state_dir}", file=sys.stderr)
            return EXIT_NOTHING
        running = lock_holder(state_dir)
        header = ("shift", "state", "tasks", "done", "failed", "exit", "meaning")
        rows: list[tuple[str, ...]] = [header]
        out: list[dict[str, Any]] = []
        for info in shifts:
            record, summary = info.record, info.summary or {}
            workers: list[dict[str, Any]] = summary.get("workers", [])
            if ledger is not None and record is not None:
                workers = [{"state": w.state} for w in ledger.workers(info.shift_id)]
            if record is not None and record.state == "running":
                state = "running" if running and record.pid == running else "died"
            elif record is not None:
                state = record.state
            else:
                state = "ended" if info.summary is not None else "died"
            code = record.exit_code if record is not None else summary.get("exit_code")
            meaning = (
                record.exit_meaning if record is not None else summary.get("exit_meaning")
            ) or ""
            row = {
                "shift": info.shift_id,
                "run": info.shift_id,
                "state": state,
                "tasks": len(workers),
                "done": sum(1 for w in workers if w.get("state") == "done"),
                "failed": sum(1 for w in workers if w.get("state") == "failed"),
                "exit_code": code if state == "ended" else None,
                "meaning": meaning if state == "ended" else "",
                "path": str(info.path),
            }
            out.append(row)
            rows.append(
                (
                    info.shift_id,
                    state,
                    str(row["tasks"]),
                    str(row["done"]),
                    str(row["failed"]),
                    "-" if row["exit_code"] is None else str(row["exit_code"]),
                    str(row["meaning"]),
                )
            )
    finally:
        if ledger is not None:
            ledger.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(text_table(rows))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild a shift's report.md/report.json from its summary (or the ledger, for a shift
    whose ``up`` died), its log and its worktrees."""
    config = config_from(args)
    state_dir = state_dir_from(args)
    ledger = _open_ledger(state_dir)
    try:
        try:
            info = find_shift(state_dir, ledger, args.shift)
        except UnknownShift as exc:
            raise UsageError(str(exc)) from None
        if info is None:
            print(f"{PROG}: no shifts in {state_dir}", file=sys.stderr)
            return EXIT_NOTHING
        summary = info.summary
        if summary is None and ledger is not None:
            summary = report.summary_from_ledger(ledger, info.shift_id, lock_holder(state_dir))
    finally:
        if ledger is not None:
            ledger.close()
    if summary is None:
        return error(
            f"shift {info.shift_id} has neither summary.json nor a ledger row", EXIT_FAILED
        )
    found = summary

    async def build() -> dict[str, Any]:
        hosts = Fleet.make_hosts(config)
        try:
            return await report.collect(
                found,
                info.path,
                hosts,
                milestone_globs=config.milestone_globs,
                default_branch={},
            )
        finally:
            for host in hosts.values():
                await host.aclose()

    data = anyio.run(build)
    try:
        md, js = report.write_report(info.path, data)
    except OSError as exc:
        return error(
            f"cannot write the report in {info.path}: {exc.strerror or exc}; fix: "
            "give its disk room and make it writable by you",
            EXIT_FAILED,
        )
    if args.print:
        print(md.read_text(encoding="utf-8"), end="")
    print(f"{PROG}: wrote {md} and {js}")
    return 0
