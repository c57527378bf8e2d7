"""The ``agentize-fleet`` command line.

Each sub-command is a small function over the library; errors a user can cause (a bad config,
an unreachable machine) end as one clear paragraph on stderr and a documented exit code, never
as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

from supervisor.config import ConfigError, FleetConfig, load_config
from supervisor.fleet import EXIT_USAGE, Fleet, summary_table

PROG = "agentize-fleet"


def _error(message: str, code: int = EXIT_USAGE) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace, **overrides: object) -> FleetConfig:
    return load_config(args.config, **overrides)


def cmd_up(args: argparse.Namespace) -> int:
    """Run the fleet in the foreground until every task has ended (or it is stopped)."""
    config = _load(args, concurrency=args.concurrency)
    colour = False if args.no_colour else None
    fleet = Fleet(config, console=None if args.quiet else sys.stdout, colour=colour)
    result = anyio.run(fleet.run)
    if not args.quiet:
        print()
        print(summary_table(result.workers))
        print(f"\nlogs: {result.run_dir / 'fleet.jsonl'}")
        print(f"summary: {result.run_dir / 'summary.json'}")
    return result.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Supervise a fleet of headless coding agents, one per issue, each in its "
        "own git worktree.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "-c", "--config", metavar="FILE", help="fleet config (default: configs/fleet.toml)"
        )
        return sub

    up = with_config(commands.add_parser("up", help="run the fleet in the foreground"))
    up.add_argument("--concurrency", type=int, metavar="N", help="at most N agents at once")
    up.add_argument("-q", "--quiet", action="store_true", help="no terminal output")
    up.add_argument("--no-colour", "--no-color", action="store_true", help="plain prefixes")
    up.set_defaults(func=cmd_up)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
