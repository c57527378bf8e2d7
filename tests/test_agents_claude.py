"""Claude Code's stream-JSON, read and judged: the documented events and the awkward cases
(anthropics/claude-code#79500, #49640, #38673, #40609, #58591, slopus/happy#465)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from supervisor.agents import Outcome, Session
from tests.agents_events import (
    NOW,
    SID,
    claude_compact,
    claude_init,
    claude_rate,
    claude_result,
    claude_text,
    claude_tool,
    claude_tool_result,
    judge_run,
)

RESUMED = Session(resume=SID)


@pytest.mark.parametrize("block_size", [1, 2, 100])
def test_a_finished_run_is_done_with_its_facts(block_size: int) -> None:
    facts, verdict = judge_run(
        "claude",
        [
            claude_init(),
            claude_rate("allowed", NOW + 3600),
            claude_tool("Bash", {"command": "git status"}, text="Let me look."),
            claude_tool_result("On branch issue-7"),
            claude_text("All tests passed (3/3)!"),
            claude_result(),
        ],
        block_size=block_size,
    )
    assert verdict.outcome is Outcome.DONE
    assert verdict.reason == "All tests passed (3/3)!"
    assert facts.session_id == SID
    assert facts.model == "claude-opus-4-6"
    assert facts.cost_usd == pytest.approx(0.4213)
    assert facts.turns == 12
    assert facts.duration_ms == 125_000
    assert facts.tokens.as_dict() == {
        "input": 1200,
        "output": 3400,
        "cache_read": 14707,
        "cache_creation": 2783,
    }
    assert facts.last_text == "All tests passed (3/3)!"
    assert facts.rate_limits["five_hour"].status == "allowed"
    assert not facts.rejections and facts.malformed == 0
    assert facts.summary()["result"] == {
        "ok": True,
        "subtype": "success",
        "text": "All tests passed (3/3)!",
    }


def test_api_error_as_success_with_exit_0_is_a_transient_rate_limit() -> None:
    """#79500: subtype "success", is_error true, exit 0 -- an API error, not a finished task."""
    text = "API Error: Rate limit reached"
    facts, verdict = judge_run(
        "claude",
        [
            claude_init(),
            claude_text(text, is_api_error_message=True, error="rate_limit"),
            claude_result(is_error=True, result=text, api_error_status=429),
        ],
        exit_code=0,
    )
    assert verdict.outcome is Outcome.RATE_LIMITED
    assert text in verdict.reason
    assert facts.result is not None and not facts.result.ok
    assert facts.last_text is None  # the synthetic message is an error, not the agent's words


def test_other_api_errors_with_exit_0_are_crashes_with_their_text() -> None:
    text = "Your organization has disabled Claude subscription access for Claude Code"
    _, verdict = judge_run(
        "claude",
        [
            claude_init(),
            claude_result(
                is_error=True, result=text, api_error_status=403, terminal_reason="api_error"
            ),
        ],
        exit_code=0,
    )
    assert verdict.outcome is Outcome.CRASHED
    assert verdict.reason == text


@pytest.mark.parametrize(
    ("subtype", "words"),
    [("error_max_turns", "turn limit"), ("error_max_budget_usd", "budget limit")],
)
def test_turn_and_budget_limits_fail_the_task_with_the_reason(subtype: str, words: str) -> None:
    _, verdict = judge_run(
        "claude",
        [
            claude_init(),
            claude_result(
                subtype=subtype,
                is_error=True,
                result=None,
                turns=40,
                errors=[f"Reached maximum ({subtype})"],
            ),
        ],
        exit_code=1,
    )
    assert verdict.outcome is Outcome.FAILED
    assert words in verdict.reason and "40 turns" in verdict.reason


def test_error_during_execution_is_a_crash() -> None:
    _, verdict = judge_run(
        "claude",
        [
            claude_init(),
            claude_result(
                subtype="error_during_execution",
                is_error=True,
                result=None,
                errors=["tool crashed"],
            ),
        ],
        exit_code=1,
    )
    assert verdict.outcome is Outcome.CRASHED
    assert verdict.reason == "tool crashed"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (1, "no result event (exit 1)"),
        (0, "no result event (exit 0)"),
        (137, "no result event (exit 137, killed by signal 9)"),
        (None, "no result event (exit status unknown)"),
    ],
)
def test_no_result_event_is_a_crash_whatever_the_exit(code: int | None, reason: str) -> None:
    _, verdict = judge_run(
        "claude", [claude_init(), claude_text("working")], ["boom"], exit_code=code
    )
    assert verdict.outcome is Outcome.CRASHED
    assert verdict.reason == reason


def test_success_result_but_a_nonzero_exit_is_not_done() -> None:
    _, verdict = judge_run("claude", [claude_init(), claude_result()], exit_code=143)
    assert verdict.outcome is Outcome.CRASHED
    assert "after a successful result" in verdict.reason


def test_rejected_rate_limit_event_before_the_limit_text_holds_until_resets_at() -> None:
    resets = NOW + 7200
    text = "You've hit your limit · resets 11pm (UTC)"
    rejected = claude_rate("rejected", resets, "five_hour")
    _, verdict = judge_run(
        "claude",
        [
            claude_init(),
            rejected,
            claude_text(text, is_api_error_message=True, error="rate_limit"),
            claude_result(is_error=True, result=text, api_error_status=429),
        ],
        exit_code=1,
    )
    assert verdict.outcome is Outcome.USAGE_LIMITED
    assert verdict.reset_at == resets  # the event's time wins over the text's
    assert verdict.window == "five_hour"
    assert verdict.line == rejected


def test_usage_limit_with_exit_1_and_no_result_event() -> None:
    """slopus/happy#465: the limit as plain text, exit 1, nothing else."""
    facts, verdict = judge_run(
        "claude", [claude_init(), "You've hit your limit · resets 11pm (UTC)"], exit_code=1
    )
    assert verdict.outcome is Outcome.USAGE_LIMITED
    assert verdict.reset_at == datetime(2026, 5, 28, 23, 0, tzinfo=UTC).timestamp()
    assert facts.result is None


def test_weekly_limit_in_the_error_result_text() -> None:
    text = "You've hit your weekly limit · resets Jul 18, 12pm (UTC)"
    _, verdict = judge_run(
        "claude",
        [claude_init(), claude_result(is_error=True, result=text, api_error_status=429)],
        exit_code=0,
    )
    assert verdict.outcome is Outcome.USAGE_LIMITED
    assert verdict.reset_at == datetime(2026, 7, 18, 12, 0, tzinfo=UTC).timestamp()


def test_the_agents_own_words_about_limits_are_not_a_limit() -> None:
    """Assistant text and tool output are never searched for limit wordings."""
    talk = claude_text("Note: 'You've hit your limit · resets 3pm' is matched by limits.py")
    tool = claude_tool_result("Claude AI usage limit reached|1750000000")
    _, done = judge_run("claude", [claude_init(), talk, tool, claude_result()])
    assert done.outcome is Outcome.DONE
    _, crashed = judge_run("claude", [claude_init(), talk, tool], exit_code=1)
    assert crashed.outcome is Outcome.CRASHED


def test_a_rejection_does_not_outweigh_a_clean_finish() -> None:
    _, verdict = judge_run(
        "claude", [claude_init(), claude_rate("rejected", NOW + 60), claude_result()]
    )
    assert verdict.outcome is Outcome.DONE


def test_a_rejection_superseded_by_allowed_is_over() -> None:
    _, verdict = judge_run(
        "claude",
        [
            claude_init(),
            claude_rate("rejected", NOW + 60),
            claude_rate("allowed", NOW + 60),
            claude_result(subtype="error_during_execution", is_error=True, result="tool died"),
        ],
        exit_code=1,
    )
    assert verdict.outcome is Outcome.CRASHED and verdict.reason == "tool died"
    _, other = judge_run(
        "claude",
        [
            claude_init(),
            claude_rate("rejected", NOW + 60, "seven_day"),
            claude_rate("allowed", NOW + 60, "five_hour"),
        ],
        exit_code=1,
    )
    assert other.outcome is Outcome.USAGE_LIMITED and other.window == "seven_day"


def test_overage_rejected_beside_allowed_is_information_only() -> None:
    """#38673: no extra usage available, but the request went through."""
    facts, verdict = judge_run(
        "claude",
        [
            claude_init(),
            claude_rate("allowed", NOW + 60, overageStatus="rejected", isUsingOverage=False),
            claude_result(result=""),
        ],
    )
    assert verdict.outcome is Outcome.DONE
    assert not facts.rejections


def test_overage_rejected_while_using_overage_is_a_usage_limit() -> None:
    _, verdict = judge_run(
        "claude",
        [
            claude_init(),
            claude_rate(
                "allowed",
                NOW + 60,
                overageStatus="rejected",
                isUsingOverage=True,
                overageResetsAt=int(NOW + 86400),
            ),
        ],
        exit_code=1,
    )
    assert verdict.outcome is Outcome.USAGE_LIMITED
    assert verdict.window == "overage" and verdict.reset_at == NOW + 86400


def test_rate_limit_event_spliced_into_an_assistant_line_is_salvaged() -> None:
    """#49640: the event is written into the middle of another line, which no longer parses."""
    event = claude_rate("rejected", NOW + 3600, "seven_day")
    assistant = claude_text("partial text and the rest of it")
    cut = assistant.index("and the rest")
    first, second = assistant[:cut] + event, assistant[cut:]
    facts, verdict = judge_run(
        "claude",
        [claude_init(), first, second, claude_text("more")],
        exit_code=1,
        block_size=1,
    )
    assert facts.malformed == 1
    assert verdict.outcome is Outcome.USAGE_LIMITED
    assert verdict.window == "seven_day" and verdict.reset_at == NOW + 3600
    assert facts.last_text == "more"


def test_resume_refused_on_stderr_falls_back() -> None:
    refusal = f"No conversation found with session ID: {SID}"
    facts, verdict = judge_run("claude", [], [refusal], exit_code=1, session=RESUMED)
    assert verdict.outcome is Outcome.RESUME_REFUSED
    assert verdict.reason == refusal
    assert facts.session_id == SID


def test_resume_refused_as_an_error_result() -> None:
    """#40609: newer versions report it as error_during_execution with the text in errors."""
    _, verdict = judge_run(
        "claude",
        [
            claude_result(
                subtype="error_during_execution",
                is_error=True,
                result=None,
                errors=[f"No conversation found with session ID: {SID}"],
            )
        ],
        exit_code=1,
        session=RESUMED,
    )
    assert verdict.outcome is Outcome.RESUME_REFUSED


def test_the_refusal_text_means_nothing_when_the_run_did_not_resume() -> None:
    _, verdict = judge_run(
        "claude", [], [f"No conversation found with session ID: {SID}"], exit_code=1
    )
    assert verdict.outcome is Outcome.CRASHED


def test_session_id_is_re_read_from_init_and_result() -> None:
    """#3510: a resumed session can come back under a new id."""
    facts, _ = judge_run("claude", [claude_init("new-id")], exit_code=1, session=RESUMED)
    assert facts.session_id == "new-id"
    facts, _ = judge_run("claude", [claude_init("a"), claude_result(session_id="b")])
    assert facts.session_id == "b"
    pinned, _ = judge_run("claude", [], exit_code=1, session=Session(new_id="pinned"))
    assert pinned.session_id == "pinned"  # known before any output


def test_compactions_are_counted() -> None:
    facts, _ = judge_run(
        "claude", [claude_init(), claude_compact(), claude_compact("manual"), claude_result()]
    )
    assert facts.compactions == 2


def test_malformed_lines_stay_raw_output_and_never_raise() -> None:
    garbage: list[str | bytes] = [
        "{not json",
        b"\xff\xfe{\x00",
        "[1, 2, 3]",
        "null",
        '{"type": 5}',
        '{"type":"result","subtype":7,"num_turns":"x","usage":[1],"total_cost_usd":"free"}',
        '{"type":"assistant","message":"plain"}',
        '{"type":"assistant","message":{"content":[null,{"type":"text","text":9}]}}',
        '{"type":"rate_limit_event","rate_limit_info":[]}',
        '{"type":"system","subtype":"init","session_id":["x"]}',
        "",
        "plain text line",
    ]
    facts, verdict = judge_run("claude", [claude_init(), *garbage], exit_code=1, block_size=2)
    assert verdict.outcome is Outcome.CRASHED
    assert facts.session_id == SID
    assert facts.cost_usd is None and facts.turns is None


def test_a_result_line_cut_in_pieces_is_still_the_result() -> None:
    """The worker's line splitter cuts lines longer than max_line_bytes into pieces."""
    result = claude_result(result="x" * 5000)
    pieces = [result[i : i + 1000] for i in range(0, len(result), 1000)]
    facts, verdict = judge_run("claude", [claude_init(), *pieces], block_size=1)
    assert verdict.outcome is Outcome.DONE
    assert facts.malformed == 0


def test_a_broken_line_followed_by_events_does_not_swallow_them() -> None:
    facts, verdict = judge_run(
        "claude", ['{"type":"assistant","message":{"content":[', claude_result()], block_size=1
    )
    assert verdict.outcome is Outcome.DONE
    assert facts.malformed == 1


def test_errors_kept_are_bounded() -> None:
    flood = [claude_text(f"API Error {i}", is_api_error_message=True) for i in range(100)]
    facts, _ = judge_run("claude", [claude_init(), *flood], exit_code=1)
    assert len(facts.errors) == 20
    assert json.dumps(facts.summary())  # JSON-ready for the ledger
