"""``agentize-fleet check`` rows against real sshd machines."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from supervisor.check import CheckRow, check_machine, format_check_table
from supervisor.hosts.ssh import SSHHost, SSHTarget
from tests.sshd import SSHD, keygen


@pytest.fixture
async def hosts(sshd: SSHD, sshd2: SSHD, closed_port: int) -> AsyncIterator[list[SSHHost]]:
    made = [
        SSHHost(sshd.target("good")),
        SSHHost(sshd2.target("second")),
        SSHHost(SSHTarget(name="down", host="127.0.0.3", port=closed_port, known_hosts="none")),
    ]
    try:
        yield made
    finally:
        for h in made:
            with anyio.fail_after(10):
                await h.aclose()


def _git_version() -> str:
    out = subprocess.run(
        ["git", "--version"], capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout.split()[2]


@pytest.mark.anyio
async def test_check_rows_and_table(hosts: list[SSHHost], tmp_path: Path) -> None:
    good, second, down = hosts
    workdir = str(tmp_path / "not" / "yet" / "there")
    with anyio.fail_after(30):
        row = await check_machine(good, agent_executable="sh", workdir=workdir)
        missing_agent = await check_machine(
            second, agent_executable="no-such-agent-xyz", workdir="~"
        )
        dead = await check_machine(down, agent_executable="sh", workdir=workdir)

    assert row.machine == "good"
    assert row.reachable and row.auth_ok and row.host_key_ok
    assert row.git == _git_version()
    assert row.agent_found
    free = shutil.disk_usage(tmp_path).free
    assert row.free_disk is not None and abs(row.free_disk - free) < max(free // 10, 1 << 26)
    assert row.load is not None and row.load >= 0
    assert row.error == "" and row.ok

    assert missing_agent.reachable and missing_agent.auth_ok and not missing_agent.agent_found
    assert "no-such-agent-xyz" in missing_agent.error and not missing_agent.ok
    assert missing_agent.free_disk is not None

    assert dead == CheckRow(
        machine="down",
        reachable=False,
        auth_ok=False,
        host_key_ok=False,
        error=dead.error,
    )
    assert "refused" in dead.error and "\n" not in dead.error

    table = format_check_table([row, missing_agent, dead])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["MACHINE", "REACHABLE", "AUTH"]
    assert len(lines) == 4
    assert lines[1].startswith("good ") and row.git is not None and row.git in lines[1]
    assert lines[2].startswith("second ") and "no-such-agent-xyz" in lines[2]
    assert lines[3].startswith("down ") and "refused" in lines[3]
    # aligned: every column starts at the same position on every line
    start = lines[0].index("REACHABLE")
    assert all(line[start - 2 : start] == "  " for line in lines)
    assert lines[1][start:].startswith("yes") and lines[3][start:].startswith("no")


@pytest.mark.anyio
async def test_check_auth_and_host_key_problems(sshd: SSHD, tmp_path: Path) -> None:
    wrong_key = keygen(tmp_path / "wrong")
    impostor = keygen(tmp_path / "impostor")
    known = tmp_path / "known_hosts"
    kind, blob = Path(f"{impostor}.pub").read_text().split()[:2]
    known.write_text(f"[{sshd.address}]:{sshd.port} {kind} {blob}\n")
    bad_auth = SSHHost(sshd.target("badauth", identity_file=str(wrong_key)))
    bad_key = SSHHost(sshd.target("badkey", known_hosts=str(known)))
    try:
        with anyio.fail_after(30):
            auth_row = await check_machine(bad_auth, agent_executable="sh", workdir="/")
            key_row = await check_machine(bad_key, agent_executable="sh", workdir="/")
    finally:
        await bad_auth.aclose()
        await bad_key.aclose()
    assert auth_row.reachable and not auth_row.auth_ok and auth_row.host_key_ok
    assert "authentication failed" in auth_row.error
    assert key_row.reachable and not key_row.host_key_ok
    assert "known_hosts" in key_row.error
    table = format_check_table([auth_row, key_row])
    assert "badauth" in table and "badkey" in table


@pytest.mark.anyio
async def test_check_works_for_the_local_host(tmp_path: Path) -> None:
    from supervisor.hosts.local import LocalHost

    with anyio.fail_after(30):
        row = await check_machine(LocalHost("local"), agent_executable="sh", workdir=str(tmp_path))
    assert row.machine == "local" and row.ok
    assert row.git == _git_version() and row.free_disk and row.load is not None
    assert format_check_table([row]).splitlines()[1].startswith("local ")
