"""Claude Code in print mode: ``claude -p --output-format stream-json --verbose``.

What this relies on (checked against the docs and issue threads, late 2026):

* ``--output-format stream-json`` under ``-p`` needs ``--verbose``, else ``Error: When using
  --print, --output-format=stream-json requires --verbose`` and exit 1 (nullclaw/nullclaw#125,
  fullsend-ai/fullsend#306, RightNow-AI/openfang#305).
* Events, one JSON object a line: ``system``/``init`` (``session_id``, ``cwd``, ``model``,
  ``tools``), ``assistant``/``user`` messages (text, ``tool_use``, ``tool_result`` blocks),
  ``system``/``compact_boundary`` (``compact_metadata.trigger`` auto | manual), and
  ``result`` last: ``subtype`` success | error_max_turns | error_during_execution |
  error_max_budget_usd | error_max_structured_output_retries, ``is_error``, ``result`` (the
  final text, or the error message), ``errors`` (for error subtypes), ``session_id``,
  ``total_cost_usd`` (not ``cost_usd``), ``usage`` (input_tokens, output_tokens,
  cache_creation_input_tokens, cache_read_input_tokens), ``num_turns``, ``duration_ms``,
  ``api_error_status`` (https://code.claude.com/docs/en/headless,
  https://docs.rs/claude-code-agent/0.6.0/claude_code_agent/protocol/struct.ResultMessage.html,
  anthropics/claude-code#38673 for a full stream).
* Never one signal alone: an API error (rate limit, 403 ...) arrives as ``subtype:
  "success"``, ``is_error: true`` with exit 0, preceded by a synthetic assistant message with
  ``is_api_error_message: true`` (anthropics/claude-code#79500); the budget limit comes as
  ``error_max_budget_usd`` with ``is_error: true`` and exit 1 (ironflow-core's replayed CLI
  fixtures); a usage limit can end with exit 1 and no result at all (slopus/happy#465).
* ``rate_limit_event``: ``rate_limit_info.status`` allowed | allowed_warning | rejected,
  ``resetsAt`` (epoch seconds), ``rateLimitType`` five_hour | seven_day | overage ...
  (devblazer/dodona#32, handarbeit/fabrik#1815).  ``overageStatus: "rejected"`` beside
  ``status: "allowed"`` only says extra usage is unavailable and is no hit
  (anthropics/claude-code#38673, alpha-omega-security/scrutineer#551, shabaraba/vibing.nvim#533);
  it is one when the account is drawing on overage (``isUsingOverage: true``).  A
  ``rate_limit_event`` has been written into the middle of another line (#49640): the reader
  salvages it from the malformed line.
* Sessions: ``--session-id UUID`` pins a new session's id; ``--resume ID`` looks only in the
  project directory of the *current working directory* and otherwise prints ``No conversation
  found with session ID: ID`` (on stderr, exit 1; newer versions also as an
  ``error_during_execution`` result with that text in ``errors``) -- anthropics/claude-code#58591,
  #68525, #27883, #40609, #77732.  ``--session-id`` together with ``--resume`` is refused
  without ``--fork-session`` (#24934).  A resumed session may report a new ``session_id``
  (#3510): the id is re-read from ``init`` and ``result``.

Worktree trust (Agentize's ``wt spawn`` pre-trusts the worktree in ``~/.claude.json``): print
mode never shows the trust dialog, so a headless run is not blocked; see :mod:`.trust` for
what trust still changes and what the fleet does about it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

from supervisor.agents.base import (
    Event,
    RateLimitInfo,
    ResultInfo,
    RunFacts,
    Session,
    Tokens,
)
from supervisor.agents.stream import (
    StreamKind,
    StreamRules,
    int_of,
    number_of,
    text_of,
)

#: Result subtypes that end a run on a limit: retrying as is cannot help.
LIMIT_SUBTYPES = {
    "error_max_turns": "turn limit reached (error_max_turns)",
    "error_max_budget_usd": "budget limit reached (error_max_budget_usd)",
    "error_max_structured_output_retries": "structured output retries exhausted",
}


def _system(facts: RunFacts, event: Event, line: str) -> None:
    subtype = event.get("subtype")
    if subtype == "init":
        facts.session_id = text_of(event.get("session_id")) or facts.session_id
        facts.model = text_of(event.get("model")) or facts.model
    elif subtype == "compact_boundary":
        facts.compactions += 1


def _assistant(facts: RunFacts, event: Event, line: str) -> None:
    texts = message_texts(event)
    if not texts:
        return
    text = "\n".join(texts)
    if event.get("is_api_error_message") is True:
        facts.note_error(text)
    else:
        facts.last_text = text


def _result(facts: RunFacts, event: Event, line: str) -> None:
    subtype = text_of(event.get("subtype")) or "?"
    is_error = event.get("is_error") is True
    errors = event.get("errors")
    messages = [text_of(e) or str(e) for e in errors] if isinstance(errors, list) else []
    for message in messages:
        facts.note_error(message)
    text = text_of(event.get("result")) or "; ".join(messages)
    turns = int_of(event.get("num_turns"))
    limit = LIMIT_SUBTYPES.get(subtype)
    if limit is not None and turns is not None:
        limit = f"{limit} after {turns} turns"
    ok = subtype == "success" and not is_error
    if not ok and text:
        facts.note_error(text)
    facts.result = ResultInfo(
        ok=ok,
        subtype=subtype,
        text=text,
        limit=limit,
        api_status=int_of(event.get("api_error_status")),
    )
    facts.session_id = text_of(event.get("session_id")) or facts.session_id
    facts.cost_usd = number_of(event.get("total_cost_usd"))
    facts.turns = turns
    facts.duration_ms = int_of(event.get("duration_ms"))
    usage = event.get("usage")
    if isinstance(usage, dict):
        tokens = Tokens()
        tokens.add(
            input=usage.get("input_tokens"),
            output=usage.get("output_tokens"),
            cache_read=usage.get("cache_read_input_tokens"),
            cache_creation=usage.get("cache_creation_input_tokens"),
        )
        facts.tokens = tokens


def _rate_limit(facts: RunFacts, event: Event, line: str) -> None:
    info = event.get("rate_limit_info")
    if not isinstance(info, dict):
        return
    status = text_of(info.get("status")) or "?"
    resets = number_of(info.get("resetsAt"))
    window = text_of(info.get("rateLimitType")) or None
    if (
        status != "rejected"
        and info.get("isUsingOverage") is True
        and (info.get("overageStatus") == "rejected")
    ):
        status, window = "rejected", "overage"
        resets = number_of(info.get("overageResetsAt")) or resets
    facts.note_rate_limit(RateLimitInfo(status, resets, window, line.strip()))


def message_texts(event: Event) -> list[str]:
    """The text blocks of an ``assistant``/``user`` event's message (shared with rendering)."""
    message = event.get("message")
    content: Any = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return [content] if content.strip() else []
    if not isinstance(content, list):
        return []
    return [
        block["text"]
        for block in content
        if isinstance(block, dict)
        and block.get("type") == "text"
        and isinstance(block.get("text"), str)
        and block["text"].strip()
    ]


class ClaudeKind(StreamKind):
    """``claude -p`` with stream-JSON output, sessions pinned and resumed by id."""

    name = "claude"
    default_command = ("claude", "--dangerously-skip-permissions")
    pins_session_ids = True
    managed_flags: ClassVar[dict[str, str]] = {
        "-p": "print mode",
        "--print": "print mode",
        "--output-format": "stream-json",
        "--input-format": "the prompt is an argument",
        "--verbose": "stream-json needs it",
        "--session-id": "the fleet pins session ids",
        "--resume": "the fleet resumes sessions",
        "-r": "the fleet resumes sessions",
        "--continue": "the fleet resumes sessions by id",
        "-c": "the fleet resumes sessions by id",
        "--fork-session": "the fleet resumes sessions by id",
    }
    rules = StreamRules(
        handlers={
            "system": _system,
            "assistant": _assistant,
            "result": _result,
            "rate_limit_event": _rate_limit,
        },
        resume_refused=re.compile(r"No conversation found (?:with session ID|to continue)"),
        salvage=(b'{"type":"rate_limit_event"', b'{"type": "rate_limit_event"'),
    )

    def argv(
        self, command: Sequence[str], prompt: str, session: Session, git_dir: str | None
    ) -> list[str]:
        argv = [*command, "-p", "--output-format", "stream-json", "--verbose"]
        if session.resume is not None:
            argv += ["--resume", session.resume]
        elif session.new_id is not None:
            argv += ["--session-id", session.new_id]
        # The prompt after "--": neither a leading "-" nor a variadic option of the user's
        # (--allowedTools A B) can swallow it.
        return [*argv, "--", prompt]
