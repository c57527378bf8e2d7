"""Codex's ``exec --json`` and Gemini's stream-JSON, read and judged (documented events and
the awkward cases: a failed turn with exit 0, limits as text only, refused resumes)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from supervisor.agents import Outcome, Session
from tests.agents_events import (
    NOW,
    SID,
    codex_error,
    codex_item,
    codex_thread,
    codex_turn_completed,
    codex_turn_failed,
    gemini_error,
    gemini_init,
    gemini_message,
    gemini_result,
    gemini_tool_result,
    gemini_tool_use,
    judge_run,
)

RESUMED = Session(resume=SID)

# -- Codex ---------------------------------------------------------------------------------------


def test_codex_finished_turn_is_done_with_tokens() -> None:
    facts, verdict = judge_run(
        "codex",
        [
            codex_thread(),
            '{"type":"turn.started"}',
            codex_item(
                "started",
                type="command_execution",
                command="bash -lc 'git status'",
                aggregated_output="",
                status="in_progress",
            ),
            codex_item(
                "completed",
                type="command_execution",
                command="bash -lc 'git status'",
                aggregated_output="On branch issue-7\n",
                exit_code=0,
                status="completed",
            ),
            codex_item("completed", type="agent_message", text="All tests pass."),
            codex_turn_completed(),
        ],
    )
    assert verdict.outcome is Outcome.DONE
    assert verdict.reason == "All tests pass."
    assert facts.session_id == SID
    assert facts.turns == 1
    assert facts.cost_usd is None  # Codex reports no cost
    assert facts.tokens.as_dict() == {
        "input": 24_763,
        "output": 122,
        "cache_read": 24_448,
        "cache_creation": None,
    }


def test_codex_failed_turn_with_exit_0_is_not_done() -> None:
    """wzj998/ChatCCC#363: turn.failed decides, not the exit code."""
    _, verdict = judge_run(
        "codex",
        [
            codex_thread(),
            codex_error("model is at capacity"),
            codex_turn_failed("model is at capacity"),
        ],
        exit_code=0,
    )
    assert verdict.outcome is Outcome.CRASHED
    assert verdict.reason == "model is at capacity"


@pytest.mark.parametrize(
    ("text", "reset"),
    [
        (
            "You've hit your usage limit. Upgrade to Pro (https://openai.com/chatgpt/pricing) or "
            "try again in 1 hour 5 minutes.",
            NOW + 3900,
        ),
        (
            "You've hit your usage limit. Upgrade to Plus to continue using Codex "
            "(https://chatgpt.com/explore/plus), or try again at Jul 5th, 2026 8:19 PM.",
            datetime(2026, 7, 5, 20, 19, tzinfo=UTC).timestamp(),
        ),
        (
            "You have reached your usage limit. Upgrade your plan or add credits to continue, or "
            "try again after July 3, 2026 at 2:45 PM.",
            datetime(2026, 7, 3, 14, 45, tzinfo=UTC).timestamp(),
        ),
    ],
)
def test_codex_usage_limit_text_holds_until_its_time(text: str, reset: float) -> None:
    _, verdict = judge_run(
        "codex", [codex_thread(), codex_error(text), codex_turn_failed(text)], exit_code=1
    )
    assert verdict.outcome is Outcome.USAGE_LIMITED
    assert verdict.reset_at == reset


def test_codex_429_is_transient() -> None:
    text = "stream error: exceeded retry limit, last status: 429 Too Many Requests"
    _, verdict = judge_run("codex", [codex_thread(), codex_turn_failed(text)], exit_code=1)
    assert verdict.outcome is Outcome.RATE_LIMITED


def test_codex_reconnecting_errors_are_not_failures() -> None:
    facts, verdict = judge_run(
        "codex",
        [
            codex_thread(),
            codex_error("Reconnecting... 1/5 (stream error: 429 Too Many Requests)"),
            codex_turn_completed(),
        ],
    )
    assert verdict.outcome is Outcome.DONE
    assert facts.errors == []


def test_codex_resume_refused() -> None:
    refusal = (
        f"Error: thread/resume: thread/resume failed: no rollout found for thread id "
        f"{SID} (code -32600)"
    )
    _, verdict = judge_run("codex", [], [refusal], exit_code=1, session=RESUMED)
    assert verdict.outcome is Outcome.RESUME_REFUSED
    assert verdict.reason == refusal


def test_codex_warning_items_do_not_fail_a_turn() -> None:
    _, verdict = judge_run(
        "codex",
        [
            codex_thread(),
            codex_item("completed", type="error", message="Under-development features enabled"),
            codex_turn_completed(),
        ],
    )
    assert verdict.outcome is Outcome.DONE


def test_codex_nothing_at_all_is_a_crash() -> None:
    _, verdict = judge_run("codex", [], ["error: unexpected argument"], exit_code=2)
    assert verdict.outcome is Outcome.CRASHED
    assert verdict.reason == "no result event (exit 2)"


# -- Gemini --------------------------------------------------------------------------------------


def test_gemini_finished_run_is_done_with_stats_and_joined_deltas() -> None:
    facts, verdict = judge_run(
        "gemini",
        [
            gemini_init(),
            gemini_message("user", "do it"),
            gemini_message("assistant", "Let me ", delta=True),
            gemini_message("assistant", "look.", delta=True),
            gemini_tool_use("run_shell_command", {"command": "git status"}),
            gemini_tool_result(),
            gemini_message("assistant", "All ", delta=True),
            gemini_message("assistant", "done.", delta=True),
            gemini_result(),
        ],
        block_size=2,
    )
    assert verdict.outcome is Outcome.DONE
    assert facts.session_id == SID and facts.model == "gemini-2.5-pro"
    assert facts.last_text == "All done."
    assert facts.tokens.as_dict() == {
        "input": 1200,
        "output": 300,
        "cache_read": 800,
        "cache_creation": None,
    }
    assert facts.duration_ms == 20_000


@pytest.mark.parametrize(
    ("code", "outcome", "words"),
    [
        (53, Outcome.FAILED, "turn limit exceeded"),
        (42, Outcome.FAILED, "input error"),
        (41, Outcome.FAILED, "authentication error"),
        (54, Outcome.CRASHED, "fatal tool execution error"),
    ],
)
def test_gemini_documented_exit_codes(code: int, outcome: Outcome, words: str) -> None:
    _, verdict = judge_run(
        "gemini", [gemini_init(), gemini_result("error", "stopped")], exit_code=code
    )
    assert verdict.outcome is outcome
    assert words in verdict.reason and f"exit {code}" in verdict.reason


def test_gemini_daily_quota_is_a_usage_limit() -> None:
    """google-gemini/gemini-cli#26840: TerminalQuotaError, exit 1, no fallback under -p."""
    _, verdict = judge_run(
        "gemini",
        [gemini_init()],
        ["TerminalQuotaError: You have exhausted your daily quota on this model."],
        exit_code=1,
    )
    assert verdict.outcome is Outcome.USAGE_LIMITED
    assert verdict.reset_at is None  # the policy's default pause applies


def test_gemini_usage_limit_with_a_reset_time_and_gmt_offset() -> None:
    text = "Usage limit reached for gemini-3-flash-preview. Access resets at 10:57 PM GMT-3."
    _, verdict = judge_run("gemini", [gemini_init(), gemini_result("error", text)], exit_code=1)
    assert verdict.outcome is Outcome.USAGE_LIMITED
    # 22:57 at GMT-3 is 01:57 UTC the next day.
    assert verdict.reset_at == datetime(2026, 5, 29, 1, 57, tzinfo=UTC).timestamp()


def test_gemini_resource_exhausted_429_is_transient() -> None:
    _, verdict = judge_run(
        "gemini",
        [gemini_init(), gemini_result("error", "[API Error: 429 RESOURCE_EXHAUSTED]")],
        exit_code=1,
    )
    assert verdict.outcome is Outcome.RATE_LIMITED


def test_gemini_resume_refused_before_its_exit_code() -> None:
    refusal = f'Error resuming session: Invalid session identifier "{SID}".'
    _, verdict = judge_run("gemini", [], [refusal], exit_code=42, session=RESUMED)
    assert verdict.outcome is Outcome.RESUME_REFUSED


def test_gemini_warnings_and_tool_errors_are_not_failures() -> None:
    facts, verdict = judge_run(
        "gemini",
        [
            gemini_init(),
            gemini_error("Loop detected", severity="warning"),
            gemini_tool_result("error", "file not found"),
            gemini_result(),
        ],
    )
    assert verdict.outcome is Outcome.DONE
    assert facts.errors == []
