"""Events of the three agent protocols, built from their documented formats, for the tests of
``supervisor/agents`` (the sources are cited in each kind's module docstring), and a helper
that runs lines through a kind's reader the way the worker's pump would."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC
from typing import Any

from supervisor.agents import Session, Verdict, get_kind
from supervisor.agents.base import NEW_SESSION, RunFacts

NOW = 1_780_000_000.0  # 2026-05-28T20:26:40Z
SID = "3f2c9d0e-1b7a-4c55-9e61-0a4b8f2d7c11"


def line(**event: Any) -> str:
    return json.dumps(event, separators=(",", ":"))


# -- Claude Code ---------------------------------------------------------------------------------


def claude_init(session_id: str = SID, cwd: str = "/w/demo.git/trees/issue-7") -> str:
    return line(
        type="system",
        subtype="init",
        cwd=cwd,
        session_id=session_id,
        tools=["Bash", "Edit", "Read"],
        mcp_servers=[],
        model="claude-opus-4-6",
        permissionMode="bypassPermissions",
        apiKeySource="none",
    )


def claude_text(text: str, **extra: Any) -> str:
    return line(
        type="assistant",
        message={
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-opus-4-6",
            "content": [{"type": "text", "text": text}],
        },
        session_id=SID,
        **extra,
    )


def claude_tool(name: str, arguments: dict[str, Any], text: str | None = None) -> str:
    content: list[dict[str, Any]] = [] if text is None else [{"type": "text", "text": text}]
    content.append({"type": "tool_use", "id": "toolu_1", "name": name, "input": arguments})
    return line(type="assistant", message={"role": "assistant", "content": content}, session_id=SID)


def claude_tool_result(content: str, is_error: bool = False) -> str:
    return line(
        type="user",
        message={
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": content,
                    "is_error": is_error,
                }
            ],
        },
        session_id=SID,
    )


def claude_result(
    subtype: str = "success",
    is_error: bool = False,
    result: str | None = "All tests passed (3/3)!",
    cost: float = 0.4213,
    turns: int = 12,
    session_id: str = SID,
    **extra: Any,
) -> str:
    event: dict[str, Any] = dict(
        type="result",
        subtype=subtype,
        is_error=is_error,
        duration_ms=125_000,
        duration_api_ms=98_000,
        num_turns=turns,
        session_id=session_id,
        total_cost_usd=cost,
        usage={
            "input_tokens": 1200,
            "output_tokens": 3400,
            "cache_creation_input_tokens": 2783,
            "cache_read_input_tokens": 14707,
        },
    )
    if result is not None:
        event["result"] = result
    event.update(extra)
    return line(**event)


def claude_rate(status: str, resets: float, window: str = "five_hour", **extra: Any) -> str:
    info = {"status": status, "resetsAt": int(resets), "rateLimitType": window, **extra}
    return line(type="rate_limit_event", rate_limit_info=info, session_id=SID)


def claude_compact(trigger: str = "auto", pre_tokens: int = 156_594) -> str:
    return line(
        type="system",
        subtype="compact_boundary",
        session_id=SID,
        compact_metadata={"trigger": trigger, "pre_tokens": pre_tokens},
    )


# -- Codex ---------------------------------------------------------------------------------------


def codex_thread(thread_id: str = SID) -> str:
    return line(type="thread.started", thread_id=thread_id)


def codex_item(stage: str, **item: Any) -> str:
    return line(type=f"item.{stage}", item={"id": "item_1", **item})


def codex_turn_completed(inp: int = 24_763, cached: int = 24_448, out: int = 122) -> str:
    return line(
        type="turn.completed",
        usage={"input_tokens": inp, "cached_input_tokens": cached, "output_tokens": out},
    )


def codex_turn_failed(message: str) -> str:
    return line(type="turn.failed", error={"message": message})


def codex_error(message: str) -> str:
    return line(type="error", message=message)


# -- Gemini --------------------------------------------------------------------------------------


def gemini_init(session_id: str = SID) -> str:
    return line(
        type="init",
        timestamp="2026-05-28T20:26:40.000Z",
        session_id=session_id,
        model="gemini-2.5-pro",
    )


def gemini_message(role: str, content: str, delta: bool = False) -> str:
    event: dict[str, Any] = dict(
        type="message", timestamp="2026-05-28T20:26:41.000Z", role=role, content=content
    )
    if delta:
        event["delta"] = True
    return line(**event)


def gemini_tool_use(name: str, parameters: dict[str, Any]) -> str:
    return line(
        type="tool_use",
        timestamp="2026-05-28T20:26:42.000Z",
        tool_name=name,
        tool_id="t1",
        parameters=parameters,
    )


def gemini_tool_result(status: str = "success", message: str = "") -> str:
    event: dict[str, Any] = dict(
        type="tool_result", timestamp="2026-05-28T20:26:43.000Z", tool_id="t1", status=status
    )
    if status == "error":
        event["error"] = {"type": "tool_error", "message": message}
    else:
        event["output"] = "ok"
    return line(**event)


def gemini_error(message: str, severity: str = "error") -> str:
    return line(
        type="error", timestamp="2026-05-28T20:26:44.000Z", severity=severity, message=message
    )


def gemini_result(status: str = "success", message: str = "", **stats: int) -> str:
    event: dict[str, Any] = dict(type="result", timestamp="2026-05-28T20:27:00.000Z", status=status)
    if status != "success":
        event["error"] = {"type": "FatalError", "message": message}
    event["stats"] = {
        "total_tokens": 1500,
        "input_tokens": 1200,
        "output_tokens": 300,
        "cached": 800,
        "input": 400,
        "duration_ms": 20_000,
        "tool_calls": 2,
        **stats,
    }
    return line(**event)


# -- running lines through a reader --------------------------------------------------------------


def blocks(lines: Sequence[str | bytes], size: int) -> Iterable[bytes]:
    """``lines`` as the worker's pump hands them over: blocks of ``size`` lines joined by
    newlines, without the last newline."""
    raw = [item if isinstance(item, bytes) else item.encode() for item in lines]
    for start in range(0, len(raw), size):
        yield b"\n".join(raw[start : start + size])


def judge_run(
    kind: str,
    stdout: Sequence[str | bytes],
    stderr: Sequence[str | bytes] = (),
    exit_code: int | None = 0,
    session: Session = NEW_SESSION,
    now: float = NOW,
    block_size: int = 3,
) -> tuple[RunFacts, Verdict]:
    """Feed a run's output to a fresh reader of ``kind`` and judge it (times in UTC)."""
    agent = get_kind(kind)
    reader = agent.reader(agent.launch([kind], "do it", session), tz=UTC)
    for block in blocks(stdout, block_size):
        reader.feed("stdout", block)
    for block in blocks(stderr, block_size):
        reader.feed("stderr", block)
    verdict = reader.verdict(exit_code, now)
    return reader.facts, verdict
