"""The restart policy and the worker lifecycle: pure functions, tested exactly."""

from __future__ import annotations

import pytest

from supervisor import policy
from supervisor.durations import parse_duration
from supervisor.lifecycle import InvalidTransition, WorkerState, advance
from supervisor.policy import History, Outcome, RestartPolicy, decide

P = RestartPolicy(
    backoff_base=1.0,
    backoff_max=10.0,
    max_crashes=2,
    crash_window=60.0,
    max_milestones=2,
    max_usage_pauses=1,
    usage_pause_default=100.0,
)


def test_done_resets_consecutive_crashes() -> None:
    decision, after = decide(P, History(consecutive_crashes=2), Outcome.DONE, now=0, rand=0.5)
    assert decision == policy.Finish()
    assert after.consecutive_crashes == 0


def test_milestone_resumes_without_backoff_until_the_cap() -> None:
    history = History()
    for expected in (1, 2):
        decision, history = decide(P, history, Outcome.MILESTONE, now=0, rand=0.9)
        assert decision == policy.Resume()
        assert history.milestones == expected
    decision, history = decide(P, history, Outcome.MILESTONE, now=0, rand=0.9)
    assert isinstance(decision, policy.GiveUp)
    assert "milestone" in decision.reason


def test_crash_backoff_is_full_jitter_exponential_and_capped() -> None:
    assert policy.backoff_delay(P, 1, 1.0) == 1.0
    assert policy.backoff_delay(P, 3, 1.0) == 4.0
    assert policy.backoff_delay(P, 3, 0.5) == 2.0
    assert policy.backoff_delay(P, 10, 1.0) == 10.0  # capped at backoff_max
    assert policy.backoff_delay(P, 10_000, 1.0) == 10.0  # no overflow
    assert policy.backoff_delay(P, 2, 0.0) == 0.0


def test_intensity_limit_gives_up_after_more_than_r_crashes_in_t() -> None:
    history = History()
    decisions = []
    for t in (0.0, 1.0, 2.0):
        decision, history = decide(P, history, Outcome.CRASH, now=t, rand=1.0)
        decisions.append(decision)
    assert decisions[0] == policy.Restart(1.0)
    assert decisions[1] == policy.Restart(2.0)
    assert isinstance(decisions[2], policy.GiveUp)
    assert "3 crashes within 60s" in decisions[2].reason


def test_old_crashes_fall_out_of_the_window() -> None:
    history = History()
    for t in (0.0, 1.0, 100.0, 101.0):
        decision, history = decide(P, history, Outcome.CRASH, now=t, rand=1.0)
        assert isinstance(decision, policy.Restart), t
    assert history.crash_times == (100.0, 101.0)


def test_milestone_between_crashes_resets_the_backoff_exponent() -> None:
    _, history = decide(P, History(), Outcome.CRASH, now=0, rand=1.0)
    _, history = decide(P, history, Outcome.MILESTONE, now=1, rand=1.0)
    decision, _ = decide(P, history, Outcome.CRASH, now=2, rand=1.0)
    assert decision == policy.Restart(1.0)


def test_usage_limit_pauses_until_reset_and_is_not_a_crash() -> None:
    decision, history = decide(P, History(), Outcome.USAGE_LIMIT, now=10, rand=0, reset_at=50)
    assert decision == policy.Pause(50)
    assert history.crash_times == () and history.usage_pauses == 1
    decision, _ = decide(P, History(), Outcome.USAGE_LIMIT, now=10, rand=0, reset_at=None)
    assert decision == policy.Pause(110.0)
    decision, _ = decide(P, history, Outcome.USAGE_LIMIT, now=10, rand=0, reset_at=50)
    assert isinstance(decision, policy.GiveUp)


def test_lifecycle_allows_the_documented_paths() -> None:
    s = WorkerState.PENDING
    for nxt in (
        "preparing",
        "running",
        "resuming",
        "running",
        "backoff",
        "running",
        "paused",
        "running",
        "done",
    ):
        s = advance(s, WorkerState(nxt))
    assert s.final


@pytest.mark.parametrize(
    ("current", "target"),
    [("done", "running"), ("pending", "running"), ("stopped", "running"), ("backoff", "done")],
)
def test_lifecycle_refuses_impossible_transitions(current: str, target: str) -> None:
    with pytest.raises(InvalidTransition):
        advance(WorkerState(current), WorkerState(target))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45.0),
        ("30m", 1800.0),
        ("8h", 28800.0),
        ("1h30m", 5400.0),
        ("90", 90.0),
        ("1d", 86400.0),
        ("0.5h", 1800.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "8x", "1h 30m", "-5s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_a_short_backoff_keeps_the_slot_a_long_one_and_a_pause_give_it_back() -> None:
    assert policy.keeps_slot(policy.Resume())
    assert policy.keeps_slot(policy.Restart(0.0))
    assert policy.keeps_slot(policy.Restart(policy.SLOT_KEPT_FOR))
    assert not policy.keeps_slot(policy.Restart(policy.SLOT_KEPT_FOR + 0.1))
    assert not policy.keeps_slot(policy.Pause(1e9))


def test_the_history_goes_through_the_ledger_and_back() -> None:
    history = History(crash_times=(1.5, 2.5), consecutive_crashes=2, milestones=3, usage_pauses=1)
    assert policy.history_from_dict(policy.history_to_dict(history)) == history
    assert policy.history_from_dict({}) == History()


def test_the_verdict_says_what_the_fleet_will_do() -> None:
    from supervisor.hosts.base import ExitStatus
    from supervisor.outcome import WorkerStatus, judge

    rules = RestartPolicy(backoff_base=100.0, backoff_max=100.0)
    status = WorkerStatus(worker="w1", task=7, title="", run=2)
    long = judge(status, rules, ExitStatus(3), [], None, now=0.0, rand=0.9)
    assert isinstance(long.decision, policy.Restart) and long.state == "backoff"
    ((event, message, fields),) = long.lines
    assert event == "crashed" and "restarting in 90.0s" in message
    assert "its slot goes to others meanwhile" in message and fields["backoff"] == 90.0
    short = judge(status, rules, ExitStatus(3), [], None, now=1.0, rand=0.001)
    assert "restarting in 0.1s" in short.lines[0][1] and "slot" not in short.lines[0][1]
    assert (status.crashes, status.last_crash_run) == (2, 2)
    asked = judge(
        status, rules, ExitStatus(143), [], None, restart_requested=True, now=2.0, rand=0.5
    )
    assert asked.decision == policy.Restart(0.0) and asked.outcome == "restarted"
    stopped = judge(status, rules, ExitStatus(143), [], None, stopping="SIGTERM", now=3.0, rand=0.5)
    assert (stopped.state, stopped.reason) == ("stopped", "SIGTERM")
    assert status.crashes == 2  # neither a restart on request nor a stop is a crash
