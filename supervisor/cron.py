"""``agentize-fleet cron``: what to install for nightly shifts, a crontab line and a systemd timer.

The text is printed, never installed: the user reads it and puts it where it belongs.  Each
word is quoted for where it goes (``/bin/sh`` behind cron's ``%`` rule; systemd's own quoting
and specifiers), and both carry this shell's PATH, where the agent and git were just found.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path

from supervisor.clicommon import (
    PROG,
    UsageError,
    config_from,
    parse_clock,
    parse_duration,
    preflight,
)


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
    config = config_from(args)
    preflight(config)
    config_file = Path(os.path.abspath(config.source_file))
    argv = [
        *_self_command(),
        "up",
        "--config",
        str(config_file),
        "--once",
        "--until",
        args.until,
        "--grace",
        args.grace,
        "--quiet",
    ]
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
