"""The ``agentize-fleet`` command line.

Each sub-command is a small function over the library; errors a user can cause (a bad config,
an unreachable machine, a fleet already running) end as one clear paragraph on stderr and a
documented exit code (:mod:`supervisor.exitcodes`), never as a traceback.

What every command shares lives here, once: ``-c FILE`` before or after the sub-command, the
colour options, a usage error that shows the sub-command's own usage, and the end of a command
whose reader went away (``status --json | head``): quiet, exit 141.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, MutableMapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import structlog
from pydantic import ValidationError

from supervisor import commands as control_commands
from supervisor import control, durations, logcmd, report
from supervisor.agents.render import usd
from supervisor.allocator import keep_buffers
from supervisor.config import (
    ConfigError,
    FleetConfig,
    TaskConfig,
    load_config,
)
from supervisor.console import write_final
from supervisor.exitcodes import (
    DETAILS,
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_NOTHING,
    EXIT_USAGE,
)
from supervisor.fleet import Deadline, Fleet
from supervisor.ledger import Ledger, LedgerError
from supervisor.logwriter import LogUnwritable
from supervisor.records import STREAMS
from supervisor.rundir import (
    FleetLocked,
    StateDirUnusable,
    UnknownShift,
    acquire_lock,
    find_shift,
    list_shifts,
    lock_holder,
    prepare_socket_dir,
    prepare_state_dir,
    socket_path,
)

PROG = "agentize-fleet"
WORKSPACE_LOCK = ".agentize-fleet.lock"
GIT_CHECK_TIMEOUT = 30.0


class UsageError(Exception):
    """A bad flag value or an unknown name; exit 2 with the message and the command's usage."""


def _error(message: str, code: int = EXIT_USAGE) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace, **overrides: Any) -> FleetConfig:
    return load_config(args.config, **overrides)


def _state_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "state_dir", None):
        return Path(args.state_dir).expanduser().resolve()
    return _load(args).state_path


def colour_setting(args: argparse.Namespace) -> bool | None:
    """``--color``: True (always), False (never), None (auto: a terminal without NO_COLOR)."""
    return {"always": True, "never": False}.get(getattr(args, "color", "auto"))


# -- durations and deadlines ---------------------------------------------------------------

def parse_duration(text: str, flag: str = "--grace") -> float:
    """``8h``, ``30m``, ``45s``, ``1h30m``, ``90`` (seconds) → seconds, or a usage error."""
    try:
        return durations.parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def parse_clock(text: str, now: datetime, flag: str = "--until") -> datetime:
    """``07:00`` → the next 07:00 local time after ``now`` (today or tomorrow)."""
    try:
        clock = datetime.strptime(text.strip(), "%H:%M").time()
    except ValueError:
        raise UsageError(f"{flag} {text!r}: use HH:MM (24-hour local time), e.g. 07:00") from None
    moment = datetime.combine(now.date(), clock)
    return moment if moment > now else moment + timedelta(days=1)


def deadline_from(args: argparse.Namespace) -> Deadline:
    now = time.time()
    candidates = []
    if args.until:
        candidates.append(parse_clock(args.until, datetime.fromtimestamp(now)).timestamp())
    if args.max_duration:
        candidates.append(now + parse_duration(args.max_duration, "--max-duration"))
    if not candidates:
        return Deadline()
    soft = min(candidates)
    grace = parse_duration(args.grace) if args.grace else 1800.0
    return Deadline(soft=soft, hard=soft + grace)


# -- up ------------------------------------------------------------------------------------


def _not_a_repository(path: str) -> str | None:
    """Why git cannot clone the local repository ``path`` (None: it can).

    ``git ls-remote`` reads a repository exactly as ``git clone`` does (``path``, ``path/.git``
    or a bare one, never a parent directory's), so a directory that merely sits inside another
    work tree is refused here too.
    """
    try:
        done = subprocess.run(
            ["git", "ls-remote", "--heads", "--", path],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=GIT_CHECK_TIMEOUT, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except FileNotFoundError:
        return "git is not installed (not on PATH)"
    except subprocess.TimeoutExpired:
        return f"git ls-remote did not answer within {GIT_CHECK_TIMEOUT:g} s"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    return lines[0].removeprefix("fatal: ") if lines else f"git ls-remote exited {done.returncode}"


def preflight(config: FleetConfig) -> None:
    """What can be known wrong before anything starts: a missing repository or agent program.

    Without this, every task would fail (or crash-loop) one by one with the same cause.
    """
    file = config.source_file
    url = config.repository_url
    if url.startswith("/"):
        if not Path(url).exists():
            raise ConfigError(
                f"{file}: field `repository`: {url} does not exist; fix: give the path of a git "
                f"repository (relative paths are resolved against {config.base_dir}) or its URL."
            )
        why = _not_a_repository(url)
        if why is not None:
            raise ConfigError(
                f"{file}: field `repository`: {url} is not a git repository ({why}); fix: give "
                f"the path of a git repository (its work tree or a bare one) or its URL."
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
        colour = colour_setting(args)
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
    if not args.quiet:  # through a sink: a closed or stalled stdout is no error, no hang
        summary = result.run_dir / "summary.json"
        write_final(f"\n{report.summary_table([w.as_dict() for w in result.workers])}\n\n"
                    f"logs: {result.run_dir / 'fleet.jsonl'}\n"
                    f"summary: {summary if summary.exists() else 'not written (see the log)'}\n")
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
    tasks = []
    for t in found:
        try:
            tasks.append(TaskConfig(issue=t.issue, title=t.title))
        except ValidationError as exc:
            # One issue GitHub lists but no run could be started for (a NUL or 128 KiB in its
            # title) must not stop the others: it is left out, and said so.
            why = "; ".join(f"{'.'.join(map(str, e['loc']))} "
                            f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors())
            structlog.get_logger(__name__).warning(
                f"issue #{t.issue} from GitHub skipped: {why}"
            )
    return tasks


# -- talking to a running fleet ---------------------------------------------------------------


def _ask(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any] | int:
    state_dir = _state_dir(args)
    if lock_holder(state_dir) is None:
        print(f"{PROG}: no fleet is running on {state_dir}", file=sys.stderr)
        return EXIT_NOTHING
    try:
        return anyio.run(control.request, socket_path(state_dir), payload)
    except control.ControlError as exc:
        return _error(str(exc), EXIT_FAILED)


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
    if outcome and outcome not in (state, "done", "stopped", "restarted") and state not in (
        "running", "preparing", "pending", "stopping"
    ):
        return f"{state} ({outcome})"
    return state


def status_table(workers: list[dict[str, Any]], now: float) -> str:
    header = ("task", "worker", "machine", "state", "pid", "run", "milestones", "crashes",
              "uptime", "last out", "cpu%", "rss", "cost")
    rows = [header]
    for w in workers:
        started = w.get("run_started_at") if w.get("pid") else None
        cpu = w.get("cpu_percent")
        rows.append((
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
    start_holds = answer.get("held") or {}
    if start_holds:
        paused += f" (new runs held: {'; '.join(map(str, start_holds.values()))})"
    print(f"fleet {answer.get('fleet')} (pid {answer.get('pid')}){paused}")
    for machine in answer.get("machines", []):
        if machine.get("away") or machine.get("reach") not in ("up", "connecting"):
            print(f"machine {machine.get('away') or machine.get('name')} "
                  f"({machine.get('reach')})")
    held: dict[str, dict[str, Any]] = {}
    for hold in answer.get("holds") or []:  # the latest reset per machine
        if float(hold["until"]) > float(held.get(hold["machine"], {}).get("until", 0)):
            held[hold["machine"]] = hold
    for machine, hold in sorted(held.items()):
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(hold["until"])))
        print(f"machine {machine} held until {until}: {hold['reason']}")
    print(status_table(answer.get("workers", []), time.time()))
    return 0


def _command(command: control_commands.Command) -> Any:
    """The CLI side of one control command: send it, print the fleet's one-line answer; a
    request the fleet refuses (an unknown task, ...) is exit 2, as every refused request."""

    def run(args: argparse.Namespace) -> int:
        try:
            payload = command.payload(args)
        except control_commands.CommandError as exc:
            raise UsageError(str(exc)) from None
        answer = _ask(args, payload)
        if isinstance(answer, int):
            return answer
        if not answer.get("ok"):
            return _error(str(answer.get("error")), EXIT_USAGE)
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
    try:
        md, js = report.write_report(info.path, data)
    except OSError as exc:
        return _error(f"cannot write the report in {info.path}: {exc.strerror or exc}; fix: "
                      "give its disk room and make it writable by you", EXIT_FAILED)
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
    return 0 if all(row.ok for row in rows) else EXIT_FAILED


# -- cron -----------------------------------------------------------------------------------


def crontab_quote(word: str) -> str:
    """``word`` as one word of a crontab command: quoted for ``/bin/sh``, ``%`` escaped.

    cron hands the command to ``/bin/sh -c`` after turning every unescaped ``%`` into a
    newline (crontab(5)); a backslash before a ``%`` keeps it, and cron removes that backslash.
    """
    if "\n" in word or "\r" in word:
        raise UsageError(f"{word!r} holds a line break, which a crontab line cannot carry")
    if "\\" in word:
        raise UsageError(
            f"{word!r} holds a backslash, which cron's %-escaping makes ambiguous; "
            "fix: use a path without one"
        )
    return shlex.quote(word).replace("%", "\\%")


def systemd_quote(word: str, *, expand: bool = True) -> str:
    """``word`` as one word of a systemd unit setting (systemd.service(5), "Command lines").

    Double-quoted with C escapes for ``\\`` and ``"``; ``%`` doubled (systemd expands
    specifiers such as ``%h`` there); in ``ExecStart=`` (``expand``), ``$`` doubled too, as
    systemd expands ``$VAR`` there.
    """
    if "\n" in word or "\r" in word:
        raise UsageError(f"{word!r} holds a line break, which a systemd unit cannot carry")
    text = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if expand:
        text = text.replace("$", "$$")
    return f'"{text}"'


def _self_command() -> list[str]:
    """How to start this same agentize-fleet from cron: the absolute path of its script."""
    script = Path(sys.argv[0])
    if script.name == PROG and script.is_file() and os.access(script, os.X_OK):
        return [str(script.absolute())]
    beside = Path(sys.executable).parent / PROG
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside.absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "supervisor.cli"]


def cron_path() -> str:
    """The PATH for the nightly run: this one's (where the agent and git were just found).

    cron starts jobs with PATH=/usr/bin:/bin, where an agent installed in ~/.local/bin or
    /usr/local/bin is not found.  Relative entries are dropped: cron's working directory is
    the home directory, not this one.
    """
    seen: list[str] = []
    for entry in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if entry.startswith("/") and entry not in seen:
            seen.append(entry)
    return os.pathsep.join(seen or ["/usr/bin", "/bin"])


def cmd_cron(args: argparse.Namespace) -> int:
    """Print what to install for a nightly run: a crontab line and a systemd timer unit.

    The config is loaded and checked first (as ``up`` would): a line that only fails at 22:00
    helps nobody.  Both carry this shell's PATH, quoted for cron and for systemd.
    """
    now = datetime.now()
    at = parse_clock(args.at, now, "--at")
    parse_clock(args.until, now, "--until")
    parse_duration(args.grace)
    config = _load(args)
    preflight(config)
    config_file = Path(os.path.abspath(config.source_file))
    argv = [*_self_command(), "up", "--config", str(config_file), "--once",
            "--until", args.until, "--grace", args.grace, "--quiet"]
    path = cron_path()
    state = config.state_path
    log = state / "cron.log"
    # The log's directory must exist before cron's shell opens the log, or the job never starts.
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    cron_line = (
        f"{at.minute} {at.hour} * * * PATH={crontab_quote(path)} "
        + " ".join(crontab_quote(word) for word in argv)
        + f" >>{crontab_quote(str(log))} 2>&1"
    )
    exec_start = " ".join(systemd_quote(word) for word in argv)
    environment = systemd_quote(f"PATH={path}", expand=False)
    print(f"""# crontab -e, then add (starts at {args.at} every day; exit codes: see the README;
# output in {log}):
{cron_line}

# or, with systemd (user units): ~/.config/systemd/user/agentize-fleet.service
[Unit]
Description=agentize-fleet nightly shift

[Service]
Type=exec
Environment={environment}
ExecStart={exec_start}
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


# -- completion -------------------------------------------------------------------------------

SHELLS = ("bash", "zsh", "fish")


def cmd_completion(args: argparse.Namespace) -> int:
    """Print the shell completion script for ``args.shell`` (made by shtab from the parser)."""
    import shtab  # only this command needs it

    parser = build_parser()
    for action in _all_actions(parser):
        if action.metavar == "FILE":
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        elif action.metavar == "DIR":
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    print(shtab.complete(parser, shell=args.shell), end="")
    return 0


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every argument of ``parser`` and of its sub-commands (each parser once)."""
    found: list[argparse.Action] = []
    seen: set[int] = set()
    todo = [parser]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for action in current._actions:
            found.append(action)
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return found


# -- the parser ---------------------------------------------------------------------------------


def version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(PROG)
    except PackageNotFoundError:
        return "0+unknown"


def _exit_code_list() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in DETAILS.items())


def _config_option(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before the sub-command and after it.  The sub-command's copy has no default, so
    # that `-c FILE up` is not undone by `up`'s own (absent) option.
    parser.add_argument(
        "-c", "--config", metavar="FILE", default=None if top else argparse.SUPPRESS,
        help="fleet config (default: configs/fleet.toml)",
    )


def colour_options(parser: argparse.ArgumentParser) -> None:
    """``--color=never|auto|always`` and ``--no-colour`` (``--no-color``), for every command
    that prints colour."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--color", "--colour", choices=("never", "auto", "always"), default="auto",
        help="colour the prefixes: never, auto (a terminal without NO_COLOR: the default) "
        "or always",
    )
    group.add_argument(
        "--no-colour", "--no-color", dest="color", action="store_const", const="never",
        help="same as --color=never",
    )


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _shift_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--shift", "--run", dest="shift", metavar="ID",
        help=f"the shift {what} (its id or a unique prefix; default: the latest); "
        "--run is its old name",
    )


def _logs_options(logs: argparse.ArgumentParser) -> None:
    _shift_option(logs, "to print")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new records until the fleet ends"
    )
    logs.add_argument(
        "-n", "--tail", dest="lines", type=_count, metavar="N",
        help="start from the last N matching records (default: all)",
    )
    logs.add_argument(
        "--task", type=control_commands.issue_number, action="append", metavar="N",
        help="only task N (repeatable)"
    )
    logs.add_argument(
        "--machine", action="append", metavar="NAME", help="only machine NAME (repeatable)"
    )
    logs.add_argument(
        "--worker", action="append", metavar="NAME", help="only worker NAME, e.g. w2 (repeatable)"
    )
    logs.add_argument(
        "--stream", action="append", choices=STREAMS,
        help="only this stream: stdout, stderr or fleet (repeatable)",
    )
    logs.add_argument(
        "--since", metavar="WHEN", help="only records since 10m, 2h, 30s, or an ISO-8601 time"
    )
    logs.add_argument("--grep", metavar="REGEX", help="only records whose line matches REGEX")
    logs.add_argument(
        "--session", metavar="ID",
        help="only the runs in agent session ID (or a unique start of it), and the runs that "
        "resumed it; default shift: that of its last run",
    )
    logs.add_argument("--json", action="store_true", help="print the raw JSONL records")
    colour_options(logs)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every command, its arguments and their help."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Supervise a fleet of headless coding agents, one per issue, each in its "
        "own git worktree.",
        epilog=_exit_code_list(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}",
                        help="print the version and exit")
    _config_option(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     title="commands")

    def command(
        name: str, help: str, func: Callable[[argparse.Namespace], int], *,
        aliases: Sequence[str] = (), state: bool = True, config: bool = True,
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, aliases=list(aliases), help=help,
                                  description=description or help[0].upper() + help[1:] + ".")
        if config:
            _config_option(sub, top=False)
        if state:
            sub.add_argument("--state-dir", metavar="DIR",
                             help="state directory (default: the config's state_dir)")
        sub.set_defaults(func=func, command_parser=sub)
        return sub

    up = command("up", "run the fleet in the foreground until every task has ended", cmd_up,
                 state=False)
    up.add_argument("--concurrency", type=int, metavar="N", help="at most N agents at once")
    up.add_argument("-q", "--quiet", action="store_true", help="no terminal output")
    colour_options(up)
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
    again.add_argument("--rerun", type=control_commands.issue_number, action="append",
                       metavar="ISSUE",
                       help="run this task again although the ledger has it done (repeatable)")
    again.add_argument("--fresh", action="store_true",
                       help="start every listed task anew, done ones too (run numbers go on)")

    logs = command(
        "logs", "print a shift's log (-f: follow it)", logcmd.cmd_logs,
        description="Print the records of a shift (the latest, or --shift ID) with the live "
        "view's prefixes, or raw with --json; -f keeps following until the fleet ends.",
    )
    _logs_options(logs)

    status = command("status", "show the running fleet's tasks and runs", cmd_status,
                     aliases=["ps"])
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    for entry in control_commands.COMMANDS.values():
        if entry.custom_output:
            continue
        sub = command(entry.name, entry.help, _command(entry))
        for flags, options in entry.arguments:
            sub.add_argument(*flags, **options)

    shifts = command("shifts", "list past shifts and how they ended (old name: runs)", cmd_runs,
                     aliases=["runs"])
    shifts.add_argument("--json", action="store_true", help="print JSON instead of a table")

    rep = command("report", "write (again) a shift's morning report", cmd_report)
    _shift_option(rep, "to report on")
    rep.add_argument("--print", action="store_true", help="print the Markdown report too")

    command("check", "can every machine run agents? (a table: reachable, auth, git, agent, ...)",
            cmd_check, state=False)

    cron = command("cron", "print a crontab line and a systemd timer for nightly shifts",
                   cmd_cron, state=False)
    cron.add_argument("--at", metavar="HH:MM", default="22:00", help="start time (22:00)")
    cron.add_argument("--until", metavar="HH:MM", default="07:00", help="soft deadline (07:00)")
    cron.add_argument("--grace", metavar="DUR", default="30m", help="grace after it (30m)")

    completion = command(
        "completion", "print a shell completion script", cmd_completion,
        state=False, config=False,
        description="Print the completion script for SHELL. bash: "
        f"`eval \"$({PROG} completion bash)\"` in ~/.bashrc; zsh: save it as _{PROG} in a "
        f"directory of $fpath; fish: save it as ~/.config/fish/completions/{PROG}.fish.",
    )
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL",
                            help="bash, zsh or fish")
    return parser


# -- running a command --------------------------------------------------------------------------


def _warning_line(
    _logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A library's warning as one line on stderr (``up`` routes them into its log instead)."""
    event = str(event_dict.pop("event", ""))
    machine = event_dict.pop("machine", None)
    details = " ".join(f"{k}={v}" for k, v in event_dict.items())
    where = f"{machine}: " if machine else ""
    print(f"{PROG}: {method}: {where}{event}" + (f" ({details})" if details else ""),
          file=sys.stderr)
    raise structlog.DropEvent


def _output_closed() -> int:
    """The reader of stdout went away: point stdout at /dev/null, so that the flush at exit
    fails no more, and end quietly (Python's signal module documentation, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every command ends the same way on Ctrl-C (130) and on a closed
    output (141, quietly: ``shifts | head``, ``--help | head`` included)."""
    # Library warnings go to stderr as one line each (``up`` routes them into the fleet's log
    # instead), so that stdout carries only what a command is asked for: a table, JSON, logs.
    structlog.configure(
        processors=[_warning_line],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=False,
    )
    try:
        try:
            return _run(argv)
        finally:
            # Flushed here, not at exit: a failed flush at exit is a traceback-like message
            # and exit code 120, whatever the command returned.
            sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _output_closed()


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command_parser: argparse.ArgumentParser = getattr(args, "command_parser", parser)
    if extra:
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code: int = args.func(args)
    except UsageError as exc:
        command_parser.print_usage(sys.stderr)
        return _error(str(exc))
    except (ConfigError, StateDirUnusable, LedgerError, LogUnwritable) as exc:
        return _error(str(exc))
    return code


if __name__ == "__main__":
    sys.exit(main())
