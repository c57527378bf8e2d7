"""What people expect of any command line, checked on the real ``agentize-fleet`` process:
``--version``, ``-c FILE`` before or after the sub-command, each sub-command's own usage on an
error, help text for everything, ``--color``/``--no-colour``, shell completion, and no
``BrokenPipeError`` traceback when the reader of the output goes away (``status --json | head``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Harness, clean_env, task
from fleet_helpers import wait_ready

from supervisor import cli
from supervisor.exitcodes import DETAILS, EXIT_BROKEN_PIPE

TIMEOUT = 30
SHIFT = "20260101-000000-abcd"


def run(
    *args: str,
    stdout: int | None = subprocess.PIPE,
    env: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args],
        cwd=ROOT,
        env=env or clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )


def shift_dir(tmp_path: Path, lines: int = 3) -> Path:
    """A state directory with one ended shift of task 7 on ``local``, written by hand."""
    state = tmp_path / "state"
    run_dir = state / "runs" / SHIFT
    run_dir.mkdir(parents=True)
    records = [
        {
            "ts": f"2026-01-01T00:00:{i:02d}.000Z",
            "fleet": SHIFT,
            "worker": "w1",
            "task": 7,
            "machine": "local",
            "run": 1,
            "stream": "stdout",
            "seq": i,
            "line": f"line {i}",
        }
        for i in range(1, lines + 1)
    ]
    # In the writer's own form (no spaces): the reader finds records by their bytes.
    (run_dir / "fleet.jsonl").write_text(
        "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    )
    summary = {
        "fleet": SHIFT,
        "pid": 1,
        "exit_code": 0,
        "exit_meaning": "all tasks done",
        "workers": [{"worker": "w1", "task": 7, "machine": "local", "state": "done"}],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return state


def test_version() -> None:
    done = run("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("agentize-fleet ") and done.stdout.split()[1][0].isdigit()


def test_config_before_or_after_the_subcommand(tmp_path: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text('repository = "x"\nstate_dir = "st"\n')
    for argv in (
        ["-c", str(config), "status"],
        ["status", "-c", str(config)],
        ["--config", str(config), "status"],
    ):
        done = run(*argv)
        assert done.returncode == 3, (argv, done.stderr)
        assert f"no fleet is running on {tmp_path / 'st'}" in done.stderr
    missing = tmp_path / "none.toml"
    done = run("-c", str(missing), "shifts")
    assert done.returncode == 2 and str(missing) in done.stderr


def _subcommands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted({p.prog.split()[-1] for p in sub.choices.values()})


@pytest.mark.parametrize("command", _subcommands())
def test_each_subcommands_error_shows_its_own_usage(command: str) -> None:
    done = run(command, "--no-such-flag")
    assert done.returncode == 2
    assert done.stderr.startswith(f"usage: agentize-fleet {command} "), done.stderr
    assert f"agentize-fleet {command}: error: " in done.stderr


def test_every_subcommand_and_argument_has_help() -> None:
    parser = cli.build_parser()
    missing = []
    for action in cli._all_actions(parser):
        if isinstance(action, argparse._SubParsersAction):
            listed = {a.dest for a in action._choices_actions if a.help}
            missing += [
                f"command {name}"
                for name in action.choices
                if name not in listed and name not in ("ps", "runs")
            ]
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append("/".join(action.option_strings) or action.dest)
    assert missing == []
    assert "exit codes:" in parser.format_help()
    for code in DETAILS:
        assert f"  {code:>3}  " in parser.format_help()


@pytest.mark.parametrize("command", ["up", "logs"])
@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        ([], "auto"),
        (["--color=never"], "never"),
        (["--colour", "always"], "always"),
        (["--color", "auto"], "auto"),
        (["--no-colour"], "never"),
        (["--no-color"], "never"),
    ],
)
def test_colour_options(command: str, flags: list[str], setting: str) -> None:
    args = cli.build_parser().parse_args([command, *flags])
    assert args.color == setting


def test_logs_colour_always_and_never(tmp_path: Path) -> None:
    state = shift_dir(tmp_path)
    always = run("logs", "--state-dir", str(state), "--color=always")
    assert always.returncode == 0 and "\x1b[" in always.stdout, always.stderr
    for flag in ("--color=never", "--no-colour", "--no-color"):
        never = run("logs", "--state-dir", str(state), flag, env=clean_env(TERM="xterm"))
        assert never.returncode == 0 and "\x1b[" not in never.stdout
        assert "line 3" in never.stdout


def test_up_colour_always(fleet: Harness) -> None:
    result = fleet.run_config([task(1)], "--color=always")
    assert result.returncode == 0, result.explain()
    assert "\x1b[" in result.stdout
    plain = fleet.run_config([task(2)], "--no-color")
    assert plain.returncode == 0 and "\x1b[" not in plain.stdout


# -- a closed output --------------------------------------------------------------------------


def run_into_closed_pipe(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command whose stdout is a pipe nobody reads any more (``| head`` gone)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = run(*args, stdout=write_end, env=env)
    finally:
        os.close(write_end)
    return done.returncode, done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["shifts"],
        ["shifts", "--json"],
        ["runs"],
        ["logs"],
        ["logs", "--json"],
        ["logs", "-n", "2"],
        ["completion", "bash"],
    ],
)
def test_closed_output_ends_quietly(tmp_path: Path, argv: list[str]) -> None:
    state = shift_dir(tmp_path, lines=5000)
    extra = ["--state-dir", str(state)] if argv[0] != "completion" else []
    code, err = run_into_closed_pipe(*argv, *extra)
    assert (code, err) == (EXIT_BROKEN_PIPE, "")


def test_help_into_a_closed_output_has_no_traceback() -> None:
    code, err = run_into_closed_pipe("--help")
    assert code in (0, EXIT_BROKEN_PIPE) and err == ""


def test_status_json_into_a_closed_output(fleet: Harness) -> None:
    config = fleet.write(fleet.config([task(1, "hang")]))
    started = fleet.start(config)
    wait_ready(started)
    code, err = run_into_closed_pipe("status", "--json", "-c", str(config), env=fleet.env())
    assert (code, err) == (EXIT_BROKEN_PIPE, "")
    down = run("down", "-c", str(config), env=fleet.env())
    assert down.returncode == 0, down.stderr
    assert started.wait(60).returncode == 130


# -- completion ---------------------------------------------------------------------------------


def _bash_complete(script: Path, *words: str) -> list[str]:
    """What bash's completion function offers for ``agentize-fleet WORDS`` (the last word
    being the one completed)."""
    line = " ".join(["agentize-fleet", *words])
    program = f"""
source {script}
COMP_WORDS=(agentize-fleet {" ".join(words) if words[-1] else " ".join(words) + " ''"})
COMP_CWORD={len(words)}
COMP_LINE='{line}'
COMP_POINT={len(line)}
fn=$(complete -p agentize-fleet | sed -E 's/.* -F ([^ ]+) .*/\\1/')
"$fn" agentize-fleet "{words[-1]}" "{words[-2] if len(words) > 1 else "agentize-fleet"}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completion(tmp_path: Path) -> None:
    done = run("completion", "bash")
    assert done.returncode == 0, done.stderr
    script = tmp_path / "agentize-fleet.bash"
    script.write_text(done.stdout)
    assert {"shifts", "status"} <= set(_bash_complete(script, "s"))
    assert "--shift" in _bash_complete(script, "logs", "--sh")
    assert set(_bash_complete(script, "completion", "")) == {"bash", "zsh", "fish"}


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_completion_scripts(tmp_path: Path, shell: str) -> None:
    done = run("completion", shell)
    assert done.returncode == 0, done.stderr
    assert "shifts" in done.stdout and "--shift" in done.stdout
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed: the script's syntax is not checked")
    script = tmp_path / f"agentize-fleet.{shell}"
    script.write_text(done.stdout)
    check = subprocess.run(
        [shell, "-n", str(script)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert check.returncode == 0, check.stderr
