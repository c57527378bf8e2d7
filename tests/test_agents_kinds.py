"""The agent-kind interface: argument lists, flags a kind manages, kind ``command`` keeping
today's rules, reset times in the CLIs' wordings, and how a verdict and a milestone combine."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from supervisor import policy
from supervisor.agents import (
    KINDS,
    ManagedFlagError,
    Outcome,
    Session,
    UnknownKindError,
    Verdict,
    get_kind,
    plan_next,
)
from supervisor.agents.base import reset_time
from tests.agents_events import NOW, SID, judge_run

# -- argument lists ------------------------------------------------------------------------------


def test_claude_argv_new_pinned_and_resumed() -> None:
    claude = get_kind("claude")
    new = claude.launch(["/opt/claude", "--model", "opus"], "-start", Session(new_id=SID))
    assert new.argv == [
        "/opt/claude",
        "--model",
        "opus",
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--session-id",
        SID,
        "--",
        "-start",
    ]
    assert new.session_id == SID and not new.resuming and new.env == {}
    resumed = claude.launch(["claude"], "go on", Session(resume="old"))
    assert resumed.argv[-4:] == ["--resume", "old", "--", "go on"]
    assert "--session-id" not in resumed.argv
    assert resumed.session_id == "old" and resumed.resuming
    unpinned = claude.launch(["claude"], "p")
    assert unpinned.session_id is None and "--session-id" not in unpinned.argv


def test_codex_argv_sandbox_and_resume() -> None:
    codex = get_kind("codex")
    new = codex.launch(["codex", "-m", "gpt-5"], "do it", git_dir="/w/demo.git")
    assert new.argv == [
        "codex",
        "exec",
        "-m",
        "gpt-5",
        "--json",
        "--sandbox",
        "workspace-write",
        "-c",
        'sandbox_workspace_write.writable_roots=["/w/demo.git"]',
        "--",
        "do it",
    ]
    assert new.session_id is None  # Codex tells it in thread.started
    resumed = codex.launch(["codex"], "go on", Session(resume=SID, new_id="ignored"))
    assert resumed.argv[-4:] == ["resume", SID, "--", "go on"]
    assert resumed.session_id == SID and resumed.resuming
    # The user's sandbox choice stands; the git dir is writable only in workspace-write.
    read_only = codex.launch(["codex", "--sandbox", "read-only"], "p", git_dir="/g")
    assert "workspace-write" not in read_only.argv and "-c" not in read_only.argv
    chosen = codex.launch(["codex", "-s", "workspace-write"], "p", git_dir="/g")
    assert chosen.argv.count("workspace-write") == 1 and "-c" in chosen.argv
    bypass = codex.launch(
        ["codex", "--dangerously-bypass-approvals-and-sandbox"], "p", git_dir="/g"
    )
    assert "--sandbox" not in bypass.argv and "-c" not in bypass.argv
    own_roots = codex.launch(
        ["codex", "-c", 'sandbox_workspace_write.writable_roots=["/x"]'], "p", git_dir="/g"
    )
    assert own_roots.argv.count("-c") == 1


def test_gemini_argv_env_and_resume() -> None:
    gemini = get_kind("gemini")
    new = gemini.launch(["gemini", "-m", "flash"], "-dash first")
    assert new.argv == [
        "gemini",
        "-m",
        "flash",
        "--output-format",
        "stream-json",
        "--prompt=-dash first",
    ]
    assert new.env == {"GEMINI_TRUST_WORKSPACE": "true"}
    resumed = gemini.launch(["gemini"], "go on", Session(resume=SID))
    assert resumed.argv[1:3] == ["--resume", SID] and resumed.resuming


def test_command_kind_runs_the_list_as_is() -> None:
    command = get_kind("command")
    launch = command.launch(["agent", "-p", "the prompt"], "ignored", Session(resume="x"))
    assert launch.argv == ["agent", "-p", "the prompt"]
    assert not launch.resuming and launch.session_id is None
    command.check_command(["claude", "-p", "{prompt}", "--verbose", "--resume", "x"])


# -- managed flags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "command", "flag"),
    [
        ("claude", ["claude", "-p", "{prompt}"], "-p"),
        ("claude", ["claude", "--verbose"], "--verbose"),
        ("claude", ["claude", "--output-format=json"], "--output-format"),
        ("claude", ["claude", "--resume", "x"], "--resume"),
        ("claude", ["claude", "--append-system-prompt", "do {prompt}"], "{prompt}"),
        ("codex", ["codex", "exec"], "exec"),
        ("codex", ["codex", "--json"], "--json"),
        ("codex", ["codex", "--last"], "--last"),
        ("gemini", ["gemini", "-p", "x"], "-p"),
        ("gemini", ["gemini", "-o", "json"], "-o"),
        ("gemini", ["gemini", "--resume=latest"], "--resume"),
    ],
)
def test_a_managed_flag_in_the_command_is_named(kind: str, command: list[str], flag: str) -> None:
    with pytest.raises(ManagedFlagError) as caught:
        get_kind(kind).check_command(command)
    assert caught.value.flag == flag and caught.value.kind == kind
    message = str(caught.value)
    assert repr(flag) in message and kind in message and "agent.command" in message


def test_the_program_itself_and_other_flags_are_the_users() -> None:
    get_kind("claude").check_command(
        [
            "/home/me/bin/claude",
            "--model",
            "opus",
            "--dangerously-skip-permissions",
            "--max-turns",
            "80",
            "--allowedTools",
            "Bash",
            "Edit",
        ]
    )
    get_kind("codex").check_command(["codex", "-m", "gpt-5", "-c", "model_reasoning_effort=high"])
    get_kind("gemini").check_command(["gemini", "--approval-mode", "yolo", "-m", "flash"])


def test_every_default_command_passes_its_own_check() -> None:
    assert set(KINDS) == {"command", "claude", "codex", "gemini"}
    for kind in KINDS.values():
        kind.check_command(list(kind.default_command))


def test_an_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(UnknownKindError) as caught:
        get_kind("cursor")
    assert "cursor" in str(caught.value) and "claude" in str(caught.value)


# -- kind command: today's rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdout", "code", "outcome", "reason"),
    [
        (["working", "All tests passed (3/3)!"], 0, Outcome.DONE, "exit 0"),
        (["working"], 3, Outcome.CRASHED, "exit 3"),
        ([], None, Outcome.CRASHED, "exit lost"),
        (["API Error: 529 Overloaded."], 1, Outcome.CRASHED, "exit 1"),  # rate: a crash
        (["Claude AI usage limit reached|1750000000"], 1, Outcome.USAGE_LIMITED, None),
        (["Claude AI usage limit reached|1750000000"], 0, Outcome.USAGE_LIMITED, None),
    ],
)
def test_command_kind_keeps_todays_rules(
    stdout: list[str], code: int | None, outcome: Outcome, reason: str | None
) -> None:
    _, verdict = judge_run("command", stdout, exit_code=code)
    assert verdict.outcome is outcome
    if reason is not None:
        assert verdict.reason == reason
    if outcome is Outcome.USAGE_LIMITED:
        assert verdict.reset_at == 1750000000.0
        assert verdict.line == "Claude AI usage limit reached|1750000000"


def test_command_kind_reads_limits_on_stderr_and_only_the_tail() -> None:
    _, verdict = judge_run(
        "command", ["x"], ["You've hit your limit · resets 11pm (UTC)"], exit_code=1
    )
    assert verdict.outcome is Outcome.USAGE_LIMITED
    early = ["Claude AI usage limit reached|1750000000", *("y" * 200 for _ in range(1000))]
    _, verdict = judge_run("command", early, exit_code=1, block_size=50)
    assert verdict.outcome is Outcome.CRASHED  # far back: says nothing about this exit


def test_command_kind_feeding_costs_nothing_per_line() -> None:
    reader = get_kind("command").reader(get_kind("command").launch(["a"], ""))
    block = b"\n".join(b"w1 l%09d " % i + b"x" * 85 for i in range(655))
    began = time.process_time()
    for _ in range(2000):  # 1.3 million lines
        reader.feed("stdout", block)
    assert time.process_time() - began < 1.0
    assert reader.verdict(0, NOW).outcome is Outcome.DONE


# -- reset times ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("or try again in 5 days 22 hours 11 minutes.", NOW + 5 * 86400 + 22 * 3600 + 660),
        ("try again in 2 hours", NOW + 7200),
        ("try again in 45 seconds", NOW + 45),
        ("try again at 11:16 PM.", datetime(2026, 5, 28, 23, 16, tzinfo=UTC)),
        ("try again at Jul 5th, 2026 8:19 PM.", datetime(2026, 7, 5, 20, 19, tzinfo=UTC)),
        ("try again after July 3, 2026 at 2:45 PM.", datetime(2026, 7, 3, 14, 45, tzinfo=UTC)),
        ("Access resets at 10:57 PM GMT-3.", datetime(2026, 5, 29, 1, 57, tzinfo=UTC)),
        ("Access resets at 10:57 PM UTC.", datetime(2026, 5, 28, 22, 57, tzinfo=UTC)),
        ("resets 5am (Europe/Berlin)", datetime(2026, 5, 29, 3, 0, tzinfo=UTC)),
        ("Claude AI usage limit reached|1750000000", 1750000000.0),
        ("You have exhausted your daily quota on this model.", None),
    ],
)
def test_reset_times_in_the_clis_wordings(text: str, expected: datetime | float | None) -> None:
    want = expected.timestamp() if isinstance(expected, datetime) else expected
    assert reset_time(text, NOW, UTC) == want


# -- verdict + milestone -> what the policy is told ----------------------------------------------


def _plan(kind: str, outcome: Outcome, milestone: bool = False, reset: float | None = None):
    verdict = Verdict(outcome, "why", reset_at=reset)
    return plan_next(get_kind(kind), verdict, new_milestones=milestone, session_id=SID)


def test_a_new_milestone_wins_with_a_fresh_session_and_the_resume_prompt() -> None:
    for outcome in (Outcome.DONE, Outcome.CRASHED, Outcome.RATE_LIMITED, Outcome.FAILED):
        step = _plan("claude", outcome, milestone=True)
        assert step.outcome is policy.Outcome.MILESTONE
        assert step.session == Session() and step.prompt == "resume"
    held = _plan("claude", Outcome.USAGE_LIMITED, milestone=True, reset=NOW + 60)
    assert held.outcome is policy.Outcome.USAGE_LIMIT and held.reset_at == NOW + 60
    assert held.session == Session() and held.prompt == "resume"


def test_crashes_and_limits_continue_the_same_session() -> None:
    for outcome, told in [
        (Outcome.CRASHED, policy.Outcome.CRASH),
        (Outcome.RATE_LIMITED, policy.Outcome.CRASH),
        (Outcome.USAGE_LIMITED, policy.Outcome.USAGE_LIMIT),
    ]:
        step = _plan("codex", outcome, reset=NOW + 5)
        assert step.outcome is told
        assert step.session == Session(resume=SID) and step.prompt == "continue"
    assert _plan("codex", Outcome.USAGE_LIMITED, reset=NOW + 5).reset_at == NOW + 5


def test_done_failed_and_refused() -> None:
    assert _plan("gemini", Outcome.DONE).outcome is policy.Outcome.DONE
    failed = _plan("gemini", Outcome.FAILED)
    assert failed.outcome is None and failed.give_up == "why"
    refused = _plan("claude", Outcome.RESUME_REFUSED)
    assert refused.outcome is None and refused.restart_now
    assert refused.session == Session() and refused.prompt == "continue"


def test_command_kind_and_unknown_sessions_restart_as_today() -> None:
    step = _plan("command", Outcome.CRASHED)
    assert step.outcome is policy.Outcome.CRASH and step.prompt == "auto"
    assert step.session == Session()
    no_id = plan_next(
        get_kind("claude"), Verdict(Outcome.CRASHED, "x"), new_milestones=False, session_id=None
    )
    assert no_id.session == Session() and no_id.prompt == "auto"
