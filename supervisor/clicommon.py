"""What the commands of the ``agentize-fleet`` command line share, written once.

The program's name in messages, the usage error and the one error line every command ends
with, the config and state directory as the flags name them, flag values (durations, clock
times), the question to a running fleet, and the checks ``up`` and ``cron`` make before
anything starts.  :mod:`supervisor.cli` builds the parser and runs the commands; the commands
live there and in :mod:`supervisor.views`, :mod:`supervisor.cron`, :mod:`supervisor.logcmd`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from supervisor import control, durations
from supervisor.config import FleetConfig, load_config
from supervisor.config_errors import ConfigError
from supervisor.exitcodes import EXIT_FAILED, EXIT_NOTHING, EXIT_USAGE
from supervisor.rundir import lock_holder, socket_path

PROG = "agentize-fleet"
GIT_CHECK_TIMEOUT = 30.0


class UsageError(Exception):
    """A bad flag value or an unknown name; exit 2 with the message and the command's usage."""


def error(message: str, code: int = EXIT_USAGE) -> int:
    """Say ``message`` as the one error line of a command; return ``code`` (its exit code)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def config_from(args: argparse.Namespace, **overrides: Any) -> FleetConfig:
    """The config ``-c FILE`` names, with ``overrides`` from the command's flags."""
    return load_config(args.config, **overrides)


def state_dir_from(args: argparse.Namespace) -> Path:
    """``--state-dir``, else the config's state directory."""
    if getattr(args, "state_dir", None):
        return Path(args.state_dir).expanduser().resolve()
    return config_from(args).state_path


def colour_setting(args: argparse.Namespace) -> bool | None:
    """``--color``: True (always), False (never), None (auto: a terminal without NO_COLOR)."""
    return {"always": True, "never": False}.get(getattr(args, "color", "auto"))


# -- flag values -------------------------------------------------------------------------------


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


# -- before anything starts ----------------------------------------------------------------------


def _not_a_repository(path: str) -> str | None:
    """Why git cannot clone the local repository ``path`` (None: it can).

    ``git ls-remote`` reads a repository exactly as ``git clone`` does (``path``, ``path/.git``
    or a bare one, never a parent directory's), so a directory that merely sits inside another
    work tree is refused here too.
    """
    try:
        done = subprocess.run(
            ["git", "ls-remote", "--heads", "--", path],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=GIT_CHECK_TIMEOUT,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
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


# -- talking to a running fleet ---------------------------------------------------------------


def ask(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any] | int:
    """Send ``payload`` to the running fleet: its answer, or the exit code to end with (no
    fleet running: 3; no answer: 1, said on stderr)."""
    state_dir = state_dir_from(args)
    if lock_holder(state_dir) is None:
        print(f"{PROG}: no fleet is running on {state_dir}", file=sys.stderr)
        return EXIT_NOTHING
    try:
        return anyio.run(control.request, socket_path(state_dir), payload)
    except control.ControlError as exc:
        return error(str(exc), EXIT_FAILED)
