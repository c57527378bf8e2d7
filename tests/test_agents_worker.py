"""The agent kinds inside the worker and the fleet, in-process (a fake Host scripted with each
protocol's documented events, ``tests/agents_events.py``; the real ledger, log and readers):
what the next run's argv is after each kind of end, what the ledger and the log keep, the stall
watchdog, the holds -- in milliseconds.  The real-process side: ``test_agents_fleet.py``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from supervisor import policy, stall
from supervisor.agents import Outcome, Verdict, get_kind
from supervisor.fleet import Fleet, FleetResult
from supervisor.hosts.base import ExitStatus
from supervisor.ledger import Ledger
from supervisor.outcome import WorkerStatus, judge
from supervisor.views import status_table
from tests.agents_events import (
    SID,
    claude_init,
    claude_result,
    claude_text,
    codex_error,
    codex_thread,
    codex_turn_completed,
    codex_turn_failed,
    gemini_init,
    gemini_result,
)
from tests.fakehost import FakeHost, Script, fake_config

pytestmark = pytest.mark.anyio
LIMIT = 10.0
NEW_SID = "9a1b2c3d-0000-4000-8000-000000000001"


@pytest.fixture(autouse=True)
def _structlog_restored() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def agent(kind: str, **extra: Any) -> dict[str, Any]:
    return {"agent": {"kind": kind, "command": [f"fake-{kind}"], **extra}}


async def run(
    tmp_path: Path, scripts: list[Script], kind: str, **config: Any
) -> tuple[Fleet, FleetResult, FakeHost]:
    host = FakeHost(scripts={7: scripts})
    overrides = {**agent(kind, **config.pop("agent", {})), **config}
    fleet = Fleet(fake_config(tmp_path, [{"issue": 7}], **overrides), hosts={"local": host})
    with anyio.fail_after(LIMIT):
        result = await fleet.run()
    return fleet, result, host


def ledger(tmp_path: Path) -> Ledger:
    found = Ledger.reader(tmp_path / "state")
    assert found is not None
    return found


# The end of a run, per protocol: finished, crashed (no final event), a usage limit whose text
# says no reset time (the default pause applies), the session it was in.
FINISH = {
    "claude": Script(stdout=(claude_init(), claude_text("done"), claude_result(cost=0.25))),
    "codex": Script(stdout=(codex_thread(), codex_turn_completed())),
    "gemini": Script(stdout=(gemini_init(), gemini_result())),
}
CRASH = {
    "claude": Script(exit=1, stdout=(claude_init(),), stderr=("Error: socket hang up",)),
    "codex": Script(exit=1, stdout=(codex_thread(),)),
    "gemini": Script(exit=1, stdout=(gemini_init(),)),
}
USAGE = {
    "claude": Script(
        exit=1,
        stdout=(
            claude_init(),
            claude_result(is_error=True, result="Claude AI usage limit reached", cost=0.5),
        ),
    ),
    "codex": Script(
        exit=1,
        stdout=(
            codex_thread(),
            codex_error("You've hit your usage limit. Upgrade to Pro."),
            codex_turn_failed("usage limit"),
        ),
    ),
    "gemini": Script(
        exit=1,
        stdout=(gemini_init(), gemini_result("error", "Usage limit reached for gemini-2.5-pro.")),
    ),
}


def resumed(kind: str, argv: list[str]) -> str | None:
    if kind == "codex":
        return argv[argv.index("resume") + 1] if "resume" in argv else None
    return argv[argv.index("--resume") + 1] if "--resume" in argv else None


@pytest.mark.parametrize("kind", ["claude", "codex", "gemini"])
async def test_every_kind_resumes_a_crash_and_a_usage_pause_in_its_session(
    tmp_path: Path, kind: str
) -> None:
    _, result, host = await run(
        tmp_path,
        [CRASH[kind], USAGE[kind], FINISH[kind]],
        kind,
        restart={"usage_pause_default": 0.2},
    )
    assert result.exit_code == 0 and str(result.workers[0].state) == "done"
    first, second, third = host.runs_of(7)
    assert resumed(kind, first.argv) is None
    assert resumed(kind, second.argv) == SID and resumed(kind, third.argv) == SID
    assert second.argv[-1].endswith("continue the work where it stopped.") or (
        "continue the work where it stopped." in second.argv[-1]
    )
    with ledger(tmp_path) as book:
        runs = book.runs(issue=7)
        assert [r.outcome for r in runs] == ["crashed", "usage-limited", "done"]
        assert [r.session_id for r in runs] == [SID, SID, SID]
        assert [r.resumed_from for r in runs] == [None, SID, SID]
        assert [r.agent_kind for r in runs] == [kind] * 3
        (hold,) = book.holds()
        assert hold["reason"] == "usage limit" and "usage limit" in hold["line"].lower()
        task = book.task(7)
        assert task is not None and task.outcome == "done"
        usage = book.task_usage(7)
    if kind == "claude":
        assert usage.cost_usd == 0.25 + 0.5 and usage.session_id == SID
    else:
        assert usage.cost_usd is None and usage.output_tokens


async def test_a_pinned_session_is_in_the_intent_row_before_the_start(tmp_path: Path) -> None:
    _, _, host = await run(tmp_path, [FINISH["claude"]], "claude")
    (start,) = host.runs_of(7)
    pinned = start.argv[start.argv.index("--session-id") + 1]
    with ledger(tmp_path) as book:
        (row,) = book.runs(issue=7)
    # The session the agent reported (SID) replaced the pinned one as soon as it was told.
    assert pinned != SID and row.session_id == SID


async def test_a_refused_resume_is_not_a_crash_and_goes_on_fresh(tmp_path: Path) -> None:
    refused = Script(exit=1, stderr=(f"No conversation found with session ID: {SID}",))
    _, result, host = await run(tmp_path, [CRASH["claude"], refused, FINISH["claude"]], "claude")
    assert result.exit_code == 0
    _, second, third = host.runs_of(7)
    assert resumed("claude", second.argv) == SID and resumed("claude", third.argv) is None
    assert "--session-id" in third.argv
    assert result.workers[0].crashes == 1  # the crash; the refusal is not one


async def test_a_turn_limit_fails_the_task_with_its_reason(tmp_path: Path) -> None:
    limited = Script(
        exit=1,
        stdout=(claude_init(), claude_result("error_max_turns", True, result=None, turns=30)),
    )
    _, result, host = await run(tmp_path, [limited], "claude")
    assert result.exit_code == 1 and len(host.starts) == 1
    status = result.workers[0]
    assert str(status.state) == "failed" and "error_max_turns" in status.reason


async def test_the_stall_watchdog_stops_a_silent_run_once_and_it_is_resumed(
    tmp_path: Path,
) -> None:
    silent = Script(stdout=(claude_init(),), hang=True)
    _, result, host = await run(
        tmp_path, [silent, FINISH["claude"]], "claude", agent={"stall_timeout": 0.3}
    )
    assert result.exit_code == 0
    first, second = host.runs_of(7)
    assert first.code == 143 and resumed("claude", second.argv) == SID
    with ledger(tmp_path) as book:
        assert [r.outcome for r in book.runs(issue=7)] == ["stalled", "done"]


def test_kind_command_stalls_only_when_asked(tmp_path: Path) -> None:
    plain = fake_config(tmp_path, [{"issue": 1}])
    assert stall.effective_timeout(plain) == 0.0
    asked = fake_config(tmp_path, [{"issue": 1}], agent={"stall_timeout": 60})
    assert stall.effective_timeout(asked) == 60.0
    claude = fake_config(tmp_path, [{"issue": 1}], **agent("claude"))
    assert stall.effective_timeout(claude) == 1800.0


async def test_a_fleet_scope_hold_holds_every_machine(tmp_path: Path) -> None:
    """usage_limit_scope = "fleet": #1's limit on local holds m2 too: #2's milestone resume on
    m2 (which keeps its slot) waits for the reset like any new run."""
    local = FakeHost("local", scripts={1: [Script(exit=1, limit_in=0.6), Script()]})
    m2 = FakeHost("m2", scripts={2: [Script(duration=0.3, milestone=True), Script()]})
    config = fake_config(
        tmp_path,
        [{"issue": 1, "machine": "local"}, {"issue": 2, "machine": "m2"}],
        usage_limit_scope="fleet",
        local={"max_agents": 1},
        start_interval=0,
        machines=[{"name": "m2", "host": "127.0.0.1", "max_agents": 1}],
    )
    fleet = Fleet(config, hosts={"local": local, "m2": m2})
    with anyio.fail_after(LIMIT):
        result = await fleet.run()
    assert result.exit_code == 0
    with ledger(tmp_path) as book:
        holds = book.holds()
    assert sorted(h["machine"] for h in holds) == ["local", "m2"]
    (first, second) = m2.runs_of(2)
    assert first.at < holds[0]["since"] and second.at >= holds[0]["until"] - 0.05


# -- the pure parts -------------------------------------------------------------------------------


def test_judge_tells_a_rate_limit_as_a_crash_and_holds_a_usage_limit_with_jitter() -> None:
    claude = get_kind("claude")
    rules = policy.RestartPolicy(backoff_base=1.0, backoff_max=1.0, max_crashes=1)
    status = WorkerStatus(worker="w1", task=7, title="", run=1)
    rate = Verdict(Outcome.RATE_LIMITED, "API Error: 429", line="API Error: 429")
    first = judge(
        status, rules, ExitStatus(0), [], rate, kind=claude, session_id=SID, now=0.0, rand=0.5
    )
    assert isinstance(first.decision, policy.Restart) and first.outcome == "rate-limited"
    assert (status.next_resume, status.next_prompt, status.crashes) == (SID, "continue", 1)
    status.run = 2
    second = judge(
        status, rules, ExitStatus(0), [], rate, kind=claude, session_id=SID, now=1.0, rand=0.5
    )
    assert isinstance(second.decision, policy.GiveUp)  # a 429 that persists ends the task

    usage = Verdict(
        Outcome.USAGE_LIMITED, "limit", reset_at=1000.0, window="five_hour", line="{...}"
    )
    held = judge(
        WorkerStatus(worker="w1", task=7, title="", run=1),
        rules,
        ExitStatus(1),
        [],
        usage,
        kind=claude,
        session_id=SID,
        now=0.0,
        rand=1.0,
    )
    assert isinstance(held.decision, policy.Pause)
    assert held.decision.until == 1000.0 + 50.0  # 5 % of the wait, at most 300 s
    ((event, message, fields),) = held.lines
    assert event == "usage-limit" and "(five_hour)" in message and fields["agent_line"] == "{...}"
    assert held.reason.startswith("usage limit (five_hour) until ")

    with_milestone = judge(
        WorkerStatus(worker="w1", task=7, title="", run=1),
        rules,
        ExitStatus(1),
        ["m-1.md"],
        usage,
        kind=claude,
        session_id=SID,
        now=0.0,
        rand=0.0,
    )
    assert with_milestone.step.session.resume is None and with_milestone.step.prompt == "resume"


def test_the_status_table_says_which_outcome_and_what_it_cost() -> None:
    rows = [
        {"task": 1, "worker": "w1", "state": "backoff", "outcome": "rate-limited", "cost_usd": 1.5},
        {
            "task": 2,
            "worker": "w2",
            "state": "failed",
            "outcome": "failed",
            "reason": "turn limit reached (error_max_turns) after 30 turns",
        },
        {"task": 3, "worker": "w3", "state": "done", "outcome": "done", "cost_usd": None},
        {"task": 4, "worker": "w4", "state": "paused", "outcome": "usage-limited"},
    ]
    table = status_table(rows, time.time()).splitlines()
    assert table[0].split()[-1] == "cost"
    assert "backoff (rate-limited)" in table[1] and table[1].endswith("$1.50")
    assert "failed (turn limit reached (error_max_turns) af…)" in table[2]
    assert table[3].split()[3] == "done" and table[3].endswith("-")
    assert "paused (usage-limited)" in table[4]
