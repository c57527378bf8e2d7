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

The same under live SSH runs (a real sshd) is phase 2's: it needs the hosts' remote start lock
and per-run leases first.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

from conftest import Harness, task
from fleet_helpers import kill_up, output_lines, run_records

from supervisor.ledger import Ledger

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


def _shift_dirs(state_dir: Path) -> list[Path]:
    runs = state_dir / "runs"
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def _file_lines(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", "replace")
    lines = text.split("\n")
    return lines[:-1] if text.endswith("\n") or not text else lines


def _start_and_kill(fleet: Harness, config: Path, how: str, rng: random.Random) -> bool:
    """Start ``up`` and SIGKILL it at a moment chosen by ``how``; False if it ended first."""
    shifts_before = len(_shift_dirs(fleet.state_dir))
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
        _wait(lambda: len(_shift_dirs(fleet.state_dir)) > shifts_before or ended(), 4.0)
        time.sleep(rng.uniform(0.0, 0.15))
    if ended():
        return False
    kill_up(up)
    return True


def test_random_sigkills_of_up_lose_and_repeat_nothing(fleet: Harness) -> None:
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    config = fleet.write(
        fleet.config([task(n, "finish") for n in range(1, TASKS + 1)], concurrency=CAP,
                     stop_timeout=2, agent={"env": AGENT})
    )
    kills: list[str] = []
    budget = time.monotonic() + CHAOS_BUDGET
    while len(kills) < KILLS and time.monotonic() < budget:
        how = rng.choice(["anytime", "after-a-start", "adopting"])
        if not _start_and_kill(fleet, config, how, rng):
            break  # that `up` finished everything before its kill
        kills.append(how)

    print(f"chaos: seed {seed}, kills {kills}")
    final = fleet.start(config).wait(60)
    where = f"(seed {seed}, kills {kills})"
    assert final.returncode == 0, f"{where}\n{final.explain()}"
    assert not final.leftovers, f"processes outlived the fleet {where}: {final.leftovers}"

    # Exactly once, by the agents' own records.
    starts = fleet.agent_records("start")
    ends = fleet.agent_records("end")
    for issue in range(1, TASKS + 1):
        mine = [r for r in starts if r["issue"] == issue]
        assert len(mine) == 1, f"#{issue} started {len(mine)} times {where}: {mine}"
        done = [r for r in ends if r["issue"] == issue]
        assert [r["exit"] for r in done] == [0], f"#{issue} ended {done} {where}"
    assert fleet.max_concurrent() <= CAP, f"cap {CAP} exceeded {where}"

    # Every line once, in order: the shifts' logs together hold each run's output files.
    with Ledger.reader(fleet.state_dir) as ledger:  # type: ignore[union-attr]
        runs = [r for r in ledger.runs() if r.state == "ended"]
        assert all(r.state in ("ended", "abandoned") for r in ledger.runs()), where
    assert sorted(r.issue for r in runs) == list(range(1, TASKS + 1)), where
    records = [rec for shift_dir in _shift_dirs(fleet.state_dir) for rec in run_records(shift_dir)]
    for run in runs:
        for stream in ("stdout", "stderr"):
            logged = output_lines(records, run.issue, run.number, stream)
            expected = _file_lines(Path(run.run_dir, stream))
            assert logged == expected, (
                f"#{run.issue} run {run.number} {stream}: {len(logged)} lines logged, "
                f"{len(expected)} written {where}"
            )
