"""The ``agentize-fleet`` command line: the parser, the command table, and how a command ends.

Each sub-command is a small function over the library; errors a user can cause (a bad config,
an unreachable machine, a fleet already running) end as one clear paragraph on stderr and a
documented exit code (:mod:`supervisor.exitcodes`), never as a traceback.

What every command shares lives here, once: ``-c FILE`` before or after the sub-command, the
colour options, a usage error that shows the sub-command's own usage, and the end of a command
whose reader went away (``status --json | head``): quiet, exit 141.  The helpers the commands
share are :mod:`supervisor.clicommon`'s; ``up``, ``check``, ``completion`` and the control
commands are here, the read-only views in :mod:`supervisor.views`, ``cron`` in
:mod:`supervisor.cron`, ``logs`` in :mod:`supervisor.logcmd`.  Those modules, and the fleet
itself, are imported when their command runs: every start builds the whole parser, and no
command should pay for the others' imports (``up``'s start-up CPU counts in every benchmark).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, MutableMapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from pydantic import ValidationError

from supervisor import commands as control_commands
from supervisor.allocator import keep_buffers
from supervisor.clicommon import (
    PROG,
    UsageError,
    ask,
    colour_setting,
    config_from,
    error,
    parse_clock,
    parse_duration,
    preflight,
)
from supervisor.config import FleetConfig, TaskConfig
from supervisor.config_errors import ConfigError
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
from supervisor.ledger import LedgerError
from supervisor.logwriter import LogUnwritable
from supervisor.records import STREAMS
from supervisor.rundir import (
    FleetLocked,
    StateDirUnusable,
    acquire_lock,
    prepare_socket_dir,
    prepare_state_dir,
)

if TYPE_CHECKING:
    from supervisor.fleet import Deadline

WORKSPACE_LOCK = ".agentize-fleet.lock"


# -- up ------------------------------------------------------------------------------------


def deadline_from(args: argparse.Namespace) -> Deadline:
    """``--until``, ``--max-duration`` and ``--grace`` as the shift's deadline."""
    from supervisor.fleet import Deadline  # start-up: only `up` runs a fleet

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


def cmd_up(args: argparse.Namespace) -> int:
    """Run the fleet in the foreground until every task has ended (or it is stopped)."""
    from supervisor import report  # start-up: only `up` runs a fleet (and reports on it)
    from supervisor.fleet import Fleet

    config = config_from(args, concurrency=args.concurrency)
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
        return error(str(exc), EXIT_LOCKED)
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
        write_final(
            f"\n{report.summary_table([w.as_dict() for w in result.workers])}\n\n"
            f"logs: {result.run_dir / 'fleet.jsonl'}\n"
            f"summary: {summary if summary.exists() else 'not written (see the log)'}\n"
        )
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
            f'{config.source_file}: tasks.source = "github" (path to gh: tasks.gh): {exc}'
        ) from None
    tasks = []
    for t in found:
        try:
            tasks.append(TaskConfig(issue=t.issue, title=t.title))
        except ValidationError as exc:
            # One issue GitHub lists but no run could be started for (a NUL or 128 KiB in its
            # title) must not stop the others: it is left out, and said so.
            why = "; ".join(
                f"{'.'.join(map(str, e['loc']))} {str(e['msg']).removeprefix('Value error, ')}"
                for e in exc.errors()
            )
            structlog.get_logger(__name__).warning(f"issue #{t.issue} from GitHub skipped: {why}")
    return tasks


# -- the control commands' CLI side ---------------------------------------------------------


def _command(command: control_commands.Command) -> Any:
    """The CLI side of one control command: send it, print the fleet's one-line answer; a
    request the fleet refuses (an unknown task, ...) is exit 2, as every refused request."""

    def run(args: argparse.Namespace) -> int:
        try:
            payload = command.payload(args)
        except control_commands.CommandError as exc:
            raise UsageError(str(exc)) from None
        answer = ask(args, payload)
        if isinstance(answer, int):
            return answer
        if not answer.get("ok"):
            return error(str(answer.get("error")), EXIT_USAGE)
        print(f"{PROG}: {answer.get('message') or command.name}")
        return 0

    return run


# -- check ---------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    """Connect to every machine and tell whether it can run agents (exit 1 if one cannot)."""
    from supervisor.check import check_machine, format_check_table
    from supervisor.claim import Claimant, stale_after
    from supervisor.fleet import Fleet
    from supervisor.hosts.local import LocalHost

    config = config_from(args)
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
                hosts[name],
                agent_executable=agent,
                workdir=workdirs[name],
                holder=holder,
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


def _deferred(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command whose module only it needs (``logs``, the views, ``cron``): imported when the
    command runs, not at every start (the parser is built for every command, ``up`` included)."""

    def run(args: argparse.Namespace) -> int:
        command: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(module), name
        )
        return command(args)

    run.__doc__ = f"``{name}`` of :mod:`{module}`, imported when it runs."
    return run


cmd_logs = _deferred("supervisor.logcmd", "cmd_logs")
cmd_status = _deferred("supervisor.views", "cmd_status")
cmd_runs = _deferred("supervisor.views", "cmd_runs")
cmd_report = _deferred("supervisor.views", "cmd_report")
cmd_cron = _deferred("supervisor.cron", "cmd_cron")


def version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(PROG)
    except PackageNotFoundError:
        return "0+unknown"


class _VersionAction(argparse._VersionAction):
    """``--version``, the version looked up only when asked for: finding it scans the installed
    distributions, which every other start would pay for."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        self.version = f"{PROG} {version()}"
        super().__call__(parser, namespace, values, option_string)


def _exit_code_list() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in DETAILS.items())


def _config_option(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before the sub-command and after it.  The sub-command's copy has no default, so
    # that `-c FILE up` is not undone by `up`'s own (absent) option.
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=None if top else argparse.SUPPRESS,
        help="fleet config (default: configs/fleet.toml)",
    )


def colour_options(parser: argparse.ArgumentParser) -> None:
    """``--color=never|auto|always`` and ``--no-colour`` (``--no-color``), for every command
    that prints colour."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--color",
        "--colour",
        choices=("never", "auto", "always"),
        default="auto",
        help="colour the prefixes: never, auto (a terminal without NO_COLOR: the default) "
        "or always",
    )
    group.add_argument(
        "--no-colour",
        "--no-color",
        dest="color",
        action="store_const",
        const="never",
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
        "--shift",
        "--run",
        dest="shift",
        metavar="ID",
        help=f"the shift {what} (its id or a unique prefix; default: the latest); "
        "--run is its old name",
    )


def _logs_options(logs: argparse.ArgumentParser) -> None:
    _shift_option(logs, "to print")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new records until the fleet ends"
    )
    logs.add_argument(
        "-n",
        "--tail",
        dest="lines",
        type=_count,
        metavar="N",
        help="start from the last N matching records (default: all)",
    )
    logs.add_argument(
        "--task",
        type=control_commands.issue_number,
        action="append",
        metavar="N",
        help="only task N (repeatable)",
    )
    logs.add_argument(
        "--machine", action="append", metavar="NAME", help="only machine NAME (repeatable)"
    )
    logs.add_argument(
        "--worker", action="append", metavar="NAME", help="only worker NAME, e.g. w2 (repeatable)"
    )
    logs.add_argument(
        "--stream",
        action="append",
        choices=STREAMS,
        help="only this stream: stdout, stderr or fleet (repeatable)",
    )
    logs.add_argument(
        "--since", metavar="WHEN", help="only records since 10m, 2h, 30s, or an ISO-8601 time"
    )
    logs.add_argument("--grep", metavar="REGEX", help="only records whose line matches REGEX")
    logs.add_argument(
        "--session",
        metavar="ID",
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
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the version and exit",
    )
    _config_option(parser, top=True)
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, title="commands"
    )

    def command(
        name: str,
        help: str,
        func: Callable[[argparse.Namespace], int],
        *,
        aliases: Sequence[str] = (),
        state: bool = True,
        config: bool = True,
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            aliases=list(aliases),
            help=help,
            description=description or help[0].upper() + help[1:] + ".",
        )
        if config:
            _config_option(sub, top=False)
        if state:
            sub.add_argument(
                "--state-dir",
                metavar="DIR",
                help="state directory (default: the config's state_dir)",
            )
        sub.set_defaults(func=func, command_parser=sub)
        return sub

    up = command(
        "up", "run the fleet in the foreground until every task has ended", cmd_up, state=False
    )
    up.add_argument("--concurrency", type=int, metavar="N", help="at most N agents at once")
    up.add_argument("-q", "--quiet", action="store_true", help="no terminal output")
    colour_options(up)
    up.add_argument("--until", metavar="HH:MM", help="soft deadline: no new run after this time")
    up.add_argument("--max-duration", metavar="DUR", help="soft deadline after DUR (8h, 90m)")
    up.add_argument(
        "--grace",
        metavar="DUR",
        help="after the soft deadline, running agents may finish for DUR (30m)",
    )
    once = up.add_mutually_exclusive_group()
    once.add_argument(
        "--once", action="store_true", help="exit when the queue is drained (the default)"
    )
    once.add_argument(
        "--watch", action="store_true", help="keep polling the GitHub task source for new issues"
    )
    again = up.add_mutually_exclusive_group()
    again.add_argument(
        "--rerun",
        type=control_commands.issue_number,
        action="append",
        metavar="ISSUE",
        help="run this task again although the ledger has it done (repeatable)",
    )
    again.add_argument(
        "--fresh",
        action="store_true",
        help="start every listed task anew, done ones too (run numbers go on)",
    )

    logs = command(
        "logs",
        "print a shift's log (-f: follow it)",
        cmd_logs,
        description="Print the records of a shift (the latest, or --shift ID) with the live "
        "view's prefixes, or raw with --json; -f keeps following until the fleet ends.",
    )
    _logs_options(logs)

    status = command(
        "status", "show the running fleet's tasks and runs", cmd_status, aliases=["ps"]
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    for entry in control_commands.COMMANDS.values():
        if entry.custom_output:
            continue
        sub = command(entry.name, entry.help, _command(entry))
        for flags, options in entry.arguments:
            sub.add_argument(*flags, **options)

    shifts = command(
        "shifts", "list past shifts and how they ended (old name: runs)", cmd_runs, aliases=["runs"]
    )
    shifts.add_argument("--json", action="store_true", help="print JSON instead of a table")

    rep = command("report", "write (again) a shift's morning report", cmd_report)
    _shift_option(rep, "to report on")
    rep.add_argument("--print", action="store_true", help="print the Markdown report too")

    command(
        "check",
        "can every machine run agents? (a table: reachable, auth, git, agent, ...)",
        cmd_check,
        state=False,
    )

    cron = command(
        "cron", "print a crontab line and a systemd timer for nightly shifts", cmd_cron, state=False
    )
    cron.add_argument("--at", metavar="HH:MM", default="22:00", help="start time (22:00)")
    cron.add_argument("--until", metavar="HH:MM", default="07:00", help="soft deadline (07:00)")
    cron.add_argument("--grace", metavar="DUR", default="30m", help="grace after it (30m)")

    completion = command(
        "completion",
        "print a shell completion script",
        cmd_completion,
        state=False,
        config=False,
        description="Print the completion script for SHELL. bash: "
        f'`eval "$({PROG} completion bash)"` in ~/.bashrc; zsh: save it as _{PROG} in a '
        f"directory of $fpath; fish: save it as ~/.config/fish/completions/{PROG}.fish.",
    )
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")
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
    print(
        f"{PROG}: {method}: {where}{event}" + (f" ({details})" if details else ""), file=sys.stderr
    )
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
        return error(str(exc))
    except (ConfigError, StateDirUnusable, LedgerError, LogUnwritable) as exc:
        return error(str(exc))
    return code


if __name__ == "__main__":
    sys.exit(main())
