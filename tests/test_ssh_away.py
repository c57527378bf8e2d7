"""SSH machines that come and go (issue 16), with a real ``up`` against real sshd instances:

* the link comes back after ``unreachable_after`` -- with and without ``requeue_lost``;
* logins hang while the connections live (an overloaded machine);
* a login shell that prints to stderr, one that prints to stdout (a whole fleet over them);
* the supervisor SIGKILLed within 10 ms of a remote start.

(The SSH variant of the chaos test is ``test_chaos.py``'s.)  Each ends with what issue 16 asks:
every task run exactly once (the fake agents' own start/end records), never more agents on a
machine than its ``max_agents`` at any instant, every line of both streams in the logs exactly
once, no process left 20 s after the fleet ends, and a report that names what happened to the
machine.  Timings are short (``unreachable_after`` of a second or two, agents of a few
seconds) so that the file stays within a minute or two on a loaded machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FleetRun, Harness, leftovers, task, wait_for
from fleet_helpers import assert_runs_logged_once, kill_up, shift_dirs, try_status
from test_ssh_fleet import machine, peaks, ssh_config, where

from tests.sshd import SSHD, hanging_login, noisy_login, run_sshd

#: Agents that print on both streams for about 3 s.
SLOW_AGENT = {"FAKE_AGENT_STEPS": "30", "FAKE_AGENT_STEP_DELAY": "0.1"}


def remote_runs(workdir: Path) -> list[Path]:
    """The run directories on a machine (its workdir), whichever shift made them."""
    return sorted((workdir / ".agentize-fleet" / "runs").glob("*/w*/run-*"))


def check_story(
    fleet: Harness,
    result: FleetRun,
    *,
    tasks: list[int],
    caps: dict[str, int],
    roots: dict[str, Path],
    report: list[str],
) -> None:
    """What every case of issue 16 must end with (see the module docstring)."""
    assert result.returncode == 0, result.explain()
    assert "Traceback" not in result.stdout + result.stderr, result.explain()
    starts, ends = fleet.agent_records("start"), fleet.agent_records("end")
    for issue in tasks:
        mine = [r for r in starts if r["issue"] == issue]
        assert len(mine) == 1, f"#{issue} started {len(mine)} times: {mine}"
        assert [r["exit"] for r in ends if r["issue"] == issue] == [0], ends
    peak, _ = peaks(fleet.agent_records(), roots)
    assert all(peak.get(name, 0) <= cap for name, cap in caps.items()), peak
    assert_runs_logged_once(fleet.state_dir)
    left = [p for p in leftovers(fleet.mark, grace=20) if "sshd" not in p]
    assert not left, f"processes outlived the fleet by 20 s: {left}"
    text = (shift_dirs(fleet.state_dir)[-1] / "report.md").read_text()
    for words in report:
        assert words in text, text


# -- the link comes back ---------------------------------------------------------------------------


@pytest.mark.parametrize("requeue", [False, True])
def test_the_link_comes_back_after_unreachable_after(
    fleet: Harness, sshd: SSHD, tmp_path: Path, requeue: bool
) -> None:
    """#1 runs on local and ends; #2 and #3 run on m1, whose sshd is stopped mid-run for
    longer than ``unreachable_after`` and started again.  Meanwhile local is free, yet
    nothing is requeued there, with ``requeue_lost`` or without: the runs on m1 are found
    again by their run directories, read on from where the log stopped, and end once each."""
    workdir = tmp_path / "m1-work"
    config = ssh_config(
        fleet,
        [
            task(1, "finish"),
            task(2, "stderr+finish", env=SLOW_AGENT),
            task(3, "stderr+finish", env=SLOW_AGENT),
        ],
        concurrency=3,
        local={"max_agents": 1},
        requeue_lost=requeue,
        lease_timeout=30,
        machines=[machine(sshd, "m1", workdir, max_agents=2, unreachable_after=1.0)],
    )
    started = fleet.start(fleet.write(config))
    wait_for(
        lambda: {2, 3} <= {r["issue"] for r in fleet.agent_records("start")},
        60,
        "#2 and #3 running on m1",
    )
    wait_for(lambda: 1 in {r["issue"] for r in fleet.agent_records("end")}, 30, "#1 done")
    sshd.stop()
    status = wait_for(
        lambda: (
            (s := try_status(fleet.state_dir))
            and any(m.get("reach") == "unreachable" for m in s.get("machines", []))
            and s
        ),
        20,
        "m1 unreachable",
    )
    assert {w["task"]: w["state"] for w in status["workers"]}.get(2) == "lost", status
    time.sleep(1.0)
    assert sorted(r["issue"] for r in fleet.agent_records("start")) == [1, 2, 3]
    sshd.restart()
    result = started.wait(90)
    roots = {"local": fleet.workspace_root, "m1": workdir}
    check_story(
        fleet,
        result,
        tasks=[1, 2, 3],
        caps={"local": 1, "m1": 2},
        roots=roots,
        report=["machine m1 unreachable since", ", back at "],
    )
    assert {
        where(r["cwd"], roots) for r in fleet.agent_records("start") if r["issue"] in (2, 3)
    } == {"m1"}
    assert not result.events("requeued") and not result.events("crashed")


# -- logins that hang ------------------------------------------------------------------------------


def test_logins_that_hang_while_connections_live(
    fleet: Harness, client_key: Path, tmp_path: Path
) -> None:
    """m1's logins hang (a flag file) for longer than its command timeout while its
    connections live: the machine is slow, not unreachable and never a crash; its runs go on
    and end once each; nothing new starts there meanwhile; the report says it was slow."""
    flag = tmp_path / "logins-hang"
    directory = tmp_path / "sshd-hang"
    directory.mkdir()
    workdir = tmp_path / "m1-work"
    with run_sshd(
        directory, client_key=client_key, extra_config=hanging_login(directory, flag)
    ) as server:
        config = ssh_config(
            fleet,
            [task(n, "stderr+finish", env=SLOW_AGENT) for n in (1, 2, 3)],
            concurrency=2,
            local={"max_agents": 0},
            lease_timeout=30,
            machines=[
                machine(
                    server, "m1", workdir, max_agents=2, unreachable_after=20.0, command_timeout=1.5
                )
            ],
        )
        started = fleet.start(fleet.write(config))
        wait_for(lambda: len(fleet.agent_records("start")) == 2, 60, "two runs on m1")
        flag.touch()
        wait_for(
            lambda: (
                (s := try_status(fleet.state_dir))
                and any(m.get("reach") == "slow" for m in s.get("machines", []))
            ),
            30,
            "m1 slow",
        )
        wait_for(lambda: len(fleet.agent_records("end")) == 2, 30, "the two runs' ends")
        time.sleep(1.0)
        assert len(fleet.agent_records("start")) == 2, "a run started on a slow machine"
        flag.unlink()
        result = started.wait(90)
    check_story(
        fleet,
        result,
        tasks=[1, 2, 3],
        caps={"m1": 2},
        roots={"m1": workdir},
        report=["machine m1 slow from"],
    )
    assert not result.events("crashed") and not result.events("lost")


# -- logins that print -----------------------------------------------------------------------------


def test_logins_that_print_never_reach_the_agents_logs(
    fleet: Harness, client_key: Path, tmp_path: Path
) -> None:
    """Two machines whose login shells print before every command -- m1 to stderr, m2 to
    stdout -- run a whole fleet: every task starts and ends once, no byte of the logins' chatter
    is in any agent's log (every line logged is a line the agent wrote), and the report
    names both machines' chatter."""
    noise = {"m1": {"stderr": "pyenv: cannot rehash\n"}, "m2": {"stdout": "Welcome to m2!\n"}}
    workdirs = {name: tmp_path / f"{name}-work" for name in noise}
    dirs = {name: tmp_path / f"sshd-{name}" for name in noise}
    for path in dirs.values():
        path.mkdir()
    with (
        run_sshd(
            dirs["m1"], client_key=client_key, extra_config=noisy_login(dirs["m1"], **noise["m1"])
        ) as m1,
        run_sshd(
            dirs["m2"],
            address="127.0.0.2",
            client_key=client_key,
            extra_config=noisy_login(dirs["m2"], **noise["m2"]),
        ) as m2,
    ):
        config = ssh_config(
            fleet,
            [task(n, "stderr+finish") for n in (1, 2, 3, 4)],
            concurrency=4,
            local={"max_agents": 0},
            machines=[machine(m1, "m1", workdirs["m1"]), machine(m2, "m2", workdirs["m2"])],
        )
        result = fleet.run(fleet.write(config), timeout=90)
    check_story(
        fleet,
        result,
        tasks=[1, 2, 3, 4],
        caps={"m1": 2, "m2": 2},
        roots=dict(workdirs),
        report=["m1: its login shell prints", "m2: its login shell prints"],
    )
    lines = [r["line"] for r in result.records if r["stream"] in ("stdout", "stderr")]
    assert not any("rehash" in line or "Welcome" in line for line in lines)


# -- the supervisor killed as a remote run starts --------------------------------------------------


def test_up_killed_within_10ms_of_a_remote_start_is_adopted_by_the_next(
    fleet: Harness, sshd: SSHD, tmp_path: Path
) -> None:
    """``up`` SIGKILLed within 10 ms of each remote start (its run directory appearing), three
    times; each next ``up`` finds the run by its directory and adopts it (the remote start
    holds its lock until the pid is written): every task once, never two agents on m1 (max 1),
    every line once; the dead shifts' summaries say what the next one did."""
    workdir = tmp_path / "m1-work"
    config = fleet.write(
        ssh_config(
            fleet,
            [task(n, "stderr+finish") for n in (1, 2, 3)],
            concurrency=1,
            local={"max_agents": 0},
            lease_timeout=10,
            machines=[machine(sshd, "m1", workdir, max_agents=1)],
        )
    )
    for _ in range(3):
        if not _kill_at_a_remote_start(fleet, config, workdir):
            break
    result = fleet.start(config).wait(90)
    check_story(fleet, result, tasks=[1, 2, 3], caps={"m1": 1}, roots={"m1": workdir}, report=[])
    adopted = [r for d in shift_dirs(fleet.state_dir) for r in _events(d, "adopted")]
    assert adopted, "no run was adopted"


def _kill_at_a_remote_start(fleet: Harness, config: Path, workdir: Path) -> bool:
    """Start ``up``; SIGKILL it as soon as a new run directory appears on the machine (a
    millisecond's poll); False if it ended first."""
    seen = len(remote_runs(workdir))
    up = fleet.start(config)
    wait_for(
        lambda: len(remote_runs(workdir)) > seen or up.popen.poll() is not None,
        60,
        "a remote start",
        interval=0.001,
    )
    if up.popen.poll() is not None:
        return False
    kill_up(up)
    return True


def _events(shift_dir: Path, name: str) -> list[dict[str, Any]]:
    from fleet_helpers import events, run_records

    return events(run_records(shift_dir), name)
