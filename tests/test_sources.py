"""The GitHub task source, run against a fake ``gh``: a real executable written into tmp_path
that logs its argv and prints fixed JSON, so no network and no real gh are needed."""

from __future__ import annotations

import json
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from conftest import Harness
from structlog.testing import capture_logs

from supervisor.sources import (
    GitHubQuery,
    SourcedTask,
    TaskSourceError,
    fetch_github_tasks,
    gh_issue_list_argv,
    gh_pr_list_argv,
    select_tasks,
)


def issue(
    number: int, title: str = "", labels: tuple[str, ...] = (), state: str = "OPEN"
) -> dict[str, object]:
    return {
        "number": number,
        "title": title or f"Issue {number}",
        "labels": [
            {"id": f"L{n}", "name": n, "description": "", "color": "ededed"} for n in labels
        ],
        "state": state,
    }


def pr(
    number: int, head: str = "feature", body: str = "", closing: list[object] | None = None
) -> dict[str, object]:
    return {
        "number": number,
        "headRefName": head,
        "body": body,
        "closingIssuesReferences": closing or [],
    }


FAKE_GH = """\
#!{python}
import json, sys, time
from pathlib import Path

base = Path({base!r})
with open(base / "argv.log", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
conf = json.loads((base / "conf.json").read_text())
args = sys.argv[1:]
time.sleep(conf["sleep"])
if conf["unknown_closing_field"] and "closingIssuesReferences" in " ".join(args):
    sys.stderr.write('Unknown JSON field: "closingIssuesReferences"\\n')
    sys.stderr.write('Available fields:\\n  body\\n')
    sys.exit(1)
if conf["exit"]:
    sys.stderr.write(conf["stderr"])
    sys.exit(conf["exit"])
sys.stdout.write(conf["issues"] if args[0] == "issue" else conf["prs"])
"""


@dataclass
class FakeGh:
    path: Path
    base: Path

    def configure(
        self,
        *,
        issues: list[dict[str, object]] | None = None,
        prs: list[dict[str, object]] | None = None,
        exit: int = 0,
        stderr: str = "",
        sleep: float = 0,
        unknown_closing_field: bool = False,
        raw_issues: str | None = None,
    ) -> None:
        conf = {
            "issues": raw_issues if raw_issues is not None else json.dumps(issues or []),
            "prs": json.dumps(prs or []),
            "exit": exit,
            "stderr": stderr,
            "sleep": sleep,
            "unknown_closing_field": unknown_closing_field,
        }
        (self.base / "conf.json").write_text(json.dumps(conf))

    def calls(self) -> list[list[str]]:
        log = self.base / "argv.log"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture
def fake_gh(tmp_path: Path) -> FakeGh:
    path = tmp_path / "gh"
    path.write_text(FAKE_GH.format(python=sys.executable, base=str(tmp_path)))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    fake = FakeGh(path, tmp_path)
    fake.configure()
    return fake


async def fetch(q: GitHubQuery, fake: FakeGh, *, timeout: float = 60) -> list[SourcedTask]:
    with anyio.fail_after(10):
        return await fetch_github_tasks(q, gh=str(fake.path), timeout=timeout)


# -- argv --------------------------------------------------------------------------------------


def test_issue_list_argv() -> None:
    q = GitHubQuery(
        repo="acme/widgets", labels=("agentize", "bug"), assignee="@me", milestone="v1", limit=7
    )
    argv = gh_issue_list_argv(q)
    assert argv[:2] == ["issue", "list"]
    assert argv[argv.index("--state") + 1] == "open"
    assert argv[argv.index("--json") + 1] == "number,title,labels,state"
    assert argv[argv.index("--limit") + 1] == "7"
    assert argv[argv.index("--repo") + 1] == "acme/widgets"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--label"] == ["agentize", "bug"]
    assert argv[argv.index("--assignee") + 1] == "@me"
    assert argv[argv.index("--milestone") + 1] == "v1"


def test_issue_list_argv_defaults() -> None:
    argv = gh_issue_list_argv(GitHubQuery())
    for flag in ("--repo", "--label", "--assignee", "--milestone"):
        assert flag not in argv
    assert argv[argv.index("--limit") + 1] == "100"


def test_pr_list_argv() -> None:
    argv = gh_pr_list_argv(GitHubQuery(repo="acme/widgets", labels=("agentize",)))
    assert argv[:2] == ["pr", "list"]
    assert argv[argv.index("--state") + 1] == "open"
    assert argv[argv.index("--json") + 1] == "number,headRefName,body,closingIssuesReferences"
    assert argv[argv.index("--repo") + 1] == "acme/widgets"
    assert "--label" not in argv  # PRs are not filtered by the issue labels
    old = gh_pr_list_argv(GitHubQuery(), closing_refs=False)
    assert old[old.index("--json") + 1] == "number,headRefName,body"


# -- selection ---------------------------------------------------------------------------------


def test_select_skips_issues_with_open_prs() -> None:
    issues = [issue(n) for n in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11)]
    prs = [
        pr(100, body="This adds the thing.\n\nCloses #2"),
        pr(101, closing=[{"number": 3, "url": "https://github.com/acme/widgets/issues/3"}]),
        pr(102, head="issue-4-fix-the-widget"),
        pr(103, head="issue-5"),
        pr(104, head="issue-60-other"),  # not issue 6
        pr(105, body="fixes: #7, #8"),
        pr(106, body="Resolved https://github.com/acme/widgets/issues/9"),
        pr(107, body="See #10 and the prefix #11; unresolved #11"),  # no closing keyword
        pr(108, closing=[11]),  # the plain-number form
    ]
    tasks = select_tasks(json.dumps(issues), json.dumps(prs), GitHubQuery(repo="acme/widgets"))
    assert [t.issue for t in tasks] == [6, 10]


def test_select_other_repository_references() -> None:
    issues = [issue(1), issue(2)]
    prs = [pr(10, body="Fixes other/repo#1, and closes acme/widgets#2")]
    q = GitHubQuery(repo="github.example.com/Acme/Widgets")
    assert [t.issue for t in select_tasks(json.dumps(issues), json.dumps(prs), q)] == [1]
    # Without a configured repository a qualified reference cannot be told apart: skip both.
    assert select_tasks(json.dumps(issues), json.dumps(prs), GitHubQuery()) == []


def test_select_skips_closed_and_skip_labels_and_sorts() -> None:
    issues = [
        issue(9, "newest", labels=("agentize",)),
        issue(4, "done already", labels=("agentize", "Agentize:Done")),
        issue(5, "closed", state="CLOSED"),
        issue(1, "oldest"),
    ]
    q = GitHubQuery(skip_labels=("agentize:done",))
    assert select_tasks(json.dumps(issues), "[]", q) == [
        SourcedTask(1, "oldest"),
        SourcedTask(9, "newest"),
    ]


@pytest.mark.parametrize(
    ("issues_json", "prs_json"),
    [("not json", "[]"), ("[]", "{"), ('{"number": 1}', "[]"), ('[{"title": "x"}]', "[]")],
)
def test_select_bad_json(issues_json: str, prs_json: str) -> None:
    with pytest.raises(TaskSourceError, match="Fix:"):
        select_tasks(issues_json, prs_json, GitHubQuery())


# -- fetching through the fake gh --------------------------------------------------------------


@pytest.mark.anyio
async def test_fetch_passes_filters_and_selects(fake_gh: FakeGh) -> None:
    fake_gh.configure(
        issues=[issue(3, "three", ("agentize",)), issue(4, "four", ("agentize", "agentize:done"))],
        prs=[pr(8, head="issue-12-wip"), pr(9, body="Closes #3")],
    )
    q = GitHubQuery(
        repo="acme/widgets", labels=("agentize",), skip_labels=("agentize:done",), limit=50
    )
    assert await fetch(q, fake_gh) == []

    fake_gh.configure(
        issues=[issue(3, "three", ("agentize",)), issue(12, "twelve")],
        prs=[pr(8, head="issue-12-wip")],
    )
    assert await fetch(q, fake_gh) == [SourcedTask(3, "three")]

    calls = fake_gh.calls()
    assert calls[0] == gh_issue_list_argv(q)
    assert calls[1] == gh_pr_list_argv(q)
    assert calls[0][calls[0].index("--label") + 1] == "agentize"


@pytest.mark.anyio
async def test_fetch_without_closing_refs_on_old_gh(fake_gh: FakeGh) -> None:
    fake_gh.configure(
        issues=[issue(1), issue(2)], prs=[pr(5, body="Fixes #2")], unknown_closing_field=True
    )
    assert await fetch(GitHubQuery(), fake_gh) == [SourcedTask(1, "Issue 1")]
    assert [call[:2] for call in fake_gh.calls()] == [
        ["issue", "list"],
        ["pr", "list"],
        ["pr", "list"],
    ]
    assert fake_gh.calls()[2] == gh_pr_list_argv(GitHubQuery(), closing_refs=False)


@pytest.mark.anyio
async def test_missing_gh(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-gh")
    with anyio.fail_after(10), pytest.raises(TaskSourceError) as caught:
        await fetch_github_tasks(GitHubQuery(), gh=missing)
    message = str(caught.value)
    assert "not installed or not on PATH" in message
    assert "https://cli.github.com/" in message


@pytest.mark.anyio
async def test_missing_gh_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with anyio.fail_after(10), pytest.raises(TaskSourceError, match="not installed"):
        await fetch_github_tasks(GitHubQuery())


@pytest.mark.anyio
async def test_gh_not_logged_in(fake_gh: FakeGh) -> None:
    fake_gh.configure(
        exit=1,
        stderr=(
            "To get started with GitHub CLI, please run:  gh auth login\n"
            "Alternatively, populate the GH_TOKEN environment variable with a GitHub API "
            "authentication token.\n"
        ),
    )
    with pytest.raises(TaskSourceError) as caught:
        await fetch(GitHubQuery(repo="acme/widgets"), fake_gh)
    message = str(caught.value)
    assert "exited 1" in message
    assert "Alternatively, populate the GH_TOKEN" in message  # gh's last stderr line
    assert "Fix: run `gh auth login`" in message
    assert "issue list" in message


@pytest.mark.anyio
async def test_gh_unknown_repository(fake_gh: FakeGh) -> None:
    fake_gh.configure(
        exit=1,
        stderr="GraphQL: Could not resolve to a Repository with the name 'acme/widgetz'. "
        "(repository)\n",
    )
    with pytest.raises(TaskSourceError, match=r"check the repository name 'acme/widgetz'"):
        await fetch(GitHubQuery(repo="acme/widgetz"), fake_gh)


@pytest.mark.anyio
async def test_gh_prints_garbage(fake_gh: FakeGh) -> None:
    fake_gh.configure(raw_issues="<html>502 Bad Gateway</html>")
    with pytest.raises(TaskSourceError, match="not JSON"):
        await fetch(GitHubQuery(), fake_gh)


@pytest.mark.anyio
async def test_gh_too_slow(fake_gh: FakeGh) -> None:
    fake_gh.configure(sleep=30)
    with pytest.raises(TaskSourceError, match=r"did not finish within 0\.5 s"):
        await fetch(GitHubQuery(), fake_gh, timeout=0.5)


# -- numbers and titles no run could take --------------------------------------------------


def test_select_skips_issue_numbers_no_issue_has() -> None:
    issues = json.dumps([issue(0), issue(-3), issue(5)])
    with capture_logs() as logs:
        assert select_tasks(issues, "[]", GitHubQuery()) == [SourcedTask(5, "Issue 5")]
    warned = [entry["event"] for entry in logs if entry["log_level"] == "warning"]
    assert len(warned) == 2 and "number 0" in warned[0] and "number -3" in warned[1]


def test_up_skips_bad_github_issues_with_a_warning(fleet: Harness, fake_gh: FakeGh) -> None:
    """Issue 0, a NUL in a title, a title too long for a run's environment: each is left out
    with one warning line naming it; the good issue runs; no traceback, exit 0."""
    fake_gh.configure(
        issues=[issue(0), issue(6, "nul \0 here"), issue(7, "x" * 140_000), issue(8, "fine")]
    )
    config = fleet.config([])
    config["tasks"] = {"source": "github", "gh": str(fake_gh.path)}
    result = fleet.run(fleet.write(config))
    assert result.returncode == 0, result.explain()
    assert "Traceback" not in result.stderr
    assert [r["issue"] for r in fleet.agent_records("start")] == [8]
    warnings = [line for line in result.stderr.splitlines() if ": warning: " in line]
    assert len(warnings) == 3, result.stderr
    assert "number 0" in warnings[0]
    assert "#6" in warnings[1] and "NUL" in warnings[1]
    assert "#7" in warnings[2] and "MAX_ARG_STRLEN" in warnings[2]
