"""The protocol doubles (scripts/fake-claude, fake-codex, fake-gemini) driven through the agent
kinds themselves: each run is started with the kind's own argument list and judged by the
kind's own reader, in a real git worktree laid out as ``wt`` lays it out.  So these tests check
both sides: the doubles speak the documented protocols, and the kinds start and read them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import pytest
from conftest import git

from supervisor.agents import Launch, Outcome, RunFacts, Session, Verdict, get_kind
from supervisor.agents.base import NEW_SESSION
from supervisor.agents.render import render_line
from tests.test_fake_agent import ISSUE, agent_env, worktree  # noqa: F401  (the fixture)

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TIMEOUT = 20
PROTOCOLS = ("claude", "codex", "gemini")
COST_PER_TURN = 0.015625


@dataclass
class Ran:
    launch: Launch
    code: int
    stdout: bytes
    stderr: bytes
    facts: RunFacts
    verdict: Verdict


def _env(workdir: Path, plan: str, run: int, extra: Mapping[str, str]) -> dict[str, str]:
    return agent_env(workdir, plan, run, **extra)


def run_kind(
    kind: str,
    workdir: Path,
    plan: str,
    session: Session = NEW_SESSION,
    *,
    run: int = 1,
    git_dir: str | None = None,
    env: Mapping[str, str] | None = None,
    command: list[str] | None = None,
) -> Ran:
    """One run of ``kind``'s double, started and judged as the worker will."""
    agent = get_kind(kind)
    launch = agent.launch(
        command or [str(SCRIPTS / f"fake-{kind}")], "implement it", session, git_dir=git_dir
    )
    done = subprocess.run(
        launch.argv,
        cwd=workdir,
        env={**_env(workdir, plan, run, env or {}), **launch.env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    reader = agent.reader(launch, tz=UTC)
    reader.feed("stdout", done.stdout.removesuffix(b"\n"))
    reader.feed("stderr", done.stderr.removesuffix(b"\n"))
    verdict = reader.verdict(done.returncode, time.time())
    return Ran(launch, done.returncode, done.stdout, done.stderr, reader.facts, verdict)


def subjects(workdir: Path) -> list[str]:
    return git(workdir, "log", "--format=%s").splitlines()


@pytest.mark.parametrize("kind", PROTOCOLS)
def test_finish_is_done_with_session_cost_and_tokens(kind: str, worktree: Path) -> None:
    git_dir = str(worktree.parent.parent)  # the bare clone: NAME.git
    ran = run_kind(
        kind,
        worktree,
        "finish",
        Session(new_id="8c9e3b51-2d1f-4f6a-9a57-3e0c1d2b4f60"),
        git_dir=git_dir,
    )
    assert ran.code == 0, ran.stderr
    assert ran.verdict.outcome is Outcome.DONE, ran.verdict
    assert ran.facts.session_id
    if kind == "claude":
        assert ran.facts.session_id == "8c9e3b51-2d1f-4f6a-9a57-3e0c1d2b4f60"  # pinned
        assert ran.facts.turns == 4
        assert ran.facts.cost_usd == 4 * COST_PER_TURN
    else:
        assert ran.facts.cost_usd is None
    assert ran.facts.tokens.output == 200  # 50 a turn, 3 steps + the last turn
    assert ran.facts.malformed == 0
    assert ran.facts.last_text == "All tests passed (3/3)!"
    assert subjects(worktree)[0] == f"issue {ISSUE}: implement"
    # Every line of the protocol is shown to people without error; the tool calls as one-liners.
    shown = [render_line(line) for line in ran.stdout.decode().splitlines()]
    assert "Bash: echo 'step 1/3'" in shown
    assert any(s is not None and s.startswith("✓ done") for s in shown) is (kind != "codex")


@pytest.mark.parametrize("kind", PROTOCOLS)
def test_crash_mid_session_then_resume_in_the_same_worktree(kind: str, worktree: Path) -> None:
    first = run_kind(kind, worktree, "crash,finish")
    assert first.code == 1
    assert first.verdict.outcome is Outcome.CRASHED
    assert first.verdict.reason == "no result event (exit 1)"
    sid = first.facts.session_id
    assert sid is not None
    second = run_kind(kind, worktree, "crash,finish", Session(resume=sid), run=2)
    assert second.launch.resuming
    assert second.verdict.outcome is Outcome.DONE, second.stderr
    if kind == "claude":
        assert second.facts.session_id not in (None, sid)  # re-read: a resumed session's new id
    else:
        assert second.facts.session_id == sid


@pytest.mark.parametrize("kind", PROTOCOLS)
def test_resume_from_another_directory_is_refused(
    kind: str,
    worktree: Path,
    tmp_path: Path,
) -> None:
    store = {"FAKE_AGENT_SESSIONS": str(tmp_path / "sessions")}
    first = run_kind(kind, worktree, "crash", env=store)
    sid = first.facts.session_id
    assert sid is not None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    refused = run_kind(kind, elsewhere, "finish", Session(resume=sid), env=store)
    assert refused.code == 1
    assert refused.verdict.outcome is Outcome.RESUME_REFUSED, refused.stderr
    assert sid in refused.verdict.reason
    # Unknown anywhere, with the default per-worktree store too.
    unknown = run_kind(kind, worktree, "finish", Session(resume="0000-unknown"))
    assert unknown.verdict.outcome is Outcome.RESUME_REFUSED


@pytest.mark.parametrize("kind", PROTOCOLS)
@pytest.mark.parametrize("no_result", [False, True])
def test_usage_limit_holds_until_the_reset(kind: str, no_result: bool, worktree: Path) -> None:
    began = time.time()
    ran = run_kind(kind, worktree, "usage-limit:7200" + ("+no-result" if no_result else ""))
    assert ran.code == 1
    assert ran.verdict.outcome is Outcome.USAGE_LIMITED, (ran.verdict, ran.stdout, ran.stderr)
    assert ran.verdict.reset_at is not None
    # claude gives resetsAt; codex and gemini a time to the minute
    assert began + 7200 - 120 <= ran.verdict.reset_at <= time.time() + 7200
    if kind == "claude":
        assert ran.verdict.window == "five_hour"
        assert ran.verdict.line is not None and '"rejected"' in ran.verdict.line
    assert (ran.facts.result is None) is no_result


@pytest.mark.parametrize(("kind", "code"), [("claude", 0), ("codex", 0), ("gemini", 1)])
def test_api_error_is_transient_whatever_the_exit(kind: str, code: int, worktree: Path) -> None:
    ran = run_kind(kind, worktree, "api-error")
    assert ran.code == code
    assert ran.verdict.outcome is Outcome.RATE_LIMITED, ran.verdict


@pytest.mark.parametrize(
    ("kind", "plan", "code"),
    [
        ("claude", "max-turns", 1),
        ("claude", "max-budget", 1),
        ("gemini", "max-turns", 53),
    ],
)
def test_turn_and_budget_limits_fail(kind: str, plan: str, code: int, worktree: Path) -> None:
    ran = run_kind(kind, worktree, plan)
    assert ran.code == code
    assert ran.verdict.outcome is Outcome.FAILED, ran.verdict


def test_parts_a_protocol_does_not_have_are_refused(worktree: Path) -> None:
    assert run_kind("codex", worktree, "max-turns").code == 64
    assert run_kind("gemini", worktree, "splice+finish").code == 64
    plain = subprocess.run(
        [str(SCRIPTS / "fake-agent")],
        cwd=worktree,
        capture_output=True,
        env=_env(worktree, "api-error", 1, {}),
        timeout=TIMEOUT,
        check=False,
    )
    assert plain.returncode == 64 and b"without a protocol" in plain.stderr


def test_claude_refuses_what_the_cli_refuses(worktree: Path) -> None:
    claude = str(SCRIPTS / "fake-claude")

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [claude, *args],
            cwd=worktree,
            capture_output=True,
            env=_env(worktree, "finish", 1, {}),
            timeout=TIMEOUT,
            check=False,
        )

    no_verbose = run("-p", "--output-format", "stream-json", "--", "x")
    assert no_verbose.returncode == 1 and no_verbose.stdout == b""
    assert (
        b"Error: When using --print, --output-format=stream-json requires --verbose"
        in no_verbose.stderr
    )
    both = run(
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--session-id",
        "8c9e3b51-2d1f-4f6a-9a57-3e0c1d2b4f60",
        "--resume",
        "x",
        "--",
        "x",
    )
    assert both.returncode == 1 and b"--fork-session" in both.stderr
    bad_id = run(
        "-p", "--output-format", "stream-json", "--verbose", "--session-id", "nope", "--", "x"
    )
    assert bad_id.returncode == 1 and b"Must be a valid UUID" in bad_id.stderr
    assert run("--output-format", "stream-json", "--verbose", "x").returncode == 2  # no -p
    assert subjects(worktree) == ["initial commit"]


def test_claude_spliced_rejection_is_salvaged_and_a_clean_finish_still_wins(
    worktree: Path,
) -> None:
    ran = run_kind("claude", worktree, "splice:600+crash")
    assert ran.facts.malformed == 1
    assert ran.verdict.outcome is Outcome.USAGE_LIMITED
    clean = run_kind("claude", worktree, "splice:600+compact+finish")
    assert clean.verdict.outcome is Outcome.DONE
    assert clean.facts.rejections and clean.facts.compactions == 1


def test_codex_commits_in_a_worktree_only_with_the_bare_clone_writable(
    worktree: Path,
) -> None:
    """A linked worktree's git metadata lives in the bare clone, outside the workspace-write
    sandbox (sipyourdrink-ltd/bernstein#5375): the kind adds it as a writable root."""
    blocked = run_kind("codex", worktree, "finish")  # no git_dir: nothing added
    assert blocked.verdict.outcome is Outcome.DONE  # the turn completes ...
    assert subjects(worktree) == ["initial commit"]  # ... without the commit
    assert b"Operation not permitted" in blocked.stdout
    allowed = run_kind("codex", worktree, "finish", git_dir=str(worktree.parent.parent))
    assert allowed.verdict.outcome is Outcome.DONE
    assert subjects(worktree)[0] == f"issue {ISSUE}: implement"
    read_only = run_kind(
        "codex",
        worktree,
        "finish",
        git_dir=str(worktree.parent.parent),
        command=[str(SCRIPTS / "fake-codex"), "--sandbox", "read-only"],
    )
    assert b"Operation not permitted" in read_only.stdout


def test_gemini_trust_comes_from_the_kinds_environment(worktree: Path) -> None:
    trusting = run_kind("gemini", worktree, "finish", env={"FAKE_AGENT_FOLDER_TRUST": "1"})
    assert trusting.verdict.outcome is Outcome.DONE
    gemini = get_kind("gemini")
    launch = gemini.launch([str(SCRIPTS / "fake-gemini")], "x")
    untrusted = subprocess.run(  # the same run without the kind's environment
        launch.argv,
        cwd=worktree,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
        env=_env(worktree, "finish", 1, {"FAKE_AGENT_FOLDER_TRUST": "1"}),
    )
    assert untrusted.returncode == 52 and b"FatalUntrustedWorkspaceError" in untrusted.stderr


@pytest.mark.parametrize("kind", PROTOCOLS)
def test_milestone_in_a_protocol(kind: str, worktree: Path) -> None:
    ran = run_kind(kind, worktree, "milestone", git_dir=str(worktree.parent.parent))
    assert ran.verdict.outcome is Outcome.DONE  # the worker's milestone check decides
    assert (worktree / ".tmp" / "milestones" / f"issue-{ISSUE}-milestone-1.md").exists()
    assert ran.facts.last_text is not None
    assert ran.facts.last_text.endswith('Resume with: "Continue from the latest milestone"')
    assert git(worktree, "status", "--porcelain") == ""  # sessions kept under .tmp/ (excluded)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)


@pytest.mark.parametrize("kind", PROTOCOLS)
def test_a_session_killed_mid_way_can_be_resumed(
    kind: str,
    worktree: Path,
    tmp_path: Path,
    started: list[subprocess.Popen[bytes]],
) -> None:
    agent = get_kind(kind)
    launch = agent.launch([str(SCRIPTS / f"fake-{kind}")], "implement it")
    out = tmp_path / "out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            launch.argv,
            cwd=worktree,
            stdout=sink,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**_env(worktree, "hang,finish", 1, {}), **launch.env},
        )
    started.append(proc)
    deadline = time.monotonic() + TIMEOUT
    while b"step 3/3" not in out.read_bytes():
        assert time.monotonic() < deadline and proc.poll() is None, out.read_bytes()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    reader = agent.reader(launch)
    reader.feed("stdout", out.read_bytes().removesuffix(b"\n"))
    verdict = reader.verdict(128 + signal.SIGKILL, time.time())
    assert verdict.outcome is Outcome.CRASHED and "killed by signal 9" in verdict.reason
    sid = reader.facts.session_id
    assert sid is not None
    resumed = run_kind(kind, worktree, "hang,finish", Session(resume=sid), run=2)
    assert resumed.verdict.outcome is Outcome.DONE


def test_records_say_which_session_a_run_used(worktree: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    env = {"FAKE_AGENT_RECORD": str(record)}
    first = run_kind("codex", worktree, "crash,finish", env=env)
    run_kind(
        "codex", worktree, "crash,finish", Session(resume=first.facts.session_id), run=2, env=env
    )
    ends = [
        json.loads(line)
        for line in record.read_text().splitlines()
        if json.loads(line)["event"] == "end"
    ]
    assert [e["resumed"] for e in ends] == [None, first.facts.session_id]
    assert ends[0]["session"] == ends[1]["session"] == first.facts.session_id
    assert ends[0]["protocol"] == "codex" and ends[0]["prompt"] == "implement it"
