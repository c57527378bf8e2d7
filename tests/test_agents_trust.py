"""Worktree trust for Claude Code (issue 13, point 7) through a real Host: the local one and an
SSH machine (a real sshd on 127.0.0.1, whose login shell may print chatter), and a fleet of
kind ``claude`` on an SSH machine whose crash is resumed in the remote worktree.

Nothing here touches the real ``~/.claude.json``: the config directory is the test's own
(``CLAUDE_CONFIG_DIR``, as the agent's environment would set it)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from conftest import MARK, Harness

from supervisor import sh
from supervisor.hosts.base import Host
from supervisor.hosts.local import LocalHost
from supervisor.hosts.ssh import SSHHost
from supervisor.ledger import Ledger
from supervisor.worktree_trust import CHANGED, ensure_trusted
from tests.sshd import SSHD

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
LIMIT = 60.0


@pytest.fixture(params=["local", "ssh"])
async def host(request: pytest.FixtureRequest) -> AsyncIterator[Host]:
    if request.param == "local":
        yield LocalHost("local")
        return
    server: SSHD = request.getfixturevalue("sshd")
    remote = SSHHost(server.target())
    try:
        yield remote
    finally:
        with anyio.fail_after(10):
            await remote.aclose()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def worktree(tmp_path: Path) -> tuple[Path, Path]:
    """A worktree reached through a symlink (its real path is the key), and a config dir."""
    real = tmp_path / "real" / "trees" / "issue-7"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config_dir = tmp_path / "claude-config"
    config_dir.mkdir()
    return tmp_path / "link" / "trees" / "issue-7", config_dir


@pytest.mark.anyio
async def test_the_worktree_is_trusted_by_its_real_path_other_keys_and_mode_kept(
    host: Host, tmp_path: Path
) -> None:
    tree, config_dir = worktree(tmp_path)
    config = config_dir / ".claude.json"
    config.write_text(json.dumps({"numStartups": 9, "projects": {"/other": {"x": 1}}}))
    config.chmod(0o600)
    env = {"CLAUDE_CONFIG_DIR": str(config_dir)}
    with anyio.fail_after(LIMIT):
        assert await ensure_trusted(host, str(tree), env) == ""
    data = json.loads(config.read_text())
    real = os.path.realpath(tree)
    assert data["projects"][real] == {"allowedTools": [], "hasTrustDialogAccepted": True}
    assert data["numStartups"] == 9 and data["projects"]["/other"] == {"x": 1}
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert [p.name for p in config_dir.iterdir()] == [".claude.json"]  # no temporary left
    before = config.stat().st_mtime_ns
    with anyio.fail_after(LIMIT):
        assert await ensure_trusted(host, str(tree), env) == ""  # trusted already: no write
    assert config.stat().st_mtime_ns == before


@pytest.mark.anyio
async def test_nothing_is_written_where_claude_was_never_set_up_or_the_file_is_not_json(
    host: Host, tmp_path: Path
) -> None:
    tree, config_dir = worktree(tmp_path)
    env = {"CLAUDE_CONFIG_DIR": str(config_dir)}
    with anyio.fail_after(LIMIT):
        assert await ensure_trusted(host, str(tree), env) == ""
    assert not (config_dir / ".claude.json").exists()
    (config_dir / ".claude.json").write_text('{"numStartups": 9, "proj')  # being written
    with anyio.fail_after(LIMIT):
        problem = await ensure_trusted(host, str(tree), env)
    assert "could not be read as JSON" in problem
    assert (config_dir / ".claude.json").read_text() == '{"numStartups": 9, "proj'
    with anyio.fail_after(LIMIT):
        gone = await ensure_trusted(host, str(tmp_path / "no-such-tree"), env)
    assert gone.startswith("cannot read")


def test_a_file_changed_since_it_was_read_is_not_overwritten(tmp_path: Path) -> None:
    config = tmp_path / ".claude.json"
    config.write_text("{}")
    argv = sh.command("claude-trust", "write", str(config), "123 2")
    done = subprocess.run(argv, input=b'{"new": 1}', capture_output=True, timeout=10, check=False)
    assert done.returncode == CHANGED and config.read_text() == "{}"


def test_a_claude_fleet_on_an_ssh_machine_trusts_and_resumes_in_the_remote_worktree(
    fleet: Harness, sshd: SSHD, tmp_path: Path
) -> None:
    config_dir = tmp_path / "remote-claude"
    config_dir.mkdir()
    (config_dir / ".claude.json").write_text("{}")
    workdir = tmp_path / "remote-work"
    machine = {
        "name": "m1",
        "host": sshd.address,
        "port": sshd.port,
        "user": "root",
        "identity_file": str(sshd.client_key),
        "known_hosts": str(sshd.known_hosts),
        "max_agents": 1,
        "workdir": str(workdir),
        "connect_timeout": 5.0,
    }
    config = fleet.config(
        [{"issue": 3, "env": {"FAKE_AGENT_PLAN": "crash,finish"}}],
        local={"max_agents": 0},
        machines=[machine],
        agent={"kind": "claude", "command": [str(SCRIPTS / "fake-claude")]},
    )
    config["agent"]["env"].update({MARK: fleet.mark, "CLAUDE_CONFIG_DIR": str(config_dir)})
    run = fleet.run(fleet.write(config), timeout=90)
    assert run.returncode == 0, run.explain()
    first, second = fleet.runs_of(3)
    assert str(workdir) in first["cwd"] and second["cwd"] == first["cwd"]
    session = first["argv"][first["argv"].index("--session-id") + 1]
    assert second["argv"][second["argv"].index("--resume") + 1] == session
    trusted = json.loads((config_dir / ".claude.json").read_text())["projects"]
    assert trusted[os.path.realpath(first["cwd"])]["hasTrustDialogAccepted"] is True
    with Ledger.reader(fleet.state_dir) as ledger:  # type: ignore[union-attr]
        assert [(r.machine, r.outcome) for r in ledger.runs(issue=3)] == [
            ("m1", "crashed"),
            ("m1", "done"),
        ]
