"""Where the fleet's tasks come from when ``tasks.source = "github"``: open issues, via ``gh``.

Why the ``gh`` CLI and not the REST API: users of this tool already have ``gh`` authenticated
(it is how the agents open their pull requests), so there is no second token to configure, and
``gh`` resolves the repository of the current clone when none is named.

Why open pull requests are read too: an issue that already has an open PR is being (or has been)
worked on.  Starting a second agent on it wastes a run and produces a competing PR.  An issue
counts as taken when an open PR

* lists it in ``closingIssuesReferences`` (GitHub's own link: ``Closes #N`` in the body, or a
  manual link in the Development panel), or
* says ``Closes #N`` / ``Fixes #N`` / ``Resolves #N`` (any form of GitHub's closing keywords:
  close, closes, closed, fix, fixes, fixed, resolve, resolves, resolved) in its body -- read as
  well because ``closingIssuesReferences`` is only filled for PRs against the default branch, or
* has the head branch ``issue-N`` or ``issue-N-...``, the branch names the fleet gives its
  worktrees.

The body scan is deliberately generous (``Fixes #1, #2`` counts both; ``other/repo#N`` counts
when no repository is configured to compare with): skipping an issue by mistake delays it,
running it twice wastes a run and confuses reviewers.

Fields checked against the gh manual (https://cli.github.com/manual/gh_issue_list: JSON fields
include ``labels``, ``number``, ``state``, ``title``) and cli/cli#10544, which added the
``closingIssuesReferences`` JSON field for pull requests (gh releases from 2025 on).  An older
gh answers ``Unknown JSON field: "closingIssuesReferences"``; the PR listing is then retried
without it, relying on bodies and branch names.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

__all__ = [
    "PR_LIST_LIMIT",
    "GitHubQuery",
    "SourcedTask",
    "TaskSourceError",
    "fetch_github_tasks",
    "gh_issue_list_argv",
    "gh_pr_list_argv",
    "select_tasks",
    "taken_issues",
]

ISSUE_FIELDS = "number,title,labels,state"
PR_FIELDS = "number,headRefName,body,closingIssuesReferences"
PR_FIELDS_OLD_GH = "number,headRefName,body"

#: Open PRs read to find taken issues.  Not the issue limit: missing a PR means running an
#: issue twice, so read generously (gh pages through them).
PR_LIST_LIMIT = 1000

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SourcedTask:
    """One issue the fleet may start an agent on."""

    issue: int
    title: str


@dataclass(frozen=True)
class GitHubQuery:
    """The ``tasks`` filters of the config, as ``gh issue list`` understands them."""

    #: OWNER/NAME (or HOST/OWNER/NAME) for --repo; None = gh's default for the working directory
    repo: str | None = None
    #: --label, each: an issue must carry all of them
    labels: tuple[str, ...] = ()
    assignee: str | None = None
    milestone: str | None = None
    limit: int = 100
    #: issues carrying any of these are skipped (e.g. "agentize:done")
    skip_labels: tuple[str, ...] = ()


class TaskSourceError(Exception):
    """Tasks could not be listed.  The message says what failed and how to fix it."""


# -- argv (pure) -------------------------------------------------------------------------------


def _repo_args(q: GitHubQuery) -> list[str]:
    return ["--repo", q.repo] if q.repo else []


def gh_issue_list_argv(q: GitHubQuery) -> list[str]:
    """Arguments for ``gh`` (without the program itself) that list the candidate issues."""
    argv = ["issue", "list", "--state", "open", "--json", ISSUE_FIELDS, "--limit", str(q.limit)]
    argv += _repo_args(q)
    for label in q.labels:
        argv += ["--label", label]
    if q.assignee:
        argv += ["--assignee", q.assignee]
    if q.milestone:
        argv += ["--milestone", q.milestone]
    return argv


def gh_pr_list_argv(q: GitHubQuery, *, closing_refs: bool = True) -> list[str]:
    """Arguments for ``gh`` that list open PRs with what links them to issues.

    ``closing_refs=False`` leaves out ``closingIssuesReferences`` for gh releases that lack it.
    """
    fields = PR_FIELDS if closing_refs else PR_FIELDS_OLD_GH
    argv = ["pr", "list", "--state", "open", "--json", fields, "--limit", str(PR_LIST_LIMIT)]
    return argv + _repo_args(q)


# -- selection (pure) --------------------------------------------------------------------------

_REF = r"(?:[\w.-]+/[\w.-]+)?#\d+|https?://[^\s/]+/[\w.-]+/[\w.-]+/issues/\d+"
_CLOSING_RE = re.compile(
    rf"\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?)\b\s*:?\s*"
    rf"(?P<refs>(?:{_REF})(?:\s*(?:,|\band\b)?\s*(?:{_REF}))*)",
    re.IGNORECASE,
)
_ONE_REF_RE = re.compile(
    r"(?:(?P<repo>[\w.-]+/[\w.-]+))?#(?P<num>\d+)"
    r"|https?://[^\s/]+/(?P<urlrepo>[\w.-]+/[\w.-]+)/issues/(?P<urlnum>\d+)",
    re.IGNORECASE,
)
_BRANCH_RE = re.compile(r"^issue-(\d+)(?:-|$)")


def _owner_name(repo: str | None) -> str | None:
    """``HOST/OWNER/NAME`` or ``OWNER/NAME`` -> ``owner/name``; None when not given."""
    if not repo:
        return None
    parts = [p for p in repo.strip().rstrip("/").removesuffix(".git").split("/") if p]
    return "/".join(parts[-2:]).lower() if len(parts) >= 2 else repo.lower()


def _same_repo(ref_repo: str | None, ours: str | None) -> bool:
    # A bare "#N" is this repository; a qualified one counts when we cannot tell (conservative).
    return ref_repo is None or ours is None or ref_repo.lower() == ours


def _body_refs(body: str, ours: str | None) -> set[int]:
    found: set[int] = set()
    for closing in _CLOSING_RE.finditer(body):
        for ref in _ONE_REF_RE.finditer(closing.group("refs")):
            if ref.group("num") is not None:
                repo, num = ref.group("repo"), ref.group("num")
            else:
                repo, num = ref.group("urlrepo"), ref.group("urlnum")
            if _same_repo(repo, ours):
                found.add(int(num))
    return found


def _closing_refs(value: object, ours: str | None) -> set[int]:
    """``closingIssuesReferences``: a list of numbers or of ``{"number": N, ...}`` objects."""
    found: set[int] = set()
    if not isinstance(value, list):
        return found
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            found.add(item)
        elif isinstance(item, dict) and isinstance(item.get("number"), int):
            repo = item.get("repository")
            ref_repo: str | None = None
            if isinstance(repo, dict):
                owner = repo.get("owner")
                login = owner.get("login") if isinstance(owner, dict) else None
                name = repo.get("name")
                if isinstance(login, str) and isinstance(name, str):
                    ref_repo = f"{login}/{name}"
            if _same_repo(ref_repo, ours):
                found.add(item["number"])
    return found


def _load_list(text: str, what: str) -> list[dict[str, Any]]:
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        raise TaskSourceError(
            f"`gh {what}` printed something that is not JSON ({exc}); output starts: "
            f"{text[:200]!r}. Fix: run the command yourself to see what gh prints, and upgrade "
            f"gh if it is older than 2.0."
        ) from exc
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise TaskSourceError(
            f"`gh {what}` printed JSON that is not a list of objects: {text[:200]!r}. "
            f"Fix: upgrade gh, or report the gh version in use."
        )
    return data


def taken_issues(prs: list[dict[str, Any]], q: GitHubQuery) -> set[int]:
    """Issue numbers that an open PR already addresses."""
    ours = _owner_name(q.repo)
    taken: set[int] = set()
    for pr in prs:
        taken |= _closing_refs(pr.get("closingIssuesReferences"), ours)
        body = pr.get("body")
        if isinstance(body, str):
            taken |= _body_refs(body, ours)
        head = pr.get("headRefName")
        if isinstance(head, str):
            branch = _BRANCH_RE.match(head)
            if branch:
                taken.add(int(branch.group(1)))
    return taken


def select_tasks(issues_json: str, prs_json: str, q: GitHubQuery) -> list[SourcedTask]:
    """The issues to work on, lowest number first (oldest first: a fair queue).

    Skips closed issues, issues carrying any of ``q.skip_labels`` (compared case-insensitively,
    as GitHub treats label names) and issues that an open PR addresses.  Raises
    :class:`TaskSourceError` when either JSON text is not what gh prints.
    """
    issues = _load_list(issues_json, "issue list")
    prs = _load_list(prs_json, "pr list")
    taken = taken_issues(prs, q)
    skip = {label.casefold() for label in q.skip_labels}
    selected: dict[int, SourcedTask] = {}
    for issue in issues:
        number = issue.get("number")
        if not isinstance(number, int) or isinstance(number, bool):
            raise TaskSourceError(
                f"`gh issue list` returned an issue without a number: {issue!r}. "
                f"Fix: upgrade gh, or report the gh version in use."
            )
        if number <= 0:
            # No GitHub issue has such a number; one bad entry must not stop the others.
            log.warning(
                f"`gh issue list` returned issue number {number}, which no issue has; skipped"
            )
            continue
        state = issue.get("state")
        if isinstance(state, str) and state.upper() != "OPEN":
            continue
        labels = issue.get("labels")
        names = {
            label["name"].casefold()
            for label in (labels if isinstance(labels, list) else [])
            if isinstance(label, dict) and isinstance(label.get("name"), str)
        }
        if names & skip or number in taken:
            continue
        title = issue.get("title")
        selected[number] = SourcedTask(number, title if isinstance(title, str) else "")
    return [selected[n] for n in sorted(selected)]


# -- running gh --------------------------------------------------------------------------------


def _gh_env() -> dict[str, str]:
    # No prompts, no colour codes, and no "a new release of gh is available" on stderr, which
    # would otherwise be the last stderr line quoted in an error.
    return {**os.environ, "GH_PROMPT_DISABLED": "1", "GH_NO_UPDATE_NOTIFIER": "1", "NO_COLOR": "1"}


def _fix_for(stderr: str, q: GitHubQuery) -> str:
    lowered = stderr.lower()
    if (
        "gh auth login" in lowered
        or "not logged" in lowered
        or "http 401" in lowered
        or ("authentication" in lowered)
    ):
        return (
            "Fix: run `gh auth login` (or set GH_TOKEN) as the user the supervisor runs as, "
            "for an account that can read the repository."
        )
    if "could not resolve to a repository" in lowered or "http 404" in lowered:
        return (
            f"Fix: check the repository name {q.repo!r} in the tasks config (OWNER/NAME) and "
            f"that the authenticated account can see it."
        )
    if "git remote" in lowered or "not a git repository" in lowered:
        return (
            "Fix: name the repository (OWNER/NAME) in the tasks config, or start the supervisor "
            "inside a clone of it."
        )
    if "unknown json field" in lowered:
        return "Fix: upgrade gh to a current release (https://cli.github.com/)."
    return (
        "Fix: run the command above yourself to see the whole error; check `gh auth status` and "
        "the repository name in the tasks config."
    )


async def _run_gh(
    argv: list[str], *, gh: str, cwd: str | None, seconds: float
) -> subprocess.CompletedProcess[bytes]:
    cmd = [gh, *argv]
    shown = shlex.join(cmd)
    try:
        with anyio.fail_after(seconds):
            return await anyio.run_process(
                cmd, stdin=subprocess.DEVNULL, check=False, cwd=cwd, env=_gh_env()
            )
    except FileNotFoundError as exc:
        if cwd is not None and exc.filename == cwd:
            raise TaskSourceError(
                f"Could not run `{shown}`: the working directory {cwd!r} does not exist. "
                f"Fix: point the supervisor at an existing clone of the repository."
            ) from exc
        raise TaskSourceError(
            f"The GitHub CLI was not found: {gh!r} is not installed or not on PATH, and the "
            f"github task source lists issues with `gh issue list`. Fix: install gh "
            f"(https://cli.github.com/), run `gh auth login`, or set the full path to gh."
        ) from exc
    except PermissionError as exc:
        raise TaskSourceError(
            f"Could not run {gh!r}: permission denied. Fix: make it executable or point the "
            f"config at the real gh binary."
        ) from exc
    except TimeoutError as exc:
        raise TaskSourceError(
            f"`{shown}` did not finish within {seconds:g} s. Fix: check the network and "
            f"https://www.githubstatus.com/, then try again; raise the timeout for very large "
            f"repositories."
        ) from exc


def _failure(result: subprocess.CompletedProcess[bytes], q: GitHubQuery) -> TaskSourceError:
    stderr = (result.stderr or b"").decode("utf-8", "replace")
    stdout = (result.stdout or b"").decode("utf-8", "replace")
    lines = [line.strip() for line in (stderr or stdout).splitlines() if line.strip()]
    last = lines[-1] if lines else "(no output)"
    shown = shlex.join(str(arg) for arg in result.args)
    return TaskSourceError(
        f"Listing GitHub tasks failed: `{shown}` exited {result.returncode}: {last}. "
        f"{_fix_for(stderr + stdout, q)}"
    )


async def fetch_github_tasks(
    q: GitHubQuery,
    *,
    gh: str = "gh",
    cwd: str | None = None,
    timeout: float = 60,
) -> list[SourcedTask]:
    """List the open issues to work on, via ``gh`` (argv lists, no shell).

    ``timeout`` bounds each gh call.  Every failure -- gh missing, gh exiting non-zero, output
    that is not the expected JSON -- raises :class:`TaskSourceError` with the fix in its message.
    """
    issues = await _run_gh(gh_issue_list_argv(q), gh=gh, cwd=cwd, seconds=timeout)
    if issues.returncode != 0:
        raise _failure(issues, q)
    prs = await _run_gh(gh_pr_list_argv(q), gh=gh, cwd=cwd, seconds=timeout)
    if prs.returncode != 0:
        stderr = (prs.stderr or b"").decode("utf-8", "replace")
        if "Unknown JSON field" in stderr and "closingIssuesReferences" in stderr:
            prs = await _run_gh(
                gh_pr_list_argv(q, closing_refs=False), gh=gh, cwd=cwd, seconds=timeout
            )
        if prs.returncode != 0:
            raise _failure(prs, q)
    return select_tasks(
        (issues.stdout or b"").decode("utf-8", "replace"),
        (prs.stdout or b"").decode("utf-8", "replace"),
        q,
    )
