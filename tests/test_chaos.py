"""Chaos: the supervisor is SIGKILLed at random moments, many times, and started again each time
(as cron or systemd would), and the fleet's work comes out as if nothing had happened.

The real ``agentize-fleet up`` runs as a subprocess with ``scripts/fake-agent`` as its agents;
the agents record their own starts and ends (``FAKE_AGENT_RECORD``), so what is checked is what
the agents did, not what the supervisor believes:

* every task ran exactly once and completed once: a run whose supervisor was killed is adopted
  by the next one, never started again beside itself;
* the cap was never exceeded, adoptions included;
* every line any agent printed is in the logs exactly once, across all the shifts' logs;
* nothing is left running (agents, wrappers, watchdogs) once the last ``up`` has ended.

The kills land at random moments after ``up`` starts, within 100 ms of an agent's start, and
while a new ``up`` is recovering what the last one left (adoption).  The run is bounded in time
(each kill waits at most a few seconds) and seeded: ``CHAOS_SEED`` replays a failing one.

The same with the agents on an SSH machine (a real sshd): remote runs whose supervisor is
killed, within a few milliseconds of their start too.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

from conftest import Harness, leftovers, task
from fleet_helpers import assert_runs_logged_once, kill_up, shift_dirs
from test_ssh_fleet import machine, ssh_config

from tests.sshd import SSHD

TASKS = 9
CAP = 3
KILLS = 16
CHAOS_BUDGET = 35.0  # seconds of killing before the last `up` runs to its end
AGENT = {"FAKE_AGENT_STEPS": "25", "FAKE_AGENT_STEP_DELAY": "0.2"}


def _starts(fleet: Harness) -> int:
    return len(fleet.agent_records("start"))


def _wait(predicate: Any, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.005)


def _start_and_kill(fleet: Harness, config: Path, how: str, rng: random.Random) -> bool:
    """Start ``up`` and SIGKILL it at a moment chosen by ``how``; False if it ended first."""
    shifts_before = len(shift_dirs(fleet.state_dir))
    starts_before = _starts(fleet)
    up = fleet.start(config)

    def ended() -> bool:
        return up.popen.poll() is not None

    if how == "anytime":
        time.sleep(rng.uniform(0.05, 1.5))
    elif how == "after-a-start":
        _wait(lambda: _starts(fleet) > starts_before or ended(), 4.0)
        time.sleep(rng.uniform(0.0, 0.1))
    else:  # the new shift exists: it is connecting, or recovering the last one's runs
        _wait(lambda: len(shift_dirs(fleet.state_dir)) > shifts_before or ended(), 4.0)
        time.sleep(rng.uniform(0.0, 0.15))
    if ended():
        return False
    kill_up(up)
    return True


def chaos(fleet: Harness, config: Path, *, tasks: int, cap: int, kills: int, budget: float) -> None:
    """Start ``up`` and SIGKILL it, ``kills`` times (or for ``budget`` seconds), at moments
    drawn from a seed (``CHAOS_SEED`` replays one); then let one ``up`` run to the end and
    check what the agents did: each of the ``tasks`` ran exactly once and succeeded, never
    more than ``cap`` at once, every line of theirs logged once, nothing left running."""
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    done_kills: list[str] = []
    end = time.monotonic() + budget
    while len(done_kills) < kills and time.monotonic() < end:
        how = rng.choice(["anytime", "after-a-start", "adopting"])
        if not _start_and_kill(fleet, config, how, rng):
            break  # that `up` finished everything before its kill
        done_kills.append(how)

    print(f"chaos: seed {seed}, kills {done_kills}")
    final = fleet.start(config).wait(90)
    where = f"(seed {seed}, kills {done_kills})"
    assert final.returncode == 0, f"{where}\n{final.explain()}"
    left = [p for p in leftovers(fleet.mark, grace=20) if "sshd" not in p]
    assert not left, f"processes outlived the fleet by 20 s {where}: {left}"

    # Exactly once, by the agents' own records.
    starts = fleet.agent_records("start")
    ends = fleet.agent_records("end")
    for issue in range(1, tasks + 1):
        mine = [r for r in starts if r["issue"] == issue]
        assert len(mine) == 1, f"#{issue} started {len(mine)} times {where}: {mine}"
        done = [r for r in ends if r["issue"] == issue]
        assert [r["exit"] for r in done] == [0], f"#{issue} ended {done} {where}"
    assert fleet.max_concurrent() <= cap, f"cap {cap} exceeded {where}"

    # Every line once, in order: the shifts' logs together hold each run's output files.
    runs = assert_runs_logged_once(fleet.state_dir, where)
    assert sorted(r.issue for r in runs) == list(range(1, tasks + 1)), where


def test_random_sigkills_of_up_lose_and_repeat_nothing(fleet: Harness) -> None:
    config = fleet.write(
        fleet.config(
            [task(n, "finish") for n in range(1, TASKS + 1)],
            concurrency=CAP,
            stop_timeout=2,
            agent={"env": AGENT},
        )
    )
    chaos(fleet, config, tasks=TASKS, cap=CAP, kills=KILLS, budget=CHAOS_BUDGET)


def test_random_sigkills_of_up_while_ssh_runs_are_live(
    fleet: Harness, sshd: SSHD, tmp_path: Path
) -> None:
    """The same with the agents on an SSH machine (a real sshd): a run whose start command was
    cut short by the kill is found by the next ``up`` through its run directory (the remote
    start holds its lock until the pid is written), and the cap is the machine's."""
    tasks, cap = 4, 2
    config = fleet.write(
        ssh_config(
            fleet,
            [task(n, "finish") for n in range(1, tasks + 1)],
            concurrency=cap,
            stop_timeout=2,
            lease_timeout=6,
            local={"max_agents": 0},
            machines=[machine(sshd, "m1", tmp_path / "m1-work", max_agents=cap)],
            agent={"env": {"FAKE_AGENT_STEPS": "15", "FAKE_AGENT_STEP_DELAY": "0.2"}},
        )
    )
    chaos(fleet, config, tasks=tasks, cap=cap, kills=6, budget=40)
