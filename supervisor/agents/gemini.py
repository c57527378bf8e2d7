"""Google Gemini CLI headless: ``gemini --output-format stream-json --prompt=PROMPT``.

What this relies on (late 2026):

* ``--output-format stream-json`` prints JSONL events (packages/core/src/output/types.ts of
  google-gemini/gemini-cli; https://geminicli.com/docs/cli/headless/): ``init``
  (``session_id``, ``model``), ``message`` (``role`` user | assistant, ``content``, ``delta:
  true`` for incremental assistant chunks), ``tool_use`` (``tool_name``, ``tool_id``,
  ``parameters``), ``tool_result`` (``tool_id``, ``status`` success | error, ``output``,
  ``error``), ``error`` (``severity`` warning | error, ``message``: non-fatal), ``result``
  (``status`` success | error, ``error`` {type, message}, ``stats`` {total_tokens,
  input_tokens, output_tokens, cached, input, duration_ms, tool_calls}).  No cost in USD.
* Exit codes in headless mode (docs/cli/headless.md): 0 success, 1 general error, 41
  authentication, 42 input error, 52 configuration, 53 turn limit exceeded
  (``maxSessionTurns``), 54 fatal tool execution error, 130 cancelled.
* Sessions are per project directory; ``--resume ID`` (or ``latest``, or an index) continues
  one, ``-r ID "query"`` gives it a new prompt (docs/cli/session-management.md,
  docs/cli/cli-reference.md).  An unknown id: ``Error resuming session: Invalid session
  identifier "ID". Searched for sessions in ...`` (google-gemini/gemini-cli#24808), a project
  without sessions: ``No previous sessions found for this project`` (#14941).
* Usage limits: ``TerminalQuotaError: You have exhausted your daily quota on this model.``
  (exit 1 in ``-p`` mode, no fallback model: #26840, #18050), ``Usage limit reached for
  gemini-3-flash-preview. Access resets at 10:57 PM GMT-3.`` (#22643); a 429
  ``RESOURCE_EXHAUSTED`` is retried with backoff (#6962).
* Trusted folders: with ``security.folderTrust`` enabled, an untrusted folder in headless mode
  ends with ``FatalUntrustedWorkspaceError``; ``GEMINI_TRUST_WORKSPACE=true`` (or
  ``--skip-trust``) trusts the workspace for the session (docs/cli/trusted-folders.md).  The
  fleet sets the variable: a new worktree is never in ``~/.gemini/trustedFolders.json``, and
  an untrusted folder also disables tool auto-acceptance.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from supervisor.agents.base import (
    Event,
    Outcome,
    ResultInfo,
    RunFacts,
    Session,
    Tokens,
)
from supervisor.agents.stream import (
    StreamKind,
    StreamRules,
    int_of,
    text_of,
)

TRUST_ENV = "GEMINI_TRUST_WORKSPACE"


def _init(facts: RunFacts, event: Event, line: str) -> None:
    facts.session_id = text_of(event.get("session_id")) or facts.session_id
    facts.model = text_of(event.get("model")) or facts.model


def _message(facts: RunFacts, event: Event, line: str) -> None:
    if event.get("role") != "assistant":
        return
    content = text_of(event.get("content"))
    delta = event.get("delta") is True
    if delta and facts.text_open and facts.last_text is not None:
        facts.last_text += content
    elif content:
        facts.last_text = content
    facts.text_open = delta


def _other(facts: RunFacts, event: Event, line: str) -> None:
    facts.text_open = False  # a tool call ends the assistant's message of deltas


def _error(facts: RunFacts, event: Event, line: str) -> None:
    facts.text_open = False
    if event.get("severity") != "warning":
        facts.note_error(text_of(event.get("message")))


def _result(facts: RunFacts, event: Event, line: str) -> None:
    status = text_of(event.get("status")) or "?"
    error = event.get("error")
    message = text_of(error.get("message")) if isinstance(error, dict) else ""
    ok = status == "success"
    if not ok:
        facts.note_error(message)
    facts.result = ResultInfo(ok=ok, subtype=status, text=message or facts.last_text or "")
    stats = event.get("stats")
    if isinstance(stats, dict):
        tokens = Tokens()
        tokens.add(
            input=stats.get("input_tokens"),
            output=stats.get("output_tokens"),
            cache_read=stats.get("cached"),
        )
        facts.tokens = tokens
        facts.duration_ms = int_of(stats.get("duration_ms"))


class GeminiKind(StreamKind):
    """``gemini`` headless with stream-JSON output, resumed with ``--resume ID``."""

    name = "gemini"
    default_command = ("gemini", "--approval-mode", "yolo")
    env: ClassVar[dict[str, str]] = {TRUST_ENV: "true"}
    managed_flags: ClassVar[dict[str, str]] = {
        "-p": "the prompt",
        "--prompt": "the prompt",
        "-i": "headless only",
        "--prompt-interactive": "headless only",
        "-o": "stream-json",
        "--output-format": "stream-json",
        "-r": "the fleet resumes sessions",
        "--resume": "the fleet resumes sessions",
        "--list-sessions": "not a run",
        "--delete-session": "not a run",
    }
    rules = StreamRules(
        handlers={
            "init": _init,
            "message": _message,
            "tool_use": _other,
            "tool_result": _other,
            "error": _error,
            "result": _result,
        },
        resume_refused=re.compile(
            r"Error resuming session|Invalid session identifier|No previous sessions found"
        ),
        usage=(
            r"\bexhausted your daily quota\b",
            r"\bUsage limit reached for\b",
            r"\breached your daily [\w.-]* ?quota limit\b",
            r"\bTerminalQuotaError\b",
        ),
        rate=(
            r"\bRESOURCE_EXHAUSTED\b",
            r"\b429 Too Many Requests\b",
            r"\bRate limit exceeded\b",
            r"\bstatus(?: code)?:? 429\b",
        ),
        exit_codes={
            41: (Outcome.FAILED, "authentication error"),
            42: (Outcome.FAILED, "input error"),
            52: (Outcome.FAILED, "configuration error"),
            53: (Outcome.FAILED, "turn limit exceeded (maxSessionTurns)"),
            54: (Outcome.CRASHED, "fatal tool execution error"),
        },
    )

    def argv(
        self, command: Sequence[str], prompt: str, session: Session, git_dir: str | None
    ) -> list[str]:
        argv = [*command]
        if session.resume is not None:
            argv += ["--resume", session.resume]
        # One argument "--prompt=...": a prompt starting with "-" stays the prompt.
        return [*argv, "--output-format", "stream-json", f"--prompt={prompt}"]
