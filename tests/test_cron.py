"""``agentize-fleet cron``: the printed crontab line and systemd unit work as printed.

The crontab line is run by a real cron daemon (Debian's ``cron``, started here as root with a
crontab file of its own in /etc/cron.d, killed by pid at the end): its jobs get PATH=/usr/bin:/bin,
and it turns an unescaped ``%`` into a newline.  So the config lives in a directory whose name
has a space and a ``%``, and the agent is found only on a PATH directory outside /usr/bin:/bin.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import AGENT, ROOT, clean_env, kill_marked, make_origin, to_toml

from supervisor.cron import crontab_quote, systemd_quote

CLI = [sys.executable, "-m", "supervisor.cli"]
TIMEOUT = 30
CRON_D = Path("/etc/cron.d")
AGENT_NAME = "fake-claude-e2e"
LINE = re.compile(r"^(\d+) (\d+) \* \* \* (.*)$", re.MULTILINE)


def cron(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [*CLI, "cron", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def odd_setup(tmp_path: Path, dir_name: str = "my fleet 100%") -> tuple[Path, Path]:
    """A config in a directory named ``dir_name``, whose agent is only on ``tmp/opt bin``.

    Returns the config file and the agent's directory.
    """
    origin = make_origin(tmp_path / "origin")
    bin_dir = tmp_path / "opt bin"
    bin_dir.mkdir()
    shutil.copy(AGENT, bin_dir / AGENT_NAME)
    conf_dir = tmp_path / dir_name
    conf_dir.mkdir()
    config = {
        "name": "cron-e2e",
        "repository": str(origin),
        "workspace_root": "ws",
        "state_dir": "state",
        "start_interval": 0,
        "agent": {
            "command": [AGENT_NAME, "{prompt}"],
            "env": {"FAKE_AGENT_STEPS": "1", "FAKE_AGENT_STEP_DELAY": "0.01"},
        },
        "tasks": [{"issue": 1}, {"issue": 2}],
    }
    path = conf_dir / "fleet.toml"
    path.write_text(to_toml(config))
    return path, bin_dir


# -- what cron prints -----------------------------------------------------------------------


def test_cron_checks_the_config_first(tmp_path: Path) -> None:
    done = cron("-c", str(tmp_path / "nonexistent.toml"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_cron_refuses_an_agent_it_cannot_find(tmp_path: Path) -> None:
    config, _ = odd_setup(tmp_path)
    done = cron("-c", str(config), path="/usr/bin:/bin")
    assert done.returncode == 2, done.stdout + done.stderr
    assert AGENT_NAME in done.stderr and "agent.command" in done.stderr


def test_cron_at_blames_at(tmp_path: Path) -> None:
    config, bin_dir = odd_setup(tmp_path)
    done = cron("-c", str(config), "--at", "7", path=f"{bin_dir}:/usr/bin:/bin")
    assert done.returncode == 2
    assert "--at '7'" in done.stderr and "--until" not in done.stderr.split("error:")[-1]
    assert "usage: agentize-fleet cron" in done.stderr


def test_cron_line_carries_path_quotes_and_logs_to_the_state_dir(tmp_path: Path) -> None:
    config, bin_dir = odd_setup(tmp_path)
    done = cron(
        "-c", str(config), "--at", "22:30", "--until", "06:45", path=f"{bin_dir}:/usr/bin:/bin"
    )
    assert done.returncode == 0, done.stderr
    found = LINE.search(done.stdout)
    assert found is not None, done.stdout
    assert found.group(1, 2) == ("30", "22")
    command = found.group(3)
    assert command.startswith("PATH=")
    assert "%" not in command.replace("\\%", ""), "an unescaped % would end cron's command"
    # What /bin/sh gets once cron has removed the backslash before each %.
    words = shlex_split(command.replace("\\%", "%"))
    assert words[0] == f"PATH={bin_dir}:/usr/bin:/bin"
    assert words[words.index("--config") + 1] == str(config)
    assert words[words.index("--until") + 1] == "06:45"
    log = config.parent / "state" / "cron.log"
    assert f">>{log}" in words, words
    assert not (config.parent / "fleet-cron.log").exists()
    assert "fleet-cron.log" not in done.stdout
    assert "OnCalendar=*-*-* 22:30:00" in done.stdout


def shlex_split(text: str) -> list[str]:
    return shlex.split(text)


@pytest.mark.parametrize("word", ["plain", "a b", "100%", "it's", 'say "hi"', "$HOME", "%h"])
def test_quoting_functions(word: str) -> None:
    """Each quoted word reads back as itself: through sh for cron (after cron's % rule) and by
    systemd's rules (C escapes in double quotes, %% for %, $$ for $ in ExecStart)."""
    assert shlex.split(crontab_quote(word).replace("\\%", "%")) == [word]
    quoted = systemd_quote(word)
    assert quoted.startswith('"') and quoted.endswith('"')
    inner = quoted[1:-1]
    assert inner.replace("%%", "").count("%") == 0
    assert inner.replace("$$", "").count("$") == 0
    unescaped = inner.replace("%%", "%").replace("$$", "$").replace('\\"', '"')
    assert unescaped == word


def test_crontab_refuses_what_it_cannot_carry(tmp_path: Path) -> None:
    config, bin_dir = odd_setup(tmp_path, "line\nbreak")
    done = cron("-c", str(config), path=f"{bin_dir}:/usr/bin:/bin")
    assert done.returncode == 2 and "line break" in done.stderr, done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` resolves the unit's specifiers and escapes: an unescaped
    ``%z`` in a path is a fatal error there, an unknown ``\\q`` escape a warning."""
    config, bin_dir = odd_setup(tmp_path, 'odd %z "dir" $x')
    done = cron("-c", str(config), path=f"{bin_dir}:/usr/bin:/bin")
    assert done.returncode == 0, done.stderr
    unit = done.stdout.split("agentize-fleet.service\n", 1)[1].split("\n# ", 1)[0]
    service = tmp_path / "agentize-fleet-test.service"
    service.write_text(unit)
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(service)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert verify.returncode == 0, verify.stderr
    assert "specifier" not in verify.stderr.lower() and "escape" not in verify.stderr, verify.stderr


# -- under a real cron daemon -----------------------------------------------------------------


@pytest.fixture
def cron_daemon(tmp_path: Path) -> Iterator[Path]:
    """Where to write a crontab line for a cron daemon this test runs; yields the cron.d file
    (the daemon is started once the caller has written it: see :func:`start_cron`)."""
    if os.geteuid() != 0:
        pytest.skip("a real cron daemon's jobs are run as root here: not root")
    if shutil.which("cron") is None:
        pytest.skip("Debian's cron is not installed (scripts/install-system-deps installs it)")
    if not CRON_D.is_dir():
        pytest.skip(f"{CRON_D} is missing")
    entry = CRON_D / f"agentize-fleet-test-{os.getpid()}"
    try:
        yield entry
    finally:
        entry.unlink(missing_ok=True)
        for popen in started_crons:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=10)
        started_crons.clear()
        kill_marked(str(tmp_path))


#: The cron daemons the running test started (the fixture kills them by pid).
started_crons: list[subprocess.Popen[bytes]] = []


def start_cron(tmp_path: Path) -> subprocess.Popen[bytes]:
    log = open(tmp_path / "cron-daemon.log", "wb")  # noqa: SIM115 - closed with the process
    popen = subprocess.Popen(
        ["cron", "-f", "-L", "15"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    started_crons.append(popen)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=1.0)
    if popen.returncode is not None:
        pytest.skip(
            "cron did not start (another cron daemon running?): "
            + (tmp_path / "cron-daemon.log").read_text(errors="replace")[-300:]
        )
    return popen


def test_the_printed_line_runs_under_a_real_cron(tmp_path: Path, cron_daemon: Path) -> None:
    config, bin_dir = odd_setup(tmp_path)
    assert shutil.which(AGENT_NAME, path="/usr/bin:/bin") is None
    # At least 20 s ahead, so that the daemon is up and has read the file before that minute.
    at = (datetime.now() + timedelta(seconds=80)).replace(second=0, microsecond=0)
    until = (at + timedelta(hours=1)).strftime("%H:%M")
    done = cron(
        "-c",
        str(config),
        "--at",
        at.strftime("%H:%M"),
        "--until",
        until,
        path=f"{bin_dir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin",
    )
    assert done.returncode == 0, done.stderr
    found = LINE.search(done.stdout)
    assert found is not None, done.stdout
    minute, hour, command = found.groups()
    # An /etc/cron.d file names the user after the five time fields; the rest is as printed.
    cron_daemon.write_text(f"{minute} {hour} * * * root {command}\n")
    cron_daemon.chmod(0o644)
    start_cron(tmp_path)
    state = config.parent / "state"
    deadline = time.monotonic() + max(0.0, at.timestamp() - time.time()) + 90
    summaries: list[Path] = []
    while time.monotonic() < deadline:
        summaries = list((state / "runs").glob("*/summary.json"))
        if summaries:
            break
        time.sleep(0.5)
    log = state / "cron.log"
    assert summaries, (
        "cron's job left no summary; its log:\n"
        + (log.read_text(errors="replace") if log.exists() else "(no cron.log)")
        + "\ndaemon:\n"
        + (tmp_path / "cron-daemon.log").read_text(errors="replace")
    )
    summary = json.loads(summaries[0].read_text())
    assert summary["exit_code"] == 0, summary
    assert log.exists(), "the job's output goes to the state directory's cron.log"
    assert "not found" not in log.read_text(errors="replace")
