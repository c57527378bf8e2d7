"""Worktree trust for Claude Code, on every machine: the I/O around :mod:`supervisor.agents.trust`.

Why (issue 13, point 7; the full answer is :mod:`supervisor.agents.trust`'s docstring): print
mode never shows Claude Code's trust dialog, so a headless run is not blocked; but an untrusted
workspace ignores the project's ``.claude/settings.json`` permission rules and skips its hooks
(Agentize's hands-off mode is a Stop hook), and whoever opens the worktree later meets the
dialog.  So, as Agentize's ``wt spawn`` does, each worktree is marked trusted in
``~/.claude.json`` (``$CLAUDE_CONFIG_DIR/.claude.json`` when the agent's environment sets it)
before its first Claude run of a shift, on the machine the run goes to -- locally and over SSH
alike, through :meth:`Host.run` and one small script (``sh/claude-trust.sh``): read the file and
the worktree's real path (the key Claude Code looks up: its git root, exact-matched --
anthropics/claude-code#72896), merge in Python, write back unless the file changed meanwhile.

A failure is a warning in the log, never the run's failure: trust only changes what happens
around the run.  Nothing is written where Claude Code was never set up (no file), or where the
file cannot be read as JSON (never replace what cannot be read).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from supervisor import sh
from supervisor.agents.trust import trusted_claude_config
from supervisor.hosts.base import Host, HostError

__all__ = ["ensure_trusted"]

TIMEOUT = 30.0
#: The file changed between our read and our write this many times in a row: give up (warn).
ATTEMPTS = 3
#: ``sh/claude-trust.sh write``'s status when the file changed since it was read.
CHANGED = 75


async def ensure_trusted(host: Host, worktree: str, env: Mapping[str, str]) -> str:
    """Mark ``worktree`` trusted in Claude Code's config on ``host``; ``env`` is the agent's
    environment from the config (its ``CLAUDE_CONFIG_DIR``, if any).  Returns "" when the
    worktree is trusted (or there is nothing to write), else why it could not be done."""
    config_dir = env.get("CLAUDE_CONFIG_DIR", "")
    path = "~/.claude.json"
    try:
        for _ in range(ATTEMPTS):
            read = await host.run(
                sh.command("claude-trust", "read", worktree, config_dir),
                check=False,
                timeout=TIMEOUT,
            )
            if read.exit_code != 0:
                return f"cannot read {path}: {read.stderr.strip() or f'exit {read.exit_code}'}"
            real, path, cksum, text = [*read.stdout.split("\n", 3), "", "", ""][:4]
            if cksum == "-":
                return ""  # Claude Code was never set up there: nothing to trust yet
            new = trusted_claude_config(text, real)
            if new is None:
                if _is_json(text):
                    return ""  # trusted already
                continue  # being written by a Claude Code starting up: read it again
            write = await host.run(
                sh.command("claude-trust", "write", path, cksum),
                input=new.encode(),
                check=False,
                timeout=TIMEOUT,
            )
            if write.exit_code == 0:
                return ""
            if write.exit_code != CHANGED:
                return f"cannot write {path}: {write.stderr.strip() or f'exit {write.exit_code}'}"
    except HostError as exc:
        return str(exc)
    return f"{path} kept changing or could not be read as JSON ({ATTEMPTS} tries)"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
