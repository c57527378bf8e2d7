"""The ``agentize-fleet`` command line.

Each sub-command is a small function over the library; errors a user can cause (a bad config,
an unreachable machine, a fleet already running) end as one clear paragraph on stderr and a
documented exit code, never as a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import structlog

from supervisor import commands as control_commands
from supervisor import control, durations, report
from supervisor.allocator import keep_buffers
from supervisor.config import ConfigError, FleetConfig, TaskConfig, load_config
from supervisor.exitcodes import EXIT_FAILED, EXIT_LOCKED, EXIT_NOTHING, EXIT_USAGE
from supervisor.fleet import Deadline, Fleet
from supervisor.ledger import Ledger, LedgerError
from supervisor.rundir import (
    FleetLocked,
    StateDirUnusable,
    acquire_lock,
    find_shift,
    list_shifts,
    lock_holder,
    prepare_socket_dir,
    prepare_state_dir,
    socket_path,
)
from supervisor.tail import add_logs_parser

PROG = "agentize-fleet"
WORKSPACE_LOCK = ".agentize-fleet.lock"


class UsageError(Exception):
    """A bad flag value; exit 2 with the message."""


def _error(message: str, code: int = EXIT_USAGE) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace, **overrides: object) -> FleetConfig:
    return load_config(args.config, **overrides)


def _state_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "state_dir", None):
        return Path(args.state_dir).expanduser().resolve()
    return _load(args).state_path


# -- durations and deadlines ---------------------------------------------------------------

def parse_duration(text: str) -> float:
    """``8h``, ``30m``, ``45s``, ``1h30m``, ``90`` (seconds) → seconds, or a usage error."""
    try:
        return durations.parse_duration(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_clock(text: str, now: datetime) -> datetime:
    """``07:00`` → the next 07:00 local time after ``now`` (today or tomorrow)."""
    try:
        clock = datetime.strptime(text.strip(), "%H:%M").time()
    except ValueError:
        raise UsageError(f"--until {text!r}: use HH:MM (24-hour local time), e.g. 07:00") from None
    moment = datetime.combine(now.date(), clock)
    return moment if moment > now else moment + timedelta(days=1)


def deadline_from(args: argparse.Namespace) -> Deadline:
    now = time.time()
    candidates = []
    if args.until:
        candidates.append(parse_clock(args.until, datetime.fromtimestamp(now)).timestamp())
    if args.max_duration:
        candidates.append(now + parse_duration(args.max_duration))
    if not candidates:
        return Deadline()
    soft = min(candidates)
    grace = parse_duration(args.grace) if args.grace else 1800.0
    return Deadline(soft=soft, hard=soft + grace)


# -- up ------------------------------------------------------------------------------------


def preflight(config: FleetConfig) -> None:
    """What can be known wrong before anything starts: a missing repository or agent program.

    Without this, every task would fail (or crash-loop) one by one with the same cause.
    """
    file = config.source_file
    url = config.repository_url
    if url.startswith("/") and not Path(url).exists():
        raise ConfigError(
            f"{file}: field `repository`: {url} does not exist; fix: give the path of a git "
            f"repository (relative paths are resolved against {config.base_dir}) or its URL."
        )
    program = config.agent_command[0]
    if config.local.max_agents > 0 and "{" not in program and shutil.which(program) is None:
        raise ConfigError(
            f"{file}: field `agent.command`: the program {program!r} is not found (not on PATH, "
            f"or not executable); fix: install it, or give its absolute path."
        )


def cmd_up(args: argparse.Namespace) -> int:
    """Run the fleet in the foreground until every task has ended (or it is stopped)."""
    config = _load(args, concurrency=args.concurrency)
    preflight(config)
    deadline = deadline_from(args)
    prepare_state_dir(config.state_path)
    prepare_socket_dir(config.state_path)
    locks = []
    try:
        locks.append(acquire_lock(config.state_path))
        if config.local.max_agents > 0:
            locks.append(acquire_lock(config.resolve(config.workspace_root), WORKSPACE_LOCK))
    except FleetLocked as exc:
        for held in locks:
            held.release()
        return _error(str(exc), EXIT_LOCKED)
    try:
        github = config.tasks.source == "github"
        if args.watch and not github:
            raise UsageError('--watch needs tasks.source = "github" in the config')
        if github:
            config.tasks.items = anyio.run(_github_tasks, config)
        if not config.tasks.items and not args.watch:
            print(f"{PROG}: nothing to do: no tasks", file=sys.stderr)
            return EXIT_NOTHING
        listed = {t.issue for t in config.tasks.items}
        unknown = sorted(set(args.rerun or ()) - listed)
        if unknown:
            raise UsageError(f"--rerun {unknown[0]}: the config lists no task #{unknown[0]}")
        colour = False if args.no_colour else None
        fleet = Fleet(
            config,
            console=None if args.quiet else sys.stdout,
            colour=colour,
            deadline=deadline,
            watch=(lambda: _github_tasks(config)) if args.watch else None,
            rerun=args.rerun or (),
            fresh=args.fresh,
        )
        keep_buffers()
        # What exists now (modules, the config) lives as long as the process: the collector
        # need not walk it again at every full collection while output streams through.
        gc.freeze()
        result = anyio.run(fleet.run)
    finally:
        for held in locks:
            held.release()
    if not args.quiet:
        print()
        print(report.summary_table([w.as_dict() for w in result.workers]))
        print(f"\nlogs: {result.run_dir / 'fleet.jsonl'}")
        print(f"summary: {result.run_dir / 'summary.json'}")
    return result.exit_code


async def _github_tasks(config: FleetConfig) -> list[TaskConfig]:
    from supervisor.sources import GitHubQuery, TaskSourceError, fetch_github_tasks

    src = config.tasks
    query = GitHubQuery(
        repo=src.repo,
        labels=tuple(src.labels),
        assignee=src.assignee,
        milestone=src.milestone,
        limit=src.limit,
        skip_labels=tuple(src.skip_labels),
    )
    try:
        found = await fetch_github_tasks(query, gh=src.gh, cwd=str(config.base_dir))
    except TaskSourceError as exc:
        raise ConfigError(
            f"{config.source_file}: tasks.source = \"github\" (path to gh: tasks.gh): {exc}"
        ) from None
    return [TaskConfig(issue=t.issue, title=t.title) for t in found]


# -- talking to a running fleet ---------------------------------------------------------------


def _ask(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any] | int:
    state_dir = _state_dir(args)
    if lock_holder(state_dir) is None:
        print(f"{PROG}: no fleet is running on {state_dir}", file=sys.stderr)
        return EXIT_NOTHING
    try:
        return anyio.run(control.request, socket_path(state_dir), payload)
    except control.ControlError as exc:
        return _error(str(exc), 1)


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


def status_table(workers: list[dict[str, Any]], now: float) -> str:
    header = ("task", "worker", "machine", "state", "pid", "run", "milestones", "crashes",
              "uptime", "last out", "cpu%", "rss")
    rows = [header]
    for w in workers:
        started = w.get("run_started_at") if w.get("pid") else None
        cpu = w.get("cpu_percent")
        rows.append((
            f"#{w['task']}",
            str(w["worker"]),
            str(w.get("machine") or "-"),
            str(w["state"]),
            str(w.get("pid") or "-"),
            str(w.get("runs") or 0),
            str(w.get("milestones") or 0),
            str(w.get("crashes") or 0),
            _age(now - started) if started else "-",
            _age(w.get("last_output_age")),
            "-" if cpu is None else f"{cpu:.0f}",
            _human_bytes(w.get("rss_bytes")),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(n) for c, n in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def cmd_status(args: argparse.Namespace) -> int:
    """Show the running fleet's workers."""
    answer = _ask(args, {"cmd": "status"})
    if isinstance(answer, int):
        return answer
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
        return 0
    paused = " (new runs paused)" if answer.get("paused") else ""
    print(f"fleet {answer.get('fleet')} (pid {answer.get('pid')}){paused}")
    print(status_table(answer.get("workers", []), time.time()))
    return 0


def _command(command: control_commands.Command) -> Any:
    """The CLI side of one control command: send it, print the fleet's one-line answer."""

    def run(args: argparse.Namespace) -> int:
        answer = _ask(args, command.payload(args))
        if isinstance(answer, int):
            return answer
        if not answer.get("ok"):
            return _error(str(answer.get("error")), EXIT_FAILED)
        print(f"{PROG}: {answer.get('message') or command.name}")
        return 0

    return run


def _open_ledger(state_dir: Path) -> Ledger | None:
    try:
        return Ledger.reader(state_dir)
    except LedgerError as exc:
        raise UsageError(str(exc)) from None


def cmd_runs(args: argparse.Namespace) -> int:
    """List the shifts (one per ``up``) with what became of their tasks, from the ledger."""
    state_dir = _state_dir(args)
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
            meaning = (record.exit_meaning if record is not None
                       else summary.get("exit_meaning")) or ""
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
            rows.append((info.shift_id, state, str(row["tasks"]), str(row["done"]),
                         str(row["failed"]), "-" if row["exit_code"] is None
                         else str(row["exit_code"]), str(row["meaning"])))
    finally:
        if ledger is not None:
            ledger.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(n) for c, n in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild a shift's report.md/report.json from its summary (or the ledger, for a shift
    whose ``up`` died), its log and its worktrees."""
    config = _load(args)
    state_dir = _state_dir(args)
    ledger = _open_ledger(state_dir)
    try:
        info = find_shift(state_dir, ledger, args.run)
        if info is None:
            what = f"no shift matching {args.run!r}" if args.run else "no fleet runs (shifts)"
            print(f"{PROG}: {what} in {state_dir}", file=sys.stderr)
            return EXIT_NOTHING
        summary = info.summary
        if summary is None and ledger is not None:
            summary = report.summary_from_ledger(ledger, info.shift_id, lock_holder(state_dir))
    finally:
        if ledger is not None:
            ledger.close()
    if summary is None:
        return _error(f"shift {info.shift_id} has neither summary.json nor a ledger row",
                      EXIT_FAILED)
    found = summary

    async def build() -> dict[str, Any]:
        hosts = Fleet.make_hosts(config)
        try:
            return await report.collect(
                found, info.path, hosts,
                milestone_globs=config.milestone_globs,
                default_branch={},
            )
        finally:
            for host in hosts.values():
                await host.aclose()

    data = anyio.run(build)
    md, js = report.write_report(info.path, data)
    if args.print:
        print(md.read_text(encoding="utf-8"), end="")
    print(f"{PROG}: wrote {md} and {js}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Connect to every machine and tell whether it can run agents (exit 1 if one cannot)."""
    from supervisor.check import check_machine, format_check_table
    from supervisor.claim import Claimant, stale_after
    from supervisor.hosts.local import LocalHost

    config = _load(args)
    hosts = Fleet.make_hosts(config)
    hosts.setdefault("local", LocalHost("local"))
    agent = config.agent_command[0]
    workdirs = {"local": str(config.resolve(config.workspace_root))}
    workdirs.update({m.name: m.workdir for m in config.machines})
    holder = Claimant.for_state_dir(config.state_path, "-").holder

    async def check_all() -> list[Any]:
        rows: dict[str, Any] = {}

        async def one(name: str) -> None:
            rows[name] = await check_machine(
                hosts[name], agent_executable=agent, workdir=workdirs[name], holder=holder,
                stale_after=stale_after(config.lease_timeout),
            )

        try:
            async with anyio.create_task_group() as tg:
                for name in hosts:
                    tg.start_soon(one, name)
        finally:
            for host in hosts.values():
                await host.aclose()
        return [rows[name] for name in hosts]

    rows = anyio.run(check_all)
    print(format_check_table(rows))
    return 0 if all(row.ok for row in rows) else 1


def cmd_cron(args: argparse.Namespace) -> int:
    """Print what to install for a nightly run: a crontab line and a systemd timer unit."""
    at = parse_clock(args.at, datetime.now())
    parse_clock(args.until, datetime.now())
    parse_duration(args.grace)
    exe = Path(sys.argv[0]).resolve() if Path(sys.argv[0]).exists() else Path(PROG)
    config = Path(args.config or "configs/fleet.toml").expanduser().resolve()
    command = (f"{exe} up --config {config} --once --until {args.until} --grace {args.grace}"
               " --quiet")
    log = config.parent / "fleet-cron.log"
    print(f"""# crontab -e, then add (starts at {args.at} every day; exit codes: see the README):
{at.minute} {at.hour} * * * {command} >>{log} 2>&1

# or, with systemd (user units): ~/.config/systemd/user/agentize-fleet.service
[Unit]
Description=agentize-fleet nightly run

[Service]
Type=exec
ExecStart={command}
KillMode=mixed
TimeoutStopSec=120

# ~/.config/systemd/user/agentize-fleet.timer
[Unit]
Description=agentize-fleet nightly at {args.at}

[Timer]
OnCalendar=*-*-* {at.hour:02d}:{at.minute:02d}:00
Persistent=false

[Install]
WantedBy=timers.target

# then: systemctl --user daemon-reload && systemctl --user enable --now agentize-fleet.timer""")
    return 0


# -- the parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Supervise a fleet of headless coding agents, one per issue, each in its "
        "own git worktree.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(sub: argparse.ArgumentParser, state: bool = True) -> argparse.ArgumentParser:
        sub.add_argument(
            "-c", "--config", metavar="FILE", help="fleet config (default: configs/fleet.toml)"
        )
        if state:
            sub.add_argument("--state-dir", metavar="DIR", help="state directory (default: "
                             "the config's state_dir)")
        return sub

    up = with_config(commands.add_parser("up", help="run the fleet in the foreground"), False)
    up.add_argument("--concurrency", type=int, metavar="N", help="at most N agents at once")
    up.add_argument("-q", "--quiet", action="store_true", help="no terminal output")
    up.add_argument("--no-colour", "--no-color", action="store_true", help="plain prefixes")
    up.add_argument("--until", metavar="HH:MM", help="soft deadline: no new run after this time")
    up.add_argument("--max-duration", metavar="DUR", help="soft deadline after DUR (8h, 90m)")
    up.add_argument("--grace", metavar="DUR",
                    help="after the soft deadline, running agents may finish for DUR (30m)")
    once = up.add_mutually_exclusive_group()
    once.add_argument("--once", action="store_true",
                      help="exit when the queue is drained (the default)")
    once.add_argument("--watch", action="store_true",
                      help="keep polling the GitHub task source for new issues")
    again = up.add_mutually_exclusive_group()
    again.add_argument("--rerun", type=int, action="append", metavar="ISSUE",
                       help="run this task again although the ledger has it done (repeatable)")
    again.add_argument("--fresh", action="store_true",
                       help="start every listed task anew, done ones too (run numbers go on)")
    up.set_defaults(func=cmd_up)

    add_logs_parser(commands)

    rep = with_config(commands.add_parser("report", help="write (again) a run's morning report"))
    rep.add_argument("--shift", "--run", dest="run", metavar="ID",
                     help="shift id or unique prefix (default: latest)")
    rep.add_argument("--print", action="store_true", help="print the Markdown report too")
    rep.set_defaults(func=cmd_report)

    check = with_config(commands.add_parser("check", help="can every machine run agents?"), False)
    check.set_defaults(func=cmd_check)

    cron = with_config(commands.add_parser("cron", help="print a crontab line and a systemd "
                                           "timer for nightly runs"), False)
    cron.add_argument("--at", metavar="HH:MM", default="22:00", help="start time (22:00)")
    cron.add_argument("--until", metavar="HH:MM", default="07:00", help="soft deadline (07:00)")
    cron.add_argument("--grace", metavar="DUR", default="30m", help="grace after it (30m)")
    cron.set_defaults(func=cmd_cron)

    status = with_config(commands.add_parser("status", aliases=["ps"],
                                             help="show the running fleet"))
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.set_defaults(func=cmd_status)

    for command in control_commands.COMMANDS.values():
        if command.custom_output:
            continue
        sub = with_config(commands.add_parser(command.name, help=command.help))
        for flags, options in command.arguments:
            sub.add_argument(*flags, **options)
        sub.set_defaults(func=_command(command))
    runs = with_config(commands.add_parser("shifts", aliases=["runs"],
                                           help="list past and running shifts (one per `up`)"))
    runs.add_argument("--json", action="store_true", help="machine-readable")
    runs.set_defaults(func=cmd_runs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Library warnings go to stderr (``up`` routes them into the fleet's log instead), so that
    # stdout carries only what a command is asked for: a table, JSON, log lines.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except (ConfigError, UsageError, StateDirUnusable, LedgerError) as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
