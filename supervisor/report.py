"""The morning report: what every agent did overnight, as Markdown and JSON in the run directory.

Per task: final state, runs, milestones (with the latest milestone file's "Work Remaining"
section), crashes with the last 20 lines of output of the last crashed run, the commits made
on its branch, wall time; then totals and the fleet's exit code explained.

Collecting needs the machines (milestone files and branches live there), so :func:`collect`
runs through the hosts; :func:`render_markdown` is pure.  Notification hooks (a command, a
webhook) run after the report is written; their failures are logged, never fatal.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import structlog

from supervisor import sh, spend
from supervisor.config import FleetConfig
from supervisor.console import text_table
from supervisor.hosts.base import Host
from supervisor.ledger import Ledger
from supervisor.records import last_lines, log_files
from supervisor.rundir import write_text_atomic

TAIL_LINES = 20
#: The report and its notifications get this long at the end of a shift.
REPORT_TIMEOUT = 120.0
COLLECT_CONCURRENCY = 8


def machine_lines(events: Sequence[Mapping[str, Any]]) -> list[str]:
    """What happened to the machines, from their reachability changes (the ledger's
    ``machine_events`` of one shift, oldest first): "m1 unreachable since 02:14:05, back at
    02:31:40", "m1 slow from … to …", "m1 left out: …".  Reconnections that came back before
    ``unreachable_after`` are not worth a line."""
    lines: list[str] = []
    away: dict[str, tuple[str, float]] = {}  # machine -> (unreachable|slow, since)
    for event in events:
        name, state, at = str(event["machine"]), str(event["state"]), float(event["at"])
        if state in ("unreachable", "slow") and name not in away:
            away[name] = (state, at)
        elif state == "refused":
            lines.append(f"{name} left out of the shift: {event.get('detail') or 'refused'}")
        elif state == "noisy-login":
            lines.append(f"{name}: {event.get('detail')}")
        elif state in ("back", "up", "retrying") and name in away:
            kind, since = away.pop(name)
            if kind == "unreachable":
                lines.append(f"{name} unreachable since {_clock(since)}, back at {_clock(at)}")
            else:
                lines.append(f"{name} slow from {_clock(since)} to {_clock(at)}")
        elif state == "unreachable" and away.get(name, ("", 0.0))[0] == "slow":
            away[name] = (state, away[name][1])
    for name, (kind, since) in away.items():
        lines.append(f"{name} {kind} since {_clock(since)}, not back by the shift's end")
    return lines


def _clock(epoch: float) -> str:
    import time

    return time.strftime("%H:%M:%S", time.localtime(epoch))


def work_remaining(markdown: str) -> str:
    """The "Work Remaining" section of an Agentize milestone file (empty if none)."""
    match = re.search(r"^#+\s*Work Remaining\s*$(.*?)(?=^#+\s|\Z)", markdown, re.M | re.S)
    return match.group(1).strip() if match else ""


# One helper command per machine lists the commits of every worktree (RS-separated), instead of
# one git process per task from here: a fleet of a thousand tasks reports in a second
# (``sh/report-commits.sh``).  Before that, one git process per clone says which worktrees are
# still where ``base`` is (``sh/report-heads.sh``).


def _unmoved(listing: str) -> set[str]:
    """The worktrees whose HEAD is the base commit, from the output of ``sh/report-heads.sh``."""
    unmoved: set[str] = set()
    for block in listing.split("\036")[1:]:
        base, _, porcelain = block.partition("\n")
        if not base:
            continue
        path = ""
        for line in porcelain.splitlines():
            if line.startswith("worktree "):
                path = line[len("worktree ") :]
            elif line == f"HEAD {base}" and path:
                unmoved.add(path)
    return unmoved


async def _branch_commits(host: Host, workspaces: Sequence[str], base: str) -> dict[str, list[str]]:
    """The commits made on each worktree's branch since ``base``, by worktree path."""
    found: dict[str, list[str]] = {}
    clones = sorted({ws.rsplit("/trees/", 1)[0] for ws in workspaces if "/trees/" in ws})
    heads = await host.run(sh.command("report-heads", base, *clones), check=False, timeout=120)
    unmoved = _unmoved(heads.stdout)
    moved = [ws for ws in workspaces if ws not in unmoved]
    found.update((ws, []) for ws in workspaces if ws in unmoved)
    for start in range(0, len(moved), 200):  # keep the argument list short
        part = list(moved[start : start + 200])
        result = await host.run(sh.command("report-commits", base, *part), check=False, timeout=120)
        for block in result.stdout.split("\036")[1:]:
            path, _, commits = block.partition("\n")
            found[path] = commits.splitlines()
    return found


async def _latest_milestone(host: Host, workspace: str, globs: Sequence[str]) -> tuple[str, str]:
    files = await host.glob(workspace, globs)
    if not files:
        return "", ""

    def number(name: str) -> int:
        found = re.search(r"milestone-(\d+)", name)
        return int(found.group(1)) if found else 0

    latest = max(files, key=number)
    result = await host.run(["cat", posixpath.join(workspace, latest)], check=False, timeout=30)
    return latest, work_remaining(result.stdout) if result.exit_code == 0 else ""


async def collect(
    summary: dict[str, Any],
    run_dir: Path,
    hosts: Mapping[str, Host],
    *,
    milestone_globs: Sequence[str],
    default_branch: Mapping[str, str],
) -> dict[str, Any]:
    """The report's data: the summary plus what the logs and the worktrees tell."""
    workers = summary.get("workers", [])
    # The last crashed run of each worker, from the workers themselves: reading a log of
    # gigabytes for the ``crashed`` events would make the report wait seconds.
    crashed = {
        str(w["worker"]): int(w["last_crash_run"]) for w in workers if w.get("last_crash_run")
    }
    tails = last_lines(log_files(run_dir), crashed, TAIL_LINES) if crashed else {}
    limiter = anyio.CapacityLimiter(COLLECT_CONCURRENCY)
    tasks = [dict(w) for w in workers]
    for row in tasks:
        row["last_crash_output"] = tails.get(str(row.get("worker")), [])
        row["commits"] = []
        row["latest_milestone"] = ""
        row["work_remaining"] = ""

    async def commits_on(machine: str, rows: list[dict[str, Any]]) -> None:
        with contextlib.suppress(Exception):
            base = default_branch.get(machine, "main")
            found = await _branch_commits(hosts[machine], [str(r["workspace"]) for r in rows], base)
            for row in rows:
                row["commits"] = found.get(str(row["workspace"]), [])

    async def milestone_of(row: dict[str, Any]) -> None:
        async with limiter:
            with contextlib.suppress(Exception):
                globs = [g.replace("{issue}", str(row["task"])) for g in milestone_globs]
                row["latest_milestone"], row["work_remaining"] = await _latest_milestone(
                    hosts[str(row["machine"])], str(row["workspace"]), globs
                )

    by_machine: dict[str, list[dict[str, Any]]] = {}
    for row in tasks:
        if row.get("workspace") and str(row.get("machine")) in hosts:
            by_machine.setdefault(str(row["machine"]), []).append(row)
    async with anyio.create_task_group() as tg:
        for machine, rows in by_machine.items():
            tg.start_soon(commits_on, machine, rows)
            for row in rows:
                # A milestone file matters where the task made milestones or did not finish.
                if row.get("milestones") or row.get("state") != "done":
                    tg.start_soon(milestone_of, row)
    states = [t.get("state") for t in tasks]
    totals = {
        "tasks": len(tasks),
        **{s: states.count(s) for s in sorted({str(x) for x in states})},
        "runs": sum(int(t.get("runs") or 0) for t in tasks),
        "milestones": sum(int(t.get("milestones") or 0) for t in tasks),
        "crashes": sum(int(t.get("crashes") or 0) for t in tasks),
        "commits": sum(len(t["commits"]) for t in tasks),
    }
    report = {
        "not_in_config": summary.get("not_in_config", []),
        "machines": machine_lines(summary.get("machine_events", [])),
        "fleet": summary.get("fleet"),
        "name": summary.get("name"),
        "started_at": summary.get("started_at"),
        "ended_at": summary.get("ended_at"),
        "exit_code": summary.get("exit_code"),
        "exit_meaning": summary.get("exit_meaning"),
        "left": [t["task"] for t in tasks if t.get("state") not in ("done", "failed")],
        "totals": totals,
        "tasks": tasks,
    }
    spend.add_costs(report, summary)
    return report


def _json_text(report: dict[str, Any]) -> str:
    """The report as JSON, one task per line: readable, and written by the C encoder (an
    indented dump goes through the pure-Python one, a second for a thousand tasks)."""
    head = json.dumps({k: v for k, v in report.items() if k != "tasks"}, default=str)
    tasks = ",\n  ".join(json.dumps(t, default=str) for t in report.get("tasks", []))
    return f'{head[:-1]}, "tasks": [\n  {tasks}\n]}}\n'


def _when(epoch: Any) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a table first, then a section per task that needs reading."""
    lines = [
        f"# Fleet report: {report.get('name')} — run {report.get('fleet')}",
        "",
        f"- started {_when(report.get('started_at'))}, ended {_when(report.get('ended_at'))}",
        f"- exit code **{report.get('exit_code')}**: {report.get('exit_meaning')}",
    ]
    if report.get("left"):
        left = ", ".join(f"#{n}" for n in report["left"])
        lines.append(f"- left unfinished: {left}")
    lines += [f"- machine {line}" for line in report.get("machines", [])]
    totals = report["totals"]
    lines.append(
        "- totals: "
        + ", ".join(
            f"{k} {v}" for k, v in totals.items() if not k.endswith(("_usd", "_tokens", "turns"))
        )
    )
    lines += spend.markdown(report)
    lines += [
        "",
        "| task | title | machine | state | runs | milestones | crashes | commits | cost | wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in report["tasks"]:
        title = str(t.get("title") or "").replace("|", "\\|")
        lines.append(
            f"| #{t['task']} | {title} | {t.get('machine') or '-'} | {t.get('state')} | "
            f"{t.get('runs')} | {t.get('milestones')} | {t.get('crashes')} | "
            f"{len(t['commits'])} | {spend.usd(t.get('cost_usd'))} | "
            f"{float(t.get('wall_time') or 0):.0f}s |"
        )
    if report.get("not_in_config"):
        lines += ["", "In the ledger but no longer in the config (left as they were):", ""]
        lines += [
            f"- #{t['task']} {t.get('title') or ''}: {t.get('state')}".rstrip()
            for t in report["not_in_config"]
        ]
    for t in report["tasks"]:
        lines += ["", f"## #{t['task']} {t.get('title') or ''}".rstrip(), ""]
        reason = f": {t['reason']}" if t.get("reason") else ""
        lines.append(f"State **{t.get('state')}**{reason}")
        lines += spend.task_markdown(t)
        if t.get("workspace"):
            lines.append(f"Worktree `{t['workspace']}` on {t.get('machine')}.")
        if t["commits"]:
            lines += ["", "Commits on its branch:", ""]
            lines += [f"- `{c}`" for c in t["commits"]]
        if t.get("work_remaining"):
            lines += [
                "",
                f"Work remaining (from `{t['latest_milestone']}`):",
                "",
                t["work_remaining"],
            ]
        if t.get("crashes") and t.get("last_crash_output"):
            lines += [
                "",
                f"Last {len(t['last_crash_output'])} lines of its last crashed run:",
                "",
                "```",
                *t["last_crash_output"],
                "```",
            ]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` into the run directory (each whole or not at
    all: a full disk raises, and leaves no half report)."""
    md, js = run_dir / "report.md", run_dir / "report.json"
    write_text_atomic(md, render_markdown(report))
    write_text_atomic(js, _json_text(report))
    return md, js


async def notify(
    command: Sequence[str] | None,
    webhook: str | None,
    report_json: Path,
    *,
    timeout: float = 30.0,
) -> list[str]:
    """Run the notify command (``{report}`` → the JSON path) and POST the JSON to the webhook.

    Returns one line per failure; failures never raise.
    """
    problems: list[str] = []
    if command:
        argv = [part.replace("{report}", str(report_json)) for part in command]
        if not any("{report}" in part for part in command):
            argv.append(str(report_json))
        try:
            with anyio.fail_after(timeout):
                done = await anyio.run_process(argv, check=False)
            if done.returncode != 0:
                problems.append(f"notify command {argv[0]} exited {done.returncode}")
        except TimeoutError:
            problems.append(f"notify command {argv[0]} took longer than {timeout:g}s")
        except OSError as exc:
            problems.append(f"notify command {argv[0]} could not run: {exc.strerror}")
    if webhook:
        import urllib.request  # only here: 15 ms of every start for a rarely used hook

        body = report_json.read_bytes()

        def post() -> int:
            request = urllib.request.Request(
                webhook, data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return int(response.status)

        try:
            status = await anyio.to_thread.run_sync(post)
            if status >= 300:
                problems.append(f"webhook answered HTTP {status}")
        except Exception as exc:  # any network failure is reported, never fatal
            problems.append(f"webhook POST failed: {exc}")
    return problems


async def write_and_notify(
    summary: dict[str, Any],
    shift_dir: Path,
    hosts: Mapping[str, Host],
    config: FleetConfig,
    log: structlog.typing.FilteringBoundLogger,
    *,
    default_branch: Mapping[str, str],
) -> None:
    """Write a shift's morning report and run the notification hooks, within
    :data:`REPORT_TIMEOUT`; every failure is a line in the log, never the shift's exit code.
    A Ctrl-C or SIGTERM meanwhile skips what is left of them, and only that: the fleet still
    ends in order (``agentize-fleet report`` writes the report later)."""

    async def write() -> None:
        try:
            data = await collect(
                summary,
                shift_dir,
                hosts,
                milestone_globs=config.milestone_globs,
                default_branch=default_branch,
            )
            _, report_json = write_report(shift_dir, data)
        except OSError as exc:  # a full disk, a directory that refuses
            log.warning(
                "report-failed",
                msg=f"✗ cannot write the report in {shift_dir}: "
                f"{exc.strerror or exc}; `agentize-fleet report --shift "
                f"{shift_dir.name}` writes it later",
                error=str(exc),
            )
            return
        except Exception as exc:  # the report must never cost the summary or the exit code
            log.warning("report-failed", msg=f"could not write the report: {exc!r}")
            return
        hooks = config.notify
        if hooks.command or hooks.webhook:
            problems = await notify(
                hooks.command, hooks.webhook, report_json, timeout=hooks.timeout
            )
            for problem in problems:
                log.warning("notify-failed", msg=f"notification failed: {problem}")
            if not problems:
                log.info("notified", msg="notifications sent")

    await _skippable(write, shift_dir, log)


async def _skippable(
    work: Callable[[], Awaitable[None]],
    shift_dir: Path,
    log: structlog.typing.FilteringBoundLogger,
) -> None:
    """Run ``work`` for at most :data:`REPORT_TIMEOUT`, shielded from the fleet's own
    cancellation; a Ctrl-C or SIGTERM meanwhile ends it, said in the log."""
    with (
        anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        anyio.move_on_after(REPORT_TIMEOUT, shield=True) as scope,
    ):

        async def skip_on_signal() -> None:
            async for signum in signals:
                log.info(
                    "report-skipped",
                    msg=f"{signal.Signals(signum).name}: report and notifications skipped "
                    f"(`agentize-fleet report --shift {shift_dir.name}` writes the report)",
                )
                scope.cancel()
                return

        async with anyio.create_task_group() as tg:
            tg.start_soon(skip_on_signal)
            await work()
            tg.cancel_scope.cancel()


def dead_shift_summary(
    ledger: Ledger, shift_id: str, shift_dir: Path, *, found_by: str, notes: list[str]
) -> dict[str, Any]:
    """The ``summary.json`` of a shift whose ``up`` died, written by the shift that found it:
    what the ledger says of it, and what the finder did with the runs it left."""
    summary = summary_from_ledger(ledger, shift_id, None) or {"fleet": shift_id}
    return {
        **summary,
        "run_dir": str(shift_dir),
        "ended_at": None,
        "exit_code": None,
        "exit_meaning": f"supervisor died; found by fleet {found_by}",
        "orphans": notes,
    }


def workers_of(ledger: Ledger, shift: str) -> list[dict[str, Any]]:
    """A shift's workers as its summary lists them, from the ledger (for a shift whose
    supervisor died before writing its summary)."""
    tasks = ledger.tasks()
    rows = []
    for w in ledger.workers(shift):
        task = tasks.get(w.issue)
        ended = w.ended_at
        usage = asdict(ledger.task_usage(w.issue))
        rows.append(
            {
                **usage,
                "outcome": task.outcome if task else None,
                "result_text": task.result_text if task else None,
                "worker": w.worker,
                "task": w.issue,
                "title": task.title if task else "",
                "state": w.state,
                "reason": w.reason,
                "adopted_from": w.adopted_from,
                "machine": task.machine if task else None,
                "workspace": task.workspace if task else None,
                "runs": task.runs if task else 0,
                "milestones": task.milestones if task else 0,
                "crashes": task.crashes if task else 0,
                "last_crash_run": task.last_crash_run if task else None,
                "usage_pauses": task.usage_pauses if task else 0,
                "last_exit": task.last_exit if task else None,
                "started_at": w.started_at,
                "ended_at": ended,
                "wall_time": round((ended or w.started_at or 0) - (w.started_at or 0), 3),
            }
        )
    return rows


def summary_from_ledger(
    ledger: Ledger, shift: str, running_pid: int | None
) -> dict[str, Any] | None:
    """What ``summary.json`` would say of a shift that never wrote one (its ``up`` died, or
    still runs: ``running_pid`` is the pid holding the state directory's lock, if any)."""
    record = ledger.shift(shift)
    if record is None:
        return None
    running = record.state == "running" and running_pid == record.pid
    return {
        "fleet": shift,
        "name": record.name,
        "pid": record.pid,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "exit_code": record.exit_code,
        "exit_meaning": record.exit_meaning or ("still running" if running else "supervisor died"),
        "workers": workers_of(ledger, shift),
        "machine_events": ledger.machine_events(shift=shift),
        "runs": spend.run_rows(ledger, shift),
        "holds": ledger.holds(shift=shift),
    }


def summary_table(statuses: Sequence[Mapping[str, Any]]) -> str:
    """The end-of-shift table: per task its state, runs, milestones, crashes and wall time (and
    its cost, when an agent reported one)."""
    header = ("worker", "task", "machine", "state", "runs", "milestones", "crashes", "wall", "note")
    rows: list[tuple[str, ...]] = [header] + [
        (
            str(s["worker"]),
            f"#{s['task']}",
            s.get("machine") or "-",
            str(s["state"]),
            str(s.get("runs") or 0),
            str(s.get("milestones") or 0),
            str(s.get("crashes") or 0),
            f"{float(s.get('wall_time') or 0):.1f}s",
            str(s.get("reason") or "") if s["state"] != "done" else "",
        )
        for s in statuses
    ]
    if any(s.get("cost_usd") is not None for s in statuses):
        rows = [(*rows[0][:-1], "cost", rows[0][-1])] + [
            (*row[:-1], spend.usd(s.get("cost_usd")), row[-1])
            for row, s in zip(rows[1:], statuses, strict=True)
        ]
    return text_table(rows, rule=True)
