"""Tests of scripts/fake-agent: real processes in real git worktrees."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from conftest import clean_env, git, make_origin

AGENT = Path(__file__).resolve().parent.parent / "scripts" / "fake-agent"
ISSUE = 7
TIMEOUT = 20


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    """A bare clone NAME.git with the worktree trees/issue-7 on branch issue-7, as `wt` makes."""
    origin = make_origin(tmp_path / "origin")
    bare = tmp_path / "demo.git"
    git(tmp_path, "clone", "-q", "--bare", str(origin), str(bare))
    git(bare, "worktree", "add", "-q", "-b", f"issue-{ISSUE}", f"trees/issue-{ISSUE}", "main")
    return bare / "trees" / f"issue-{ISSUE}"


def agent_env(workdir: Path, plan: str, run: int = 1, **extra: str) -> dict[str, str]:
    env = clean_env()
    env.update(
        AGENTIZE_FLEET_ISSUE=str(ISSUE),
        AGENTIZE_FLEET_RUN=str(run),
        AGENTIZE_FLEET_WORKSPACE=str(workdir),
        FAKE_AGENT_PLAN=plan,
        FAKE_AGENT_STEP_DELAY="0",
        GIT_CEILING_DIRECTORIES=str(workdir.parent),
    )
    env.update(extra)
    return env


def run_agent(
    workdir: Path,
    plan: str,
    *args: str,
    run: int = 1,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    full_env = agent_env(workdir, plan, run)
    full_env.update(env or {})
    return subprocess.run(
        [str(AGENT), *args],
        cwd=workdir,
        env=full_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )


def subjects(workdir: Path) -> list[str]:
    return git(workdir, "log", "--format=%s").splitlines()


class Running:
    """An agent started in a session of its own (as runner.sh does), output to files."""

    def __init__(self, workdir: Path, plan: str, out_dir: Path) -> None:
        self.stdout = out_dir / "stdout"
        self.stderr = out_dir / "stderr"
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [str(AGENT), "go"],
                cwd=workdir,
                env=agent_env(workdir, plan),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.pgid = self.proc.pid

    def wait_for(self, text: str, count: int = 1, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.stdout.read_text(errors="replace")
            if data.count(text) >= count:
                return data
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{text!r} x{count} not seen; stdout: {self.stdout.read_text()!r}")

    def printed_pids(self) -> list[int]:
        pids = []
        for line in self.stdout.read_text(errors="replace").splitlines():
            if "grandchild pid " in line:
                pids.append(int(line.rsplit(" ", 1)[1]))
        return pids

    def kill_all(self) -> None:
        """SIGKILL the agent, the pids it printed (if still in its group) and its group."""
        for pid in [self.proc.pid, *self.printed_pids()]:
            try:
                if os.getpgid(pid) == self.pgid:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(timeout=TIMEOUT)


@pytest.fixture
def running(tmp_path: Path, worktree: Path) -> Iterator[list[Running]]:
    started: list[Running] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.kill_all()


def start(running: list[Running], worktree: Path, plan: str) -> Running:
    out_dir = worktree.parent.parent / f"run-{len(running)}"
    out_dir.mkdir()
    agent = Running(worktree, plan, out_dir)
    running.append(agent)
    return agent


# --------------------------------------------------------------------------------------------


def test_finish_commits_and_exits_0(worktree: Path) -> None:
    done = run_agent(worktree, "finish", "implement it")
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert f"fake-agent: issue #{ISSUE} run 1 pid " in out
    assert out.count(f": working on issue #{ISSUE}") == 3
    assert "step 3/3: working on issue #7" in out
    assert out.rstrip().endswith("All tests passed (3/3)!")
    assert subjects(worktree) == [f"issue {ISSUE}: implement", "initial commit"]
    assert git(worktree, "status", "--porcelain") == ""
    work = (worktree / "fleet-work" / f"issue-{ISSUE}.txt").read_text().splitlines()
    assert len(work) == 4  # 3 steps + the implementation line
    assert git(worktree, "log", "-1", "--format=%an <%ae>") == (
        "fake-agent <fake-agent@example.invalid>\n"
    )


def test_milestones_then_delivery(worktree: Path) -> None:
    plan = "milestone,milestone,finish"
    folder = worktree / ".tmp" / "milestones"
    first = run_agent(worktree, plan, "Implement issue 7", run=1)
    assert first.returncode == 0, first.stderr
    assert b"Milestone 1 created at 812 LOC (1/3 tests passed)." in first.stdout
    assert b'Resume with: "Continue from the latest milestone"' in first.stdout
    m1 = folder / f"issue-{ISSUE}-milestone-1.md"
    text1 = m1.read_text()
    assert text1.startswith(
        f"# Milestone 1 for Issue #{ISSUE}\n\n**Test Status:** 1/3 tests passed\n"
    )
    for section in ("## Work Remaining", "## Next File Changes", "## Test Status"):
        assert section in text1

    second = run_agent(worktree, plan, "Continue from the latest milestone", run=2)
    assert second.returncode == 0, second.stderr
    assert b"Milestone 2 created at 812 LOC" in second.stdout
    assert (folder / f"issue-{ISSUE}-milestone-2.md").read_text().startswith("# Milestone 2 for")
    assert m1.read_text() == text1  # never rewritten
    assert subjects(worktree)[:2] == [
        f"[milestone] issue {ISSUE}: milestone 2",
        f"[milestone] issue {ISSUE}: milestone 1",
    ]
    assert not any(p.startswith(".tmp") for p in git(worktree, "ls-files").splitlines())
    assert git(worktree, "status", "--porcelain") == ""  # .tmp/ is excluded

    third = run_agent(worktree, plan, "Continue from the latest milestone", run=3)
    assert third.returncode == 0, third.stderr
    assert b"All tests passed (3/3)!" in third.stdout
    assert subjects(worktree)[0] == f"issue {ISSUE}: implement"
    # The last plan item repeats for later runs.
    fourth = run_agent(worktree, plan, run=4)
    assert fourth.returncode == 0 and b"All tests passed" in fourth.stdout


def test_crash_exit_code_and_plan_selection(worktree: Path) -> None:
    done = run_agent(worktree, "crash:3,finish", run=1)
    assert done.returncode == 3
    assert b"fake-agent: crashing with exit 3" in done.stderr
    assert subjects(worktree) == ["initial commit"]
    assert run_agent(worktree, "crash", run=1).returncode == 1
    assert run_agent(worktree, "crash:3,finish", run=2).returncode == 0


def test_flags_override_env(worktree: Path) -> None:
    done = run_agent(worktree, "finish", "--plan", "crash:9", "--steps=2", "prompt")
    assert done.returncode == 9
    assert done.stdout.count(b": working on issue") == 2
    assert json.loads(done.stdout.split(b"argv=", 1)[1].split(b"\n", 1)[0]) == [
        "--plan",
        "crash:9",
        "--steps=2",
        "prompt",
    ]


def test_stderr_modifier_and_sleep(worktree: Path) -> None:
    began = time.monotonic()
    done = run_agent(worktree, "stderr+sleep:0.3+exit:0", env={"FAKE_AGENT_STEPS": "2"})
    assert time.monotonic() - began >= 0.3
    assert done.returncode == 0
    assert done.stderr.decode().splitlines() == ["step 1/2 (stderr)", "step 2/2 (stderr)"]
    assert subjects(worktree) == ["initial commit"]


def test_bad_plans_and_not_a_repository(worktree: Path, tmp_path: Path) -> None:
    done = run_agent(worktree, "finish+explode")
    assert done.returncode == 64
    assert b"unknown action 'explode'" in done.stderr
    assert run_agent(worktree, "finish,crash:x").returncode == 64  # any bad item fails
    assert run_agent(worktree, "finish+crash").returncode == 64  # two final actions
    plain = tmp_path / "plain"
    plain.mkdir()
    done = run_agent(plain, "finish")
    assert done.returncode == 65
    assert b"not a git work tree" in done.stderr
    # Actions without git work do not need a repository.
    assert run_agent(plain, "crash:4").returncode == 4
    # Never commits into an enclosing repository from a subdirectory.
    sub = worktree / "sub"
    sub.mkdir()
    done = run_agent(sub, "finish", env={"GIT_CEILING_DIRECTORIES": str(tmp_path)})
    assert done.returncode == 65
    assert b"not the top of a git work tree" in done.stderr
    assert subjects(worktree) == ["initial commit"]


def test_sigterm_kills_with_143(running: list[Running], worktree: Path) -> None:
    agent = start(running, worktree, "hang")
    agent.wait_for("step 3/3")
    time.sleep(0.05)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=TIMEOUT) == -signal.SIGTERM


def test_ignore_term_needs_sigkill(running: list[Running], worktree: Path) -> None:
    agent = start(running, worktree, "ignore-term+hang")
    agent.wait_for("fake-agent: ignoring SIGTERM")
    agent.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert agent.proc.poll() is None
    agent.proc.send_signal(signal.SIGKILL)
    assert agent.proc.wait(timeout=TIMEOUT) == -signal.SIGKILL


def test_grandchildren_stay_in_the_agent_group(running: list[Running], worktree: Path) -> None:
    agent = start(running, worktree, "grandchildren:2+hang")
    agent.wait_for("fake-agent: grandchild pid", count=2)
    agent.wait_for("fake-agent: grand-grandchild pid")
    pids = agent.printed_pids()
    assert len(pids) == 3
    for pid in pids:
        assert os.getpgid(pid) == os.getpgid(agent.proc.pid) == agent.pgid
    # The agent has not waited for them: it is running its steps / hanging.
    agent.wait_for("step 3/3")
    assert agent.proc.poll() is None


def test_flood_prints_exact_lines(worktree: Path) -> None:
    done = run_agent(worktree, "flood:1000")
    assert done.returncode == 0
    lines = done.stdout.splitlines(keepends=True)
    flood = [line for line in lines if line.startswith(b"w7 l")]
    assert len(flood) == 1000
    assert all(len(line) == 100 and line.endswith(b"x\n") for line in flood)
    assert [int(line.split()[1][1:]) for line in flood] == list(range(1000))
    assert len(lines) == 1002  # the two header lines, no steps
    assert subjects(worktree) == ["initial commit"]
    assert not (worktree / "fleet-work").exists()


def test_shell_metacharacters_arrive_as_one_argument(worktree: Path, tmp_path: Path) -> None:
    title = "Fix \"; rm -rf ~ `touch pwned` $(touch pwned) | & ; 'quoted' \\ end"
    record = tmp_path / "record.jsonl"
    done = run_agent(worktree, "exit", title, env={"FAKE_AGENT_RECORD": str(record)})
    assert done.returncode == 0
    line = done.stdout.decode().splitlines()[1]
    assert line.startswith("fake-agent: argv=")
    assert json.loads(line.removeprefix("fake-agent: argv=")) == [title]
    assert json.loads(record.read_text().splitlines()[0])["argv"] == [title]
    assert not (worktree / "pwned").exists()


def test_record_file_start_and_end(worktree: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    before = time.time()
    done = run_agent(worktree, "finish", "p", "--record", str(record))
    assert done.returncode == 0
    start_rec, end_rec = (json.loads(line) for line in record.read_text().splitlines())
    assert start_rec["event"] == "start" and end_rec["event"] == "end"
    for rec in (start_rec, end_rec):
        assert rec["issue"] == ISSUE and rec["run"] == 1 and rec["action"] == "finish"
        assert rec["argv"] == ["p", "--record", str(record)]
        assert os.path.realpath(rec["cwd"]) == os.path.realpath(worktree)
        assert before <= rec["t"] <= time.time()
    assert start_rec["pid"] == end_rec["pid"]
    assert "exit" not in start_rec and end_rec["exit"] == 0
    assert start_rec["t"] <= end_rec["t"]

    done = run_agent(worktree, "crash:3", env={"FAKE_AGENT_RECORD": str(record)})
    assert json.loads(record.read_text().splitlines()[-1])["exit"] == 3


def test_concurrent_records_do_not_interleave(worktree: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    env = agent_env(worktree, "exit", FAKE_AGENT_RECORD=str(record), FAKE_AGENT_STEPS="0")
    procs = [
        subprocess.Popen(
            [str(AGENT), "x" * 2000],
            cwd=worktree,
            env={**env, "AGENTIZE_FLEET_RUN": str(i + 1)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        for i in range(8)
    ]
    try:
        assert all(p.wait(timeout=TIMEOUT) == 0 for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=TIMEOUT)
    records = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(records) == 16
    assert sorted(r["run"] for r in records if r["event"] == "end") == list(range(1, 9))


def test_badutf8_writes_invalid_bytes_then_finishes(worktree: Path) -> None:
    done = run_agent(worktree, "badutf8")
    assert done.returncode == 0
    assert b"bad: \xff\xfe \xc3\x28 end\n" in done.stdout
    assert "split: café 🚀 end\n".encode() in done.stdout
    with pytest.raises(UnicodeDecodeError):
        done.stdout.decode()
    assert subjects(worktree)[0] == f"issue {ISSUE}: implement"


def test_longline_without_newline(worktree: Path) -> None:
    size = 3_000_000
    done = run_agent(worktree, "longline:3000000+exit", "--steps", "0")
    assert done.returncode == 0
    assert done.stdout.endswith(b"]\n" + b"a" * size)  # right after the argv line, no newline
    assert subjects(worktree) == ["initial commit"]
    done = run_agent(worktree, "longline:1000")  # then finishes
    assert done.returncode == 0
    assert b"a" * 1000 + b"All tests passed (3/3)!\n" in done.stdout
    assert b"a" * 1001 not in done.stdout


def test_usage_limit_message(worktree: Path) -> None:
    now = time.time()
    done = run_agent(worktree, "usage-limit:3600", "--steps", "0")
    assert done.returncode == 1
    lines = done.stdout.decode().splitlines()
    limit = next(line for line in lines if line.startswith("Claude AI usage limit reached|"))
    epoch = int(limit.split("|")[1])
    assert now + 3590 <= epoch <= time.time() + 3610
    assert any(line.startswith("5-hour limit reached ∙ resets ") for line in lines)


def test_lint_clean() -> None:
    root = AGENT.parent.parent
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff not installed next to this python")
    done = subprocess.run(
        [str(ruff), "check", str(AGENT)], cwd=root, capture_output=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stdout.decode()
    assert os.access(AGENT, os.X_OK)
