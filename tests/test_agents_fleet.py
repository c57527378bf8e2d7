"""Issue 13 end to end: real ``agentize-fleet up`` subprocesses running the protocol doubles
(``scripts/fake-claude``, ``fake-codex``, ``fake-gemini``) as agent kinds, in real git
worktrees.  What the fleet did is read back from the doubles' own record file (argv, cwd,
session, resumed session, prompt of every run), the ledger, the JSONL log and the report.

The fast, in-process side of the same rules (a refused resume, a stall, the resume after a hold
for every kind) is in ``test_agents_worker.py``."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FleetRun, Harness, wait_for
from fleet_helpers import cli, explain, kill_up, wait_states

from supervisor.ledger import Ledger

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
COST_PER_TURN = 0.015625
CONTINUE = "Your previous session on issue #{issue} was interrupted; go on."
RESUME = "Continue from the latest milestone"


def kind_config(harness: Harness, kind: str, tasks: list[dict[str, Any]], **extra: Any) -> Path:
    """A fleet of ``kind`` running its double, cap 1 so the runs' order is the queue's."""
    agent = {
        "kind": kind,
        "command": [str(SCRIPTS / f"fake-{kind}")],
        "continue_prompt": CONTINUE,
        "resume_prompt": RESUME,
        **extra.pop("agent", {}),
    }
    return harness.write(harness.config(tasks, concurrency=1, agent=agent, **extra))


def starts(harness: Harness, issue: int) -> list[dict[str, Any]]:
    return harness.runs_of(issue)


def ends(harness: Harness, issue: int) -> list[dict[str, Any]]:
    return sorted(
        (r for r in harness.agent_records("end") if r["issue"] == issue), key=lambda r: r["run"]
    )


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def results(run: FleetRun) -> list[dict[str, Any]]:
    """The agents' result events, from the log (their raw stdout lines)."""
    found = []
    for record in run.records:
        line = record.get("line", "")
        if record["stream"] == "stdout" and line.startswith('{"type":"result"'):
            found.append(json.loads(line))
    return found


def ledger_runs(harness: Harness, issue: int | None = None) -> list[Any]:
    with Ledger.reader(harness.state_dir) as ledger:  # type: ignore[union-attr]
        return ledger.runs(issue=issue)


def report_json(run: FleetRun) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run.run_dir / "report.json").read_text())
    return data


# -- kind "claude": the whole of issue 13's first "done when" ----------------------------------


def test_a_claude_fleet_resumes_crashes_restarts_milestones_retries_errors_and_waits_limits(
    fleet: Harness,
) -> None:
    """#4 hits the usage limit first (cap 1: nothing may start until its resetsAt); #1 crashes
    mid-session and is resumed with --resume in its worktree; #2 leaves a milestone and starts
    fresh with the resume prompt; #3 ends with an API error at exit 0 and is retried, not done;
    the report's total cost is the sum of the runs' total_cost_usd."""
    claude_json = fleet.home / ".claude.json"
    claude_json.write_text(json.dumps({"numStartups": 3, "projects": {}}))
    reset_in = 4
    tasks = [
        {"issue": 4, "env": {"FAKE_AGENT_PLAN": f"usage-limit:{reset_in},finish"}},
        {"issue": 1, "env": {"FAKE_AGENT_PLAN": "crash,finish"}},
        {"issue": 2, "env": {"FAKE_AGENT_PLAN": "milestone,finish"}},
        {"issue": 3, "env": {"FAKE_AGENT_PLAN": "api-error,finish"}},
    ]
    run = fleet.run(kind_config(fleet, "claude", tasks), timeout=90)
    assert run.returncode == 0, run.explain()
    assert {w["task"]: w["state"] for w in run.summary["workers"]} == dict.fromkeys(
        (1, 2, 3, 4), "done"
    )

    # #4: the usage limit holds the machine until resetsAt; then its session is resumed.
    (_, after) = starts(fleet, 4)
    (first_end, _) = ends(fleet, 4)
    with Ledger.reader(fleet.state_dir) as ledger:  # type: ignore[union-attr]
        (hold,) = ledger.holds()
    assert hold["machine"] == "local" and hold["reason"] == "usage limit (five_hour)"
    assert '"rate_limit_event"' in hold["line"] and '"rejected"' in hold["line"]
    resets_at = json.loads(hold["line"])["rate_limit_info"]["resetsAt"]
    assert hold["until"] >= resets_at
    later = [r for r in fleet.agent_records("start") if r["t"] > first_end["t"]]
    assert later and all(r["t"] >= resets_at for r in later), (resets_at, later)
    assert flag(after["argv"], "--resume") == first_end["session"]
    (usage_event,) = run.events("usage-limit")
    assert usage_event["agent_line"] == hold["line"]  # the agent line that triggered it
    assert usage_event["session_id"] == first_end["session"]

    # #1: crashed mid-session, resumed with --resume in the same worktree, continue prompt.
    (crashed, resumed) = starts(fleet, 1)
    (crash_end, resumed_end) = ends(fleet, 1)
    assert crash_end["exit"] == 1
    assert flag(crashed["argv"], "--session-id") == crash_end["session"]  # pinned
    assert flag(resumed["argv"], "--resume") == crash_end["session"]
    assert resumed["cwd"] == crashed["cwd"]
    assert resumed_end["resumed"] == crash_end["session"]
    assert resumed_end["prompt"] == CONTINUE.format(issue=1)
    first, second = ledger_runs(fleet, 1)
    assert (first.outcome, first.session_id) == ("crashed", crash_end["session"])
    assert (second.outcome, second.resumed_from) == ("done", crash_end["session"])
    assert second.session_id == resumed_end["session"]  # a resumed session's new id, re-read

    # #2: the milestone hand-off is a fresh session with the resume prompt.
    (_, fresh) = starts(fleet, 2)
    (milestone_end, fresh_end) = ends(fleet, 2)
    assert "--resume" not in fresh["argv"] and flag(fresh["argv"], "--session-id")
    assert fresh_end["prompt"] == RESUME and fresh_end["session"] != milestone_end["session"]
    assert [r.outcome for r in ledger_runs(fleet, 2)] == ["milestone", "done"]

    # #3: an API error reported as success with is_error at exit 0 is retried, not done.
    (error_end, retry_end) = ends(fleet, 3)
    assert error_end["exit"] == 0
    assert [r.outcome for r in ledger_runs(fleet, 3)] == ["rate-limited", "done"]
    assert retry_end["resumed"] == error_end["session"]
    done_at = [e["seq"] for e in run.events("done") if e["task"] == 3]
    retried = [e for e in run.events("crashed") if e["task"] == 3]
    assert len(done_at) == 1 and retried and retried[0]["seq"] < done_at[0]
    assert retried[0]["outcome"] == "rate-limited"

    # Cost: the report's total is the sum of the runs' total_cost_usd, exactly.
    costs = [r["total_cost_usd"] for r in results(run)]
    report = report_json(run)
    assert (
        report["totals"]["cost_usd"]
        == sum(costs)
        == sum(r.cost_usd or 0.0 for r in ledger_runs(fleet))
    )
    assert all(c % COST_PER_TURN == 0 for c in costs)
    by_task = {t["task"]: t for t in report["tasks"]}
    assert by_task[1]["cost_usd"] == sum(r.cost_usd or 0 for r in ledger_runs(fleet, 1))
    assert by_task[3]["outcome"] == "done" and by_task[3]["result_text"]
    assert [r["outcome"] for r in by_task[1]["runs_detail"]] == ["crashed", "done"]
    markdown = (run.run_dir / "report.md").read_text()
    assert "Usage holds" in markdown and "usage limit (five_hour)" in markdown
    ended = [e for e in run.events("run-ended") if e["task"] == 1]
    assert ended[-1]["session_id"] == resumed_end["session"] and ended[-1]["outcome"] == "done"
    assert ended[-1]["cost_usd"] == second.cost_usd and ended[-1]["turns"] == second.turns

    # The live view showed the events as people read them, never the raw JSON.
    assert "Bash: echo 'step 1/2'" in run.stdout and '{"type":"assistant"' not in run.stdout

    # Worktree trust (Agentize's `wt spawn`): each worktree is trusted in ~/.claude.json, whose
    # other keys are kept.
    config = json.loads(claude_json.read_text())
    assert config["numStartups"] == 3
    trusted = {os.path.realpath(r["cwd"]) for r in fleet.agent_records("start")}
    assert len(trusted) == 4
    for path in trusted:
        assert config["projects"][path]["hasTrustDialogAccepted"] is True

    # `logs --session` shows that session's runs: #1's two runs, nothing else.
    shown = cli(
        fleet, fleet.tmp / "fleet.toml", "logs", "--json", "--session", crash_end["session"][:8]
    )
    assert shown.returncode == 0, explain(shown)
    records = [json.loads(line) for line in shown.stdout.splitlines()]
    assert records and {(r["task"], r["run"]) for r in records} == {(1, 1), (1, 2)}
    readable = cli(fleet, fleet.tmp / "fleet.toml", "logs", "--session", crash_end["session"])
    assert "Bash: echo 'step 1/2'" in readable.stdout and '"type"' not in readable.stdout
    unknown = cli(fleet, fleet.tmp / "fleet.toml", "logs", "--session", "no-such-session")
    assert unknown.returncode == 2 and "no run has agent session" in unknown.stderr


# -- kinds "codex" and "gemini": success, crash-resume, the usage limit -------------------------


def _resumed_from(kind: str, argv: list[str]) -> str | None:
    """The session a run's argv resumes: codex ``exec ... resume ID``, gemini ``--resume ID``."""
    if kind == "codex":
        return argv[argv.index("resume") + 1] if "resume" in argv else None
    return flag(argv, "--resume")


@pytest.mark.parametrize("kind", ["codex", "gemini"])
def test_codex_and_gemini_fleets_finish_resume_crashes_and_end_on_a_long_usage_hold(
    fleet: Harness, kind: str
) -> None:
    """#1 finishes; #2 crashes mid-session and is resumed in its worktree; #3 hits the usage
    limit (resetting in 2 hours, as the CLI's text says): longer than max_usage_wait, so the
    fleet ends with exit 5, #3 paused with its session, and says when it can go on.  The next
    ``up`` before the reset starts nothing and ends the same way."""
    tasks = [
        {"issue": 1, "env": {"FAKE_AGENT_PLAN": "finish"}},
        {"issue": 2, "env": {"FAKE_AGENT_PLAN": "crash,finish"}},
        {"issue": 3, "env": {"FAKE_AGENT_PLAN": "usage-limit:7200,finish"}},
    ]
    config = kind_config(fleet, kind, tasks, max_usage_wait=600)
    began = time.time()
    run = fleet.run(config, timeout=90)
    assert run.returncode == 5, run.explain()
    states = {w["task"]: w["state"] for w in run.summary["workers"]}
    assert states == {1: "done", 2: "done", 3: "paused"}

    (crashed, resumed) = starts(fleet, 2)
    (crash_end, resumed_end) = ends(fleet, 2)
    assert crash_end["exit"] == 1 and crash_end["session"]
    assert _resumed_from(kind, resumed["argv"]) == crash_end["session"]
    assert resumed["cwd"] == crashed["cwd"] and resumed_end["resumed"] == crash_end["session"]
    assert resumed_end["prompt"] == CONTINUE.format(issue=2)
    assert [r.outcome for r in ledger_runs(fleet, 2)] == ["crashed", "done"]

    (limited_end,) = ends(fleet, 3)
    with Ledger.reader(fleet.state_dir) as ledger:  # type: ignore[union-attr]
        (hold,) = ledger.holds()
        task = ledger.task(3)
    assert hold["machine"] == "local" and hold["reason"] == "usage limit"
    assert began + 7200 - 90 <= hold["until"] <= time.time() + 7200 + 300 + 60
    assert hold["line"] and ("usage limit" in hold["line"].lower())
    assert task is not None and (task.state, task.outcome) == ("paused", "usage-limited")
    assert (task.next_resume, task.next_prompt) == (limited_end["session"], "continue")
    assert "max_usage_wait" in run.summary["starts_closed"]
    assert "can go on after" in (run.run_dir / "report.md").read_text()
    assert [r.outcome for r in ledger_runs(fleet, 1)] == ["done"]
    tokens = report_json(run)["totals"]
    assert tokens["cost_usd"] is None and tokens["output_tokens"]  # tokens, no USD

    count = len(fleet.agent_records("start"))
    again = fleet.run(config, timeout=60)
    assert again.returncode == 5, again.explain()
    assert len(fleet.agent_records("start")) == count  # nothing started before the reset
    (event,) = again.events("starts-closed")
    assert "max_usage_wait" in event["reason"]


def test_exit_5_on_a_usage_hold_then_the_next_up_resumes_the_session(fleet: Harness) -> None:
    """A hold longer than max_usage_wait ends the fleet with exit 5; the next ``up`` after the
    reset resumes the limited session (--resume, continue prompt) and finishes it."""
    tasks = [{"issue": 5, "env": {"FAKE_AGENT_PLAN": "usage-limit:5,finish"}}]
    config = kind_config(fleet, "claude", tasks, max_usage_wait=1)
    first = fleet.run(config, timeout=60)
    assert first.returncode == 5, first.explain()
    assert first.task_summary(5)["state"] == "paused"
    (limited_end,) = ends(fleet, 5)
    with Ledger.reader(fleet.state_dir) as ledger:  # type: ignore[union-attr]
        (hold,) = ledger.holds()
    wait_for(lambda: time.time() > hold["until"] + 0.2, 30, "the reset")
    second = fleet.run(config, timeout=60)
    assert second.returncode == 0, second.explain()
    (_, resumed) = starts(fleet, 5)
    assert flag(resumed["argv"], "--resume") == limited_end["session"]
    assert ends(fleet, 5)[-1]["prompt"] == CONTINUE.format(issue=5)


# -- status, stall, refused resume, malformed lines, adoption, cost limits ---------------------


def test_status_shows_the_held_machine_its_reset_and_the_cost(fleet: Harness) -> None:
    tasks = [
        {"issue": 1, "env": {"FAKE_AGENT_PLAN": "usage-limit:900,finish"}},
        {"issue": 2, "env": {"FAKE_AGENT_PLAN": "finish"}},
    ]
    config = kind_config(fleet, "claude", tasks)
    started = fleet.start(config)
    wait_states(started, {1: "paused"}, timeout=30)
    shown = cli(fleet, config, "status")
    assert shown.returncode == 0, explain(shown)
    assert "machine local held until" in shown.stdout and "usage limit (five_hour)" in shown.stdout
    (row,) = [line for line in shown.stdout.splitlines() if line.startswith("#1 ")]
    assert "paused (usage-limited)" in row and "$0.0469" in row  # 3 turns (2 steps + 1)
    assert "cost" in shown.stdout.splitlines()[2]  # the table's header (after the hold line)
    assert cli(fleet, config, "down").returncode == 0
    result = started.wait(30)
    assert result.returncode == 130, result.explain()
    assert fleet.runs_of(2) == []  # held: nothing else started


def test_a_silent_run_is_stopped_as_stalled_and_its_session_resumed(fleet: Harness) -> None:
    tasks = [{"issue": 1, "env": {"FAKE_AGENT_PLAN": "sleep:60+finish,finish"}}]
    run = fleet.run(kind_config(fleet, "claude", tasks, agent={"stall_timeout": 1.5}), timeout=60)
    assert run.returncode == 0, run.explain()
    assert run.elapsed < 40
    (stalled,) = run.events("stalled")
    assert stalled["quiet"] >= 1.5
    (first, second) = starts(fleet, 1)
    assert flag(second["argv"], "--resume") == flag(first["argv"], "--session-id")
    assert [r.outcome for r in ledger_runs(fleet, 1)] == ["stalled", "done"]
    (crashed,) = run.events("crashed")
    assert (
        "stalled ran" not in crashed["line"]
        and "stalled (stalled: no output for" in (crashed["line"])
    )


def test_a_refused_resume_starts_a_fresh_session_with_the_continue_prompt(
    fleet: Harness,
) -> None:
    """The fleet is stopped mid-run; the agent's session store is lost (a machine reinstalled);
    the next ``up`` resumes the interrupted session, the CLI refuses, and a fresh session goes
    on with the continue prompt -- logged, and not counted as a crash."""
    tasks = [{"issue": 1, "env": {"FAKE_AGENT_PLAN": "hang,finish,finish"}}]
    config = kind_config(fleet, "claude", tasks)
    started = fleet.start(config)
    wait_for(lambda: starts(fleet, 1), 30, "the first run")
    assert cli(fleet, config, "down").returncode == 0
    assert started.wait(30).returncode == 130
    (first,) = starts(fleet, 1)
    shutil.rmtree(Path(first["cwd"]) / ".tmp" / "fake-agent-sessions")
    run = fleet.run(config, timeout=60)
    assert run.returncode == 0, run.explain()
    (_, refused, fresh) = starts(fleet, 1)
    session = flag(first["argv"], "--session-id")
    assert flag(refused["argv"], "--resume") == session
    assert "--resume" not in fresh["argv"] and flag(fresh["argv"], "--session-id") != session
    assert ends(fleet, 1)[-1]["prompt"] == CONTINUE.format(issue=1)
    (event,) = run.events("resume-refused")
    assert f"No conversation found with session ID: {session}" in event["agent_line"]
    assert [r.outcome for r in ledger_runs(fleet, 1)] == ["stopped", "resume-refused", "done"]
    assert run.task_summary(1)["crashes"] == 0


def test_malformed_event_lines_are_logged_raw_and_never_crash_the_fleet(fleet: Harness) -> None:
    tasks = [{"issue": 1, "env": {"FAKE_AGENT_PLAN": "badutf8+splice+finish"}}]
    run = fleet.run(kind_config(fleet, "claude", tasks), timeout=60)
    assert run.returncode == 0, run.explain()
    lines = [r["line"] for r in run.records if r["stream"] == "stdout"]
    assert any(line.startswith("bad: ") for line in lines)
    assert any('spliced here:{"type":"rate_limit_event"' in line for line in lines)
    (ended,) = run.events("run-ended")
    assert ended["malformed_lines"] >= 1 and ended["outcome"] == "done"
    assert "bad: " in run.stdout  # the live view shows raw lines as they are


def test_an_adopted_run_is_read_by_its_kind_from_the_ledger_row(fleet: Harness) -> None:
    """``up`` is killed mid-run; the next one adopts the run, rebuilds its reader from the
    ledger (kind, session) and records its cost and outcome from the result event."""
    tasks = [{"issue": 1, "env": {"FAKE_AGENT_PLAN": "sleep:2+finish"}}]
    config = kind_config(fleet, "claude", tasks)
    started = fleet.start(config)
    wait_for(lambda: starts(fleet, 1), 30, "the run")
    kill_up(started)
    run = fleet.run(config, timeout=60)
    assert run.returncode == 0, run.explain()
    (adopted,) = run.events("adopted")
    assert adopted["task"] == 1
    (only,) = ledger_runs(fleet, 1)
    (end,) = ends(fleet, 1)
    assert (only.outcome, only.session_id, only.agent_kind) == ("done", end["session"], "claude")
    assert only.cost_usd == sum(r["total_cost_usd"] for r in results(run))


def test_cost_limits_stop_new_runs_of_a_task_and_of_the_fleet(fleet: Harness) -> None:
    """A run costs 3 turns ($0.046875): the task limit lets #1 make two runs then fails it; the
    fleet limit lets two runs start and closes new runs (exit 5, the report says so)."""
    tasks = [{"issue": 1, "env": {"FAKE_AGENT_PLAN": "milestone,milestone,finish"}}]
    run = fleet.run(kind_config(fleet, "claude", tasks, max_cost_usd={"task": 0.05}), timeout=60)
    assert run.returncode == 1, run.explain()
    summary = run.task_summary(1)
    assert summary["state"] == "failed" and "max_cost_usd.task" in summary["reason"]
    assert len(starts(fleet, 1)) == 2

    fleet.record.unlink()
    tasks = [{"issue": n, "env": {"FAKE_AGENT_PLAN": "finish"}} for n in (2, 3, 4)]
    config = kind_config(fleet, "claude", tasks, max_cost_usd={"fleet": 0.05})
    run = fleet.run(config, timeout=60)
    assert run.returncode == 5, run.explain()
    assert [len(starts(fleet, n)) for n in (2, 3, 4)] == [1, 1, 0]
    assert "max_cost_usd.fleet" in run.summary["starts_closed"]
    assert "new runs were stopped early" in (run.run_dir / "report.md").read_text()


@pytest.mark.parametrize(
    ("agent", "words"),
    [
        ({"kind": "cursor"}, ["agent.kind", "'cursor'", "'claude'"]),
        ({"kind": "claude", "command": ["claude", "--verbose"]}, ["'--verbose'", "remove it"]),
        ({"kind": "codex", "command": ["codex", "exec"]}, ["'exec'"]),
    ],
)
def test_up_refuses_an_unknown_kind_or_a_managed_flag_naming_it(
    fleet: Harness, agent: dict[str, Any], words: list[str]
) -> None:
    config = fleet.config([{"issue": 1}])
    config["agent"] = agent
    run = fleet.run(fleet.write(config), timeout=30)
    assert run.returncode == 2, run.explain()
    assert "Traceback" not in run.stderr and "fleet.toml" in run.stderr
    for word in words:
        assert word in run.stderr, run.stderr
