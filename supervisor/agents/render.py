"""One agent output line as people read it: the live console and ``agentize-fleet logs``.

Why: stream-JSON is for programs.  A person watching a fleet wants the assistant's words, one
short line per tool call (``Bash: git status``, ``Edit: src/x.py``) and the result with its
cost -- not kilobytes of escaped JSON per event.  ``--json`` keeps the raw events.

:func:`render_line` is called by code that does not know which CLI printed the line (a log
mixes tasks, and a log outlives its config), so it recognises the three protocols by the line
alone: Claude Code's events carry ``type`` system | assistant | user | result (with
``subtype``) | rate_limit_event | stream_event; Codex's types are dotted (``thread.started``,
``item.completed``, ``turn.failed``) plus ``error``; Gemini's are init | message | tool_use |
tool_result | error (with ``severity``) | result (with ``status``).  Event shapes: see the
docstrings of :mod:`.claude`, :mod:`.codex` and :mod:`.gemini`.

The contract: a line that is not a JSON object, or is one no protocol knows, comes back
unchanged (plain text agents, kind ``command``, print text); a known event comes back as one
or more readable lines, or ``None`` when it is not worth a line (a turn starting, a user
message, an ``allowed`` rate-limit report).  It never raises.  Lines that do not start with
``{`` cost one comparison, so a flood of plain text stays cheap.

Paths inside the fleet's worktrees are shown relative to the worktree (``src/x.py``, not
``/home/u/fleet/demo.git/trees/issue-7/src/x.py``): worktrees always live under ``trees/``
(Agentize's layout), and the renderer has no other way to know the run's directory.  Gemini
streams the assistant's text in ``delta`` chunks; each chunk is shown as it came (a stateless
renderer cannot join them).  Times are shown in UTC, so that the text does not depend on the
zone of the machine that renders it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from supervisor.agents.claude import message_texts

__all__ = ["render_line", "tool_line", "usd"]

Event = dict[str, Any]

#: Tool names of Claude Code and Gemini CLI -> the label shown and the parameters that say
#: what the call does (the first present one is shown).
_TOOLS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    # Claude Code
    "Bash": ("Bash", ("command",)),
    "Edit": ("Edit", ("file_path",)),
    "MultiEdit": ("Edit", ("file_path",)),
    "Write": ("Write", ("file_path",)),
    "Read": ("Read", ("file_path",)),
    "NotebookEdit": ("Edit", ("notebook_path",)),
    "Glob": ("Glob", ("pattern",)),
    "Grep": ("Grep", ("pattern",)),
    "LS": ("LS", ("path",)),
    "WebFetch": ("WebFetch", ("url",)),
    "WebSearch": ("WebSearch", ("query",)),
    "Task": ("Task", ("description", "prompt")),
    "TodoWrite": ("Todo", ("todos",)),
    # Gemini CLI
    "run_shell_command": ("Bash", ("command",)),
    "read_file": ("Read", ("absolute_path", "file_path", "path")),
    "read_many_files": ("Read", ("paths", "include")),
    "write_file": ("Write", ("file_path", "absolute_path")),
    "replace": ("Edit", ("file_path", "absolute_path")),
    "glob": ("Glob", ("pattern",)),
    "search_file_content": ("Grep", ("pattern",)),
    "grep_search": ("Grep", ("pattern",)),
    "list_directory": ("LS", ("dir_path", "path")),
    "web_fetch": ("WebFetch", ("url", "prompt")),
    "google_web_search": ("WebSearch", ("query",)),
    "write_todos": ("Todo", ("todos",)),
}
_PATH_KEYS = frozenset({"file_path", "absolute_path", "notebook_path", "path", "dir_path", "paths"})
MAX_ARG = 100


def render_line(line: str) -> str | None:
    """``line`` for people: see the module docstring for the contract."""
    if not line.startswith("{"):
        return line
    try:
        event = json.loads(line)
    except ValueError:
        return line
    if not isinstance(event, dict):
        return line
    renderer = _RENDERERS.get(str(event.get("type")))
    if renderer is None:
        return line
    try:
        return renderer(event)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):
        return line  # an event of a shape we do not know: shown as it came


def tool_line(name: str, arguments: object) -> str:
    """``Label: what`` for one tool call (``Bash: git status``, ``Edit: src/x.py``)."""
    label, keys = _TOOLS.get(name, (name, ()))
    args = arguments if isinstance(arguments, dict) else {}
    for key in keys or tuple(args):
        if key in args:
            what = _arg(args[key], key in _PATH_KEYS)
            if what:
                return f"{label}: {what}"
    return label


# -- Claude Code ---------------------------------------------------------------------------------


def _claude_system(event: Event) -> str | None:
    subtype = event.get("subtype")
    if subtype == "init":
        return _session_line(event.get("session_id"), event.get("model"))
    if subtype == "compact_boundary":
        meta = event.get("compact_metadata")
        meta = meta if isinstance(meta, dict) else {}
        trigger = meta.get("trigger") or "auto"
        tokens = meta.get("pre_tokens", meta.get("preTokens"))
        size = f", {_count(tokens)} tokens before" if isinstance(tokens, int) else ""
        return f"⋯ context compacted ({trigger}{size})"
    return None


def _claude_assistant(event: Event) -> str | None:
    message = event.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if event.get("is_api_error_message") is True:
        return "✗ " + "\n".join(message_texts(event))
    parts: list[str] = []
    if isinstance(content, str):
        parts.append(content.strip())
    elif isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                parts.append(block["text"].strip())
            elif block.get("type") == "tool_use":
                parts.append(tool_line(str(block.get("name")), block.get("input")))
    parts = [part for part in parts if part]
    return "\n".join(parts) if parts else None


def _claude_user(event: Event) -> str | None:
    message = event.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return None
    errors = [
        "  ✗ " + _first_line(_content_text(block.get("content")))
        for block in content
        if isinstance(block, dict)
        and block.get("type") == "tool_result"
        and block.get("is_error") is True
    ]
    return "\n".join(errors) if errors else None


def _claude_rate_limit(event: Event) -> str | None:
    info = event.get("rate_limit_info")
    if not isinstance(info, dict):
        return None
    status = info.get("status")
    window = info.get("rateLimitType") or "rate limit"
    resets = info.get("resetsAt")
    when = f", resets {_utc(resets)}" if isinstance(resets, int | float) else ""
    if status == "rejected":
        return f"⛔ usage limit reached ({window}){when}"
    if status == "allowed_warning":
        used = info.get("utilization")
        share = f" {used:.0%} used" if isinstance(used, int | float) else ""
        return f"⚠ nearing the usage limit ({window}){share}{when}"
    return None


def _result(event: Event) -> str | None:
    if "status" in event and "subtype" not in event:  # Gemini
        ok = event.get("status") == "success"
        error = event.get("error")
        detail = error.get("message") if isinstance(error, dict) else None
        stats = event.get("stats")
        stats = stats if isinstance(stats, dict) else {}
        facts = [
            _plural(stats.get("tool_calls"), "tool call"),
            _tokens(stats.get("input_tokens"), stats.get("output_tokens")),
            _duration(stats.get("duration_ms")),
        ]
        return _result_line(ok, str(event.get("status")), detail, facts)
    subtype = str(event.get("subtype"))
    ok = subtype == "success" and event.get("is_error") is not True
    text = event.get("result")
    errors = event.get("errors")
    if not isinstance(text, str) or not text:
        text = "; ".join(str(e) for e in errors) if isinstance(errors, list) else None
    facts = [
        _plural(event.get("num_turns"), "turn"),
        _cost(event.get("total_cost_usd")),
        _duration(event.get("duration_ms")),
    ]
    label = "error" if subtype == "success" and not ok else subtype
    return _result_line(ok, label, None if ok else text, facts)


# -- Codex -----------------------------------------------------------------------------------


def _codex_thread(event: Event) -> str | None:
    return _session_line(event.get("thread_id"), None)


def _codex_item_started(event: Event) -> str | None:
    item = event.get("item")
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind == "command_execution":
        return f"Bash: {_arg(_shell(item.get('command')), False)}"
    if kind == "mcp_tool_call":
        return tool_line(f"{item.get('server')}.{item.get('tool')}", item.get("arguments"))
    if kind == "web_search":
        return tool_line("WebSearch", {"query": item.get("query")})
    return None


def _codex_item_completed(event: Event) -> str | None:
    item = event.get("item")
    if not isinstance(item, dict):
        return None
    kind = item.get("type")
    if kind == "agent_message":
        text = item.get("text")
        return (text.strip() or None) if isinstance(text, str) else None
    if kind == "file_change":
        changes = item.get("changes")
        paths = (
            [c.get("path") for c in changes if isinstance(c, dict)]
            if isinstance(changes, list)
            else []
        )
        return tool_line("Edit", {"file_path": [p for p in paths if isinstance(p, str)]})
    if kind == "command_execution":
        code = item.get("exit_code")
        return f"  ✗ exit {code}" if isinstance(code, int) and code != 0 else None
    if kind == "todo_list":
        return tool_line("Todo", {"todos": item.get("items")})
    if kind == "error":
        return f"⚠ {_first_line(str(item.get('message')))}"
    return None


def _codex_turn_completed(event: Event) -> str | None:
    usage = event.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    tokens = _tokens(usage.get("input_tokens"), usage.get("output_tokens"))
    return "· turn completed" + (f" · {tokens}" if tokens else "")


def _codex_turn_failed(event: Event) -> str | None:
    error = event.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return f"✗ turn failed: {_first_line(str(message))}" if message else "✗ turn failed"


# -- Gemini ----------------------------------------------------------------------------------


def _gemini_init(event: Event) -> str | None:
    return _session_line(event.get("session_id"), event.get("model"))


def _gemini_message(event: Event) -> str | None:
    content = event.get("content")
    if event.get("role") != "assistant" or not isinstance(content, str):
        return None
    return content if event.get("delta") is True else (content.strip() or None)


def _gemini_tool_use(event: Event) -> str | None:
    return tool_line(str(event.get("tool_name")), event.get("parameters"))


def _gemini_tool_result(event: Event) -> str | None:
    if event.get("status") != "error":
        return None
    error = event.get("error")
    message = error.get("message") if isinstance(error, dict) else event.get("output")
    return f"  ✗ {_first_line(str(message))}"


def _error(event: Event) -> str | None:  # Codex and Gemini
    message = str(event.get("message") or "error")
    warning = event.get("severity") == "warning" or message.startswith("Reconnecting")
    return f"{'⚠' if warning else '✗'} {_first_line(message)}"


_RENDERERS: Mapping[str, Callable[[Event], str | None]] = {
    "system": _claude_system,
    "assistant": _claude_assistant,
    "user": _claude_user,
    "rate_limit_event": _claude_rate_limit,
    "stream_event": lambda event: None,
    "result": _result,
    "thread.started": _codex_thread,
    "turn.started": lambda event: None,
    "item.started": _codex_item_started,
    "item.updated": lambda event: None,
    "item.completed": _codex_item_completed,
    "turn.completed": _codex_turn_completed,
    "turn.failed": _codex_turn_failed,
    "error": _error,
    "init": _gemini_init,
    "message": _gemini_message,
    "tool_use": _gemini_tool_use,
    "tool_result": _gemini_tool_result,
}


# -- formatting ------------------------------------------------------------------------------


def _session_line(session: object, model: object) -> str:
    on = f" ({model})" if isinstance(model, str) and model else ""
    return f"● session {session}{on}"


def _result_line(ok: bool, label: str, detail: object, facts: list[str | None]) -> str:
    head = "✓ done" if ok else f"✗ {label}"
    if isinstance(detail, str) and detail:
        head += f": {_first_line(detail)}"
    return " · ".join([head, *(f for f in facts if f)])


def _arg(value: object, path: bool) -> str:
    if isinstance(value, list):
        items = [v for v in value if isinstance(v, str)]
        if len(items) != len(value) or not items:
            return _plural(len(value), "item") or ""
        return _cut(", ".join(_short_path(v) if path else _first_line(v) for v in items))
    if isinstance(value, str):
        return _cut(_short_path(value) if path else _first_line(value))
    return ""


def _short_path(path: str) -> str:
    """A path inside a fleet worktree (``.../NAME.git/trees/issue-7/src/x.py``) as ``src/x.py``."""
    at = path.find("/trees/")
    if at < 0:
        return path
    rest = path[at + len("/trees/") :].split("/", 1)
    return rest[1] if len(rest) == 2 and rest[1] else path


def _shell(command: object) -> str:
    """Codex runs ``bash -lc 'git status'``: show the script, not the wrapper."""
    if isinstance(command, list):
        parts = [str(p) for p in command]
        if len(parts) == 3 and parts[1] in ("-lc", "-c"):
            return parts[2]
        return " ".join(parts)
    text = str(command)
    for wrapper in ("bash -lc ", "/bin/bash -lc ", "sh -c ", "/bin/sh -c "):
        if text.startswith(wrapper):
            inner = text[len(wrapper) :]
            if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
                return inner[1:-1]
            return inner
    return text


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            block["text"]
            for block in content
            if isinstance(block, dict) and isinstance(block.get("text"), str)
        )
    return str(content)


def _first_line(text: str) -> str:
    stripped = text.strip()
    first, _, rest = stripped.partition("\n")
    return _cut(first + (" …" if rest.strip() else ""))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ARG else text[: MAX_ARG - 1] + "…"


def _plural(value: object, noun: str) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    return f"{value} {noun}{'' if value == 1 else 's'}"


def _count(value: int) -> str:
    return f"{value / 1000:.1f}k" if value >= 10000 else str(value)


def _tokens(inp: object, out: object) -> str | None:
    if not isinstance(inp, int) or not isinstance(out, int):
        return None
    return f"{_count(inp)} in / {_count(out)} out tokens"


def _cost(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return f"${value:.4f}" if value < 1 else f"${value:.2f}"


def usd(value: object) -> str:
    """A cost as people read it (``$0.0469``, ``$12.30``); ``-`` when none was reported."""
    return _cost(value) or "-"


def _duration(ms: object) -> str | None:
    if isinstance(ms, bool) or not isinstance(ms, int | float):
        return None
    seconds = int(ms) // 1000
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))
