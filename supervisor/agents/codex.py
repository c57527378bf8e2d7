"""OpenAI Codex CLI: ``codex exec --json`` and ``codex exec resume ID``.

What this relies on (late 2026):

* ``codex exec --json`` prints JSONL events: ``thread.started`` (``thread_id``: the session id
  to resume), ``turn.started``, ``item.started`` / ``item.updated`` / ``item.completed``
  (items ``agent_message``, ``reasoning``, ``command_execution``, ``file_change``,
  ``mcp_tool_call``, ``web_search``, ``todo_list``, ``error``), ``turn.completed`` with
  ``usage`` (``input_tokens``, ``cached_input_tokens``, ``output_tokens``), ``turn.failed``
  with ``error.message``, and top-level ``error`` with ``message``
  (https://developers.openai.com/codex/noninteractive, openai/codex#4177, #4478,
  https://docs.rs/codex-client-sdk/latest/codex/events/index.html).  ``--experimental-json``
  is an alias of ``--json`` (codex-rs/exec/src/cli.rs).
* No cost in USD is reported; tokens are, per turn.
* A turn can fail while ``codex exec`` exits 0 (wzj998/ChatCCC#363): ``turn.failed`` decides,
  not the exit code.  Transient ``error`` events saying ``Reconnecting...`` are retries in
  progress, not failures (career-ops-hq/career-ops#2102).
* A usage limit is text only, no typed code (openai/codex#37676): ``You've hit your usage
  limit. Upgrade to Pro (...) or try again in 5 days 22 hours 11 minutes.`` (#3899, #3124),
  ``... or try again at Jul 5th, 2026 8:19 PM.`` (#26668), ``You have reached your usage
  limit. ... try again after July 3, 2026 at 2:45 PM.`` (#30206).
* ``codex exec resume SESSION_ID PROMPT`` continues a session; options such as ``--sandbox``
  and ``-c`` belong before ``resume`` (only ``--json``, ``--model`` and a few are global:
  codex-rs/exec/src/cli.rs).  A session it cannot load ends with ``Error: thread/resume:
  thread/resume failed: no rollout found for thread id ID`` on stderr and exit 1
  (RunMaestro/Maestro#1043, vm0-ai/vm0#16125); older builds said ``state db missing rollout
  path`` (openai/codex#11634).
* The default sandbox of ``codex exec`` is read-only: ``--sandbox workspace-write`` lets it
  edit (``--full-auto`` is deprecated).  In a linked git worktree the git metadata lives in
  the bare clone, outside the workspace, and ``git commit`` fails on ``index.lock`` unless
  that directory is a writable root: ``-c sandbox_workspace_write.writable_roots=[...]``
  (sipyourdrink-ltd/bernstein#5375, agent-tools-org/ai-dispatch#115, openai/codex-plugin-cc#765).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import ClassVar

from supervisor.agents.base import (
    Event,
    ResultInfo,
    RunFacts,
    Session,
)
from supervisor.agents.stream import (
    StreamKind,
    StreamRules,
    text_of,
)

SANDBOX_FLAGS = ("--sandbox", "-s", "--dangerously-bypass-approvals-and-sandbox", "--full-auto")
WRITABLE_ROOTS = "sandbox_workspace_write.writable_roots"


def _thread_started(facts: RunFacts, event: Event, line: str) -> None:
    facts.session_id = text_of(event.get("thread_id")) or facts.session_id


def _turn_completed(facts: RunFacts, event: Event, line: str) -> None:
    usage = event.get("usage")
    if isinstance(usage, dict):
        facts.tokens.add(
            input=usage.get("input_tokens"),
            cache_read=usage.get("cached_input_tokens"),
            output=usage.get("output_tokens"),
        )
    facts.turns = (facts.turns or 0) + 1
    facts.result = ResultInfo(ok=True, subtype="turn.completed", text=facts.last_text or "")


def _turn_failed(facts: RunFacts, event: Event, line: str) -> None:
    error = event.get("error")
    message = text_of(error.get("message")) if isinstance(error, dict) else ""
    facts.note_error(message)
    facts.turns = (facts.turns or 0) + 1
    facts.result = ResultInfo(ok=False, subtype="turn.failed", text=message or "turn failed")


def _error(facts: RunFacts, event: Event, line: str) -> None:
    message = text_of(event.get("message"))
    if not message.startswith("Reconnecting"):
        facts.note_error(message)


def _item_completed(facts: RunFacts, event: Event, line: str) -> None:
    item = event.get("item")
    if isinstance(item, dict) and item.get("type") == "agent_message":
        text = text_of(item.get("text"))
        if text.strip():
            facts.last_text = text


def _writable_sandbox(args: Sequence[str]) -> bool | None:
    """Whether ``args`` choose the workspace-write sandbox (``None``: they choose none)."""
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in SANDBOX_FLAGS:
            if name in ("--sandbox", "-s"):
                value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
                return value == "workspace-write"
            return False
    return None


class CodexKind(StreamKind):
    """``codex exec --json`` in the workspace-write sandbox, resumed with ``exec resume``."""

    name = "codex"
    default_command = ("codex",)
    managed_flags: ClassVar[dict[str, str]] = {
        "exec": "the subcommand",
        "e": "the subcommand",
        "resume": "the fleet resumes sessions",
        "--last": "the fleet resumes sessions by id",
        "review": "the subcommand is exec",
        "--json": "JSONL events",
        "--experimental-json": "JSONL events",
    }
    rules = StreamRules(
        handlers={
            "thread.started": _thread_started,
            "turn.completed": _turn_completed,
            "turn.failed": _turn_failed,
            "error": _error,
            "item.completed": _item_completed,
        },
        resume_refused=re.compile(
            r"no rollout found for thread|missing rollout path|thread/resume failed"
            r"|No saved session found",
            re.IGNORECASE,
        ),
        usage=(
            r"\bYou(?:'|’)ve reached your usage limit\b",
            r"\bYou have reached your usage limit\b",
            r"\busage limit has been reached\b",
            r"\busage_limit_reached\b",
        ),
        rate=(
            r"\b429 Too Many Requests\b",
            r"\bToo Many Requests\b",
            r"\bserverOverloaded\b",
            r"\brate limit (?:reached|exceeded)\b",
        ),
    )

    def argv(
        self, command: Sequence[str], prompt: str, session: Session, git_dir: str | None
    ) -> list[str]:
        program, *options = command
        argv = [program, "exec", *options, "--json"]
        writable = _writable_sandbox(options)
        if writable is None:
            argv += ["--sandbox", "workspace-write"]
            writable = True
        if writable and git_dir and not any(WRITABLE_ROOTS in arg for arg in options):
            argv += ["-c", f"{WRITABLE_ROOTS}={json.dumps([git_dir])}"]
        if session.resume is not None:
            argv += ["resume", session.resume]
        return [*argv, "--", prompt]
