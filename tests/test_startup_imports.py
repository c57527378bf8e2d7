"""What a start imports: every command builds the whole parser, and ``up`` of a local fleet must
not pay for the other commands' modules nor for the SSH stack (start-up CPU counts in every
shift).  Checked in a fresh interpreter, by what lands in ``sys.modules``, not by timing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Only the commands that use them import these.
OTHER_COMMANDS = (
    "supervisor.views",
    "supervisor.cron",
    "supervisor.check",
    "supervisor.sources",
    "supervisor.logcmd",
    "supervisor.logreader",
    "shtab",
)
# Only SSH machines need these.
SSH = ("asyncssh", "supervisor.hosts.ssh")
# Only `up` (and `check`, `status`) run or look at a fleet.
FLEET = ("supervisor.fleet", "supervisor.worker", "supervisor.machines", "supervisor.recovery")


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def among(loaded: set[str], names: tuple[str, ...]) -> list[str]:
    """The modules of ``loaded`` that are ``names`` or inside one of them."""
    return sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in names))


@pytest.fixture(scope="module")
def cli_only() -> set[str]:
    return loaded_after("import supervisor.cli\nsupervisor.cli.build_parser()")


@pytest.fixture(scope="module")
def local_up() -> set[str]:
    # What `up` imports for a local fleet of a `command` agent, its console on.
    return loaded_after(
        "import supervisor.cli, supervisor.fleet, supervisor.hosts.local\n"
        "supervisor.cli.build_parser()"
    )


def test_the_parser_imports_no_command_module(cli_only: set[str]) -> None:
    assert among(cli_only, OTHER_COMMANDS + SSH + FLEET) == []


def test_a_local_up_imports_neither_ssh_nor_other_commands(local_up: set[str]) -> None:
    assert "supervisor.fleet" in local_up  # the probe does import what `up` runs
    assert among(local_up, OTHER_COMMANDS + SSH) == []


CONSOLE_SCRIPT = """
import gc, sys
seen = []


class Watch:  # notes whether the collector is on when supervisor.cli is imported
    def find_spec(self, name, path=None, target=None):
        if name == "supervisor.cli":
            seen.append(gc.isenabled())
        return None


sys.meta_path.insert(0, Watch())
from supervisor import entry
sys.argv = ["agentize-fleet", "--version"]
try:
    entry.main()
except SystemExit as exit:
    print(seen, gc.isenabled(), exit.code)
"""


def test_the_console_script_imports_with_the_collector_off_and_runs_with_it_on() -> None:
    """``agentize-fleet`` (``supervisor.entry:main``) imports the program with the garbage
    collector off (start-up makes no garbage) and runs the command with it on again."""
    out = subprocess.run(
        [sys.executable, "-c", CONSOLE_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("agentize-fleet "), out.stdout  # the command ran: --version
    assert lines[-1] == "[False] True 0", out.stdout
