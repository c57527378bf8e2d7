"""render_line: the three protocols' events as people read them, from the line alone; and the
worktree-trust entry of Claude Code's config."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from supervisor.agents.render import render_line, tool_line
from supervisor.agents.trust import claude_config_path, trusted_claude_config
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
    line,
)

TREE = "/home/u/fleet/demo.git/trees/issue-7"


@pytest.mark.parametrize(
    ("event", "shown"),
    [
        (claude_init(), f"● session {SID} (claude-opus-4-6)"),
        (claude_text("  I'll start with the tests.\n"), "I'll start with the tests."),
        (claude_tool("Bash", {"command": "git status"}), "Bash: git status"),
        (
            claude_tool("Edit", {"file_path": f"{TREE}/src/x.py", "old_string": "a"}),
            "Edit: src/x.py",
        ),
        (claude_tool("Read", {"file_path": "/etc/hosts"}), "Read: /etc/hosts"),
        (
            claude_tool("TodoWrite", {"todos": [{"content": "a"}, {"content": "b"}]}),
            "Todo: 2 items",
        ),
        (claude_tool("mcp__github__create_pr", {"title": "Fix"}), "mcp__github__create_pr: Fix"),
        (
            claude_tool("Grep", {"pattern": "def main"}, text="Searching."),
            "Searching.\nGrep: def main",
        ),
        (claude_tool_result("ok"), None),
        (
            claude_tool_result("Error: no such file\nat line 2", is_error=True),
            "  ✗ Error: no such file …",
        ),
        (claude_result(), "✓ done · 12 turns · $0.4213 · 2m05s"),
        (
            claude_result(
                is_error=True,
                result="API Error: Rate limit reached",
                turns=1,
                cost=1.5,
                duration_ms=3000,
            ),
            "✗ error: API Error: Rate limit reached · 1 turn · $1.50 · 3s",
        ),
        (
            claude_result(
                subtype="error_max_turns", is_error=True, result=None, errors=["max turns"]
            ),
            "✗ error_max_turns: max turns · 12 turns · $0.4213 · 2m05s",
        ),
        (claude_rate("allowed", NOW), None),
        (
            claude_rate("rejected", NOW, "seven_day"),
            "⛔ usage limit reached (seven_day), resets 2026-05-28 20:26 UTC",
        ),
        (
            claude_rate("allowed_warning", NOW, utilization=0.8),
            "⚠ nearing the usage limit (five_hour) 80% used, resets 2026-05-28 20:26 UTC",
        ),
        (claude_compact(), "⋯ context compacted (auto, 156.6k tokens before)"),
        (line(type="stream_event", event={"type": "content_block_delta"}), None),
        (
            claude_text("You've hit your limit", is_api_error_message=True),
            "✗ You've hit your limit",
        ),
    ],
)
def test_claude_events(event: str, shown: str | None) -> None:
    assert render_line(event) == shown


@pytest.mark.parametrize(
    ("event", "shown"),
    [
        (codex_thread(), f"● session {SID}"),
        ('{"type":"turn.started"}', None),
        (
            codex_item(
                "started",
                type="command_execution",
                command="bash -lc 'pytest -q'",
                status="in_progress",
            ),
            "Bash: pytest -q",
        ),
        (
            codex_item("started", type="command_execution", command=["bash", "-lc", "ls"]),
            "Bash: ls",
        ),
        (
            codex_item("completed", type="command_execution", command="false", exit_code=1),
            "  ✗ exit 1",
        ),
        (codex_item("completed", type="command_execution", command="true", exit_code=0), None),
        (codex_item("completed", type="agent_message", text="Done.\n"), "Done."),
        (codex_item("completed", type="reasoning", text="thinking"), None),
        (
            codex_item(
                "completed",
                type="file_change",
                changes=[
                    {"path": f"{TREE}/a.py", "kind": "update"},
                    {"path": f"{TREE}/b/c.py", "kind": "add"},
                ],
            ),
            "Edit: a.py, b/c.py",
        ),
        (
            codex_item("started", type="mcp_tool_call", server="gh", tool="pr", arguments={}),
            "gh.pr",
        ),
        (codex_item("updated", type="todo_list", items=[]), None),
        (codex_turn_completed(), "· turn completed · 24.8k in / 122 out tokens"),
        (codex_turn_failed("model at capacity"), "✗ turn failed: model at capacity"),
        (codex_error("Reconnecting... 1/5"), "⚠ Reconnecting... 1/5"),
        (codex_error("fatal"), "✗ fatal"),
    ],
)
def test_codex_events(event: str, shown: str | None) -> None:
    assert render_line(event) == shown


@pytest.mark.parametrize(
    ("event", "shown"),
    [
        (gemini_init(), f"● session {SID} (gemini-2.5-pro)"),
        (gemini_message("user", "do it"), None),
        (gemini_message("assistant", "Let me ", delta=True), "Let me "),
        (gemini_message("assistant", " Whole message. "), "Whole message."),
        (gemini_tool_use("run_shell_command", {"command": "npm test"}), "Bash: npm test"),
        (gemini_tool_use("replace", {"file_path": f"{TREE}/src/x.ts"}), "Edit: src/x.ts"),
        (gemini_tool_use("read_many_files", {"paths": ["a", "b"]}), "Read: a, b"),
        (gemini_tool_result(), None),
        (gemini_tool_result("error", "File not found"), "  ✗ File not found"),
        (gemini_error("Loop detected", severity="warning"), "⚠ Loop detected"),
        (gemini_error("boom"), "✗ boom"),
        (gemini_result(), "✓ done · 2 tool calls · 1200 in / 300 out tokens · 20s"),
        (
            gemini_result("error", "quota"),
            "✗ error: quota · 2 tool calls · 1200 in / 300 out tokens · 20s",
        ),
    ],
)
def test_gemini_events(event: str, shown: str | None) -> None:
    assert render_line(event) == shown


@pytest.mark.parametrize(
    "text",
    [
        "plain agent output",
        "",
        "{not json",
        "[1,2]",
        '{"level":"info","msg":"a program printing its own JSON"}',
        '{"type":"something.new","x":1}',
    ],
)
def test_anything_else_comes_back_unchanged(text: str) -> None:
    assert render_line(text) == text


def test_long_arguments_are_cut_to_one_short_line() -> None:
    shown = render_line(claude_tool("Bash", {"command": "x" * 500 + "\nsecond"}))
    assert shown is not None and len(shown) <= len("Bash: ") + 100
    assert shown.endswith("…") and "\n" not in shown
    assert tool_line("Unknown", None) == "Unknown"
    assert tool_line("Unknown", {"n": 3, "s": "text"}) == "Unknown: text"


def _mangle(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        return {k: _mangle(v, rng) for k, v in value.items()}
    if isinstance(value, list):
        return [_mangle(v, rng) for v in value]
    return rng.choice([value, value, None, 7, "s", [], {}, True, 1.5])


def test_never_raises_on_odd_shapes() -> None:
    rng = random.Random(1)
    events = [
        claude_init(),
        claude_tool("Edit", {"file_path": "x"}),
        claude_result(),
        claude_rate("rejected", NOW),
        claude_compact(),
        claude_tool_result("e", True),
        codex_item("completed", type="file_change", changes=[{"path": "a"}]),
        codex_turn_completed(),
        gemini_result(),
        gemini_tool_use("glob", {"pattern": "*"}),
    ]
    for _ in range(300):
        event = json.loads(rng.choice(events))
        mangled = {"type": event["type"], **_mangle(event, rng)}
        mangled["type"] = event["type"]
        shown = render_line(json.dumps(mangled))
        assert shown is None or isinstance(shown, str)


# -- worktree trust ------------------------------------------------------------------------------


def test_trust_entry_is_added_merged_and_not_rewritten() -> None:
    config = {"numStartups": 3, "projects": {"/other": {"hasTrustDialogAccepted": True}}}
    added = trusted_claude_config(json.dumps(config), TREE)
    assert added is not None
    new = json.loads(added)
    assert new["numStartups"] == 3 and "/other" in new["projects"]
    assert new["projects"][TREE] == {"allowedTools": [], "hasTrustDialogAccepted": True}
    assert trusted_claude_config(added, TREE) is None  # already trusted: nothing to write

    existing = {
        "projects": {
            TREE: {"allowedTools": ["Bash"], "hasTrustDialogAccepted": False, "lastCost": 1.2}
        }
    }
    merged = json.loads(trusted_claude_config(json.dumps(existing), TREE) or "{}")
    assert merged["projects"][TREE] == {
        "allowedTools": ["Bash"],
        "hasTrustDialogAccepted": True,
        "lastCost": 1.2,
    }
    fresh = json.loads(trusted_claude_config("{}", TREE) or "{}")
    assert fresh == {"projects": {TREE: {"allowedTools": [], "hasTrustDialogAccepted": True}}}


@pytest.mark.parametrize("text", [None, "", "{half", "[]", '{"projects": []}'])
def test_trust_never_replaces_what_it_cannot_read(text: str | None) -> None:
    assert trusted_claude_config(text, TREE) is None


def test_claude_config_path() -> None:
    assert claude_config_path("/home/u", {}) == "/home/u/.claude.json"
    assert claude_config_path("/home/u", {"CLAUDE_CONFIG_DIR": "/acct2"}) == "/acct2/.claude.json"
