"""Worktree trust in Claude Code's global config, the way Agentize's ``wt spawn`` does it.

What upstream does and why: ``wt spawn`` creates the worktree, then -- when ``~/.claude.json``
exists and ``jq`` is installed -- sets ``projects[<worktree>] = {"allowedTools": [],
"hasTrustDialogAccepted": true}`` before it starts Claude (Synthesys-Lab/agentize,
``src/cli/wt/commands.sh``, commit c36d57b "Auto-trust new worktrees in Claude config":
"eliminating the manual trust dialog when Claude is invoked").  ``wt spawn`` starts Claude
*interactively* unless ``--headless``; the first interactive start in a new directory stops
at "Do you trust the files in this folder?", which would block every spawned worktree.

Whether headless runs need it: the dialog is never shown in print mode -- ``claude -p`` runs
in a folder whose trust dialog blocks the interactive TUI (anthropics/claude-code#31283,
#31037; vikasprogrammer/agentric#396: "print-mode never shows it").  So a fleet run is not
blocked without it.  Trust still matters around the run: since 2.1.53
(GHSA-mmgp-wc2j-qcv7 / CVE-2026-33068) an untrusted workspace ignores the project's
``.claude/settings.json`` ``permissions.allow`` and says to set
``projects[...].hasTrustDialogAccepted: true`` in ``~/.claude.json`` (#72547), and hooks are
skipped in an untrusted workspace (#10409: "Skipping Stop hook execution - workspace trust
not accepted") -- Agentize's hands-off mode *is* a Stop hook.  And a person who opens the
worktree later (``wt goto``, ``claude``) meets the dialog.  So the fleet does what ``wt spawn``
does, before the first run in a worktree, on every machine (SSH ones included), with three
differences, each for a reason:

* it merges into an existing entry instead of replacing it (``wt`` drops the project's other
  keys, e.g. its ``allowedTools``);
* it writes nothing when the file is missing or is not a JSON object (a machine where Claude
  was never set up, or a file being written: never replace what cannot be read);
* the key is the worktree's real path (symlinks resolved: a trust entry under another
  spelling of the path is not found -- agentric#396's ``/var`` -> ``/private/var`` pitfall).

The file is ``$CLAUDE_CONFIG_DIR/.claude.json`` when ``CLAUDE_CONFIG_DIR`` is set (separate
accounts side by side), else ``~/.claude.json``.  Claude Code rewrites the file itself (under
a lock of its own, #31037); a write of ours racing a starting ``claude`` can lose one of the
two writes, so the caller writes it atomically (temporary file, rename) once per worktree and
treats a failure as a warning, never as the run's failure.  Gemini needs nothing on disk: its
kind sets ``GEMINI_TRUST_WORKSPACE=true`` (see :mod:`.gemini`); Codex trusts a git repository
without being asked.

Pure: the caller reads and writes the file (locally or over SSH).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from typing import Any

__all__ = ["claude_config_path", "trusted_claude_config"]


def claude_config_path(home: str, env: Mapping[str, str]) -> str:
    """Where Claude Code keeps its global config (and the trust entries) on a machine whose
    home directory is ``home`` and whose agent environment is ``env``."""
    config_dir = env.get("CLAUDE_CONFIG_DIR")
    if config_dir:
        return posixpath.join(config_dir, ".claude.json")
    return posixpath.join(home, ".claude.json")


def trusted_claude_config(text: str | None, worktree: str) -> str | None:
    """The new content of Claude Code's config with ``worktree`` (a real path) trusted, or
    ``None`` when there is nothing to write: the file is missing (``text`` is ``None``), is
    not a JSON object, or already trusts the worktree."""
    if text is None:
        return None
    try:
        config: Any = json.loads(text)
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    projects = config.get("projects")
    if projects is None:
        projects = config["projects"] = {}
    if not isinstance(projects, dict):
        return None
    entry = projects.get(worktree)
    if isinstance(entry, dict):
        if entry.get("hasTrustDialogAccepted") is True:
            return None
        projects[worktree] = {**entry, "hasTrustDialogAccepted": True}
    else:
        projects[worktree] = {"allowedTools": [], "hasTrustDialogAccepted": True}
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"
