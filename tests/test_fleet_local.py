"""End-to-end tests of a local fleet: the real ``agentize-fleet up``, real git, the fake agent.

Each test is bounded: the CLI runs as a subprocess with a timeout, every wait polls against a
deadline, and the ``fleet`` fixture kills whatever the test started.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest
from conftest import AGENT, Harness, Started, git, proc_gone, task, wait_for

RESUME = "Continue from the latest milestone"


# -- the cap ------------------------------------------------------------------------------------


def test_global_cap_is_never_exceeded(fleet: Harness) -> None:
    tasks = [task(n, "finish") for n in range(1, 9)]
    result = fleet.run_config(
        tasks,
        concurrency=3,
        agent={"env": {"FAKE_AGENT_STEPS": "4", "FAKE_AGENT_STEP_DELAY": "0.1"}},
    )
    assert result.returncode == 0, result.explain()
    assert not result.leftovers, "processes outlived the fleet"
    assert len(fleet.agent_records("start")) == 8
    assert len(fleet.agent_records("end")) == 8
    assert fleet.max_concurrent() == 3  # never more, and the cap was actually reached
    assert {w["state"] for w in result.summary["workers"]} == {"done"}
    assert result.summary["peak_running"] <= 3


def test_per_machine_cap_is_never_exceeded(fleet: Harness) -> None:
    tasks = [task(n, "finish") for n in range(1, 7)]
    result = fleet.run_config(
        tasks,
        concurrency=3,
        local={"max_agents": 2},
        agent={"env": {"FAKE_AGENT_STEPS": "4", "FAKE_AGENT_STEP_DELAY": "0.1"}},
    )
    assert result.returncode == 0, result.explain()
    assert len(fleet.agent_records("end")) == 6
    assert fleet.max_concurrent() == 2
    assert result.summary["peak_running"] <= 2


def test_an_unusable_state_directory_is_exit_2_with_the_path_and_the_fix(fleet: Harness) -> None:
    """It was a traceback and exit 1; nothing may start before the ledger can be written."""
    blocker = fleet.tmp / "state-is-a-file"
    blocker.write_text("in the way\n")
    result = fleet.run_config([task(1, "finish")], state_dir=str(blocker))
    assert result.returncode == 2, result.explain()
    assert "Traceback" not in result.stderr
    assert str(blocker) in result.stderr and "is not a directory" in result.stderr
    assert "fix:" in result.stderr
    assert fleet.agent_records() == []


def test_a_ledger_of_a_newer_version_is_exit_2_and_starts_nothing(fleet: Harness) -> None:
    config = fleet.write(fleet.config([task(1, "finish")]))
    assert fleet.run(config).returncode == 0
    db = sqlite3.connect(fleet.state_dir / "ledger.sqlite3")
    db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    shifts = sorted((fleet.state_dir / "runs").iterdir())
    result = fleet.run(config, "--fresh")
    assert result.returncode == 2, result.explain()
    assert "newer agentize-fleet" in result.stderr and "Traceback" not in result.stderr
    assert sorted((fleet.state_dir / "runs").iterdir()) == shifts
    assert len(fleet.agent_records("start")) == 1


def test_the_state_directory_is_private(fleet: Harness) -> None:
    fleet.state_dir.mkdir(mode=0o755)
    fleet.state_dir.chmod(0o755)
    result = fleet.run_config([task(1, "finish")])
    assert result.returncode == 0, result.explain()
    assert stat.S_IMODE(fleet.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((fleet.state_dir / "ledger.sqlite3").stat().st_mode) == 0o600
    shift = json.loads((result.run_dir / "shift.json").read_text())
    assert shift["pid"] > 0 and shift["id"] == result.run_dir.name
    assert shift["workers"] == [{"worker": "w1", "task": 1}]


# -- milestones ---------------------------------------------------------------------------------


def test_milestone_resume_in_the_same_worktree(fleet: Harness) -> None:
    issue = 4
    result = fleet.run_config([task(issue, "milestone,milestone,finish"), task(5, "finish")])
    assert result.returncode == 0, result.explain()
    assert not result.leftovers, "processes outlived the fleet"

    clone = fleet.workspace_root / "origin.git"
    tree = clone / "trees" / f"issue-{issue}"
    runs = fleet.runs_of(issue)
    assert [r["run"] for r in runs] == [1, 2, 3]
    assert {r["cwd"] for r in runs} == {os.path.realpath(tree)}
    assert runs[0]["argv"] == [f"/issue-to-impl {issue}"]
    assert runs[1]["argv"] == [RESUME]
    assert runs[2]["argv"] == [RESUME]

    summary = result.task_summary(issue)
    assert summary["state"] == "done"
    assert summary["runs"] == 3
    assert summary["milestones"] == 2
    assert summary["crashes"] == 0
    assert Path(summary["workspace"]).resolve() == tree.resolve()

    # Agentize's layout: a bare clone with trees/main and trees/issue-N on branch issue-N.
    assert git(clone, "rev-parse", "--is-bare-repository").strip() == "true"
    assert (clone / "trees" / "main" / "README.md").is_file()
    listed = git(clone, "worktree", "list", "--porcelain")
    assert f"worktree {os.path.realpath(clone / 'trees' / 'main')}\n" in listed
    assert git(tree, "rev-parse", "--abbrev-ref", "HEAD").strip() == f"issue-{issue}"
    subjects = git(tree, "log", "--format=%s", f"main..issue-{issue}").splitlines()
    assert subjects == [
        f"issue {issue}: implement",
        f"[milestone] issue {issue}: milestone 2",
        f"[milestone] issue {issue}: milestone 1",
    ]
    for m in (1, 2):
        assert (tree / ".tmp" / "milestones" / f"issue-{issue}-milestone-{m}.md").is_file()

    milestone_events = [e for e in result.events("milestone") if e["task"] == issue]
    assert len(milestone_events) == 2
    assert result.task_summary(5)["runs"] == 1
    result.assert_seq_gapless()


def test_crash_after_a_milestone_resumes_from_it(fleet: Harness) -> None:
    result = fleet.run_config([task(6, "milestone,crash:3,finish")])
    assert result.returncode == 0, result.explain()
    runs = fleet.runs_of(6)
    assert [r["argv"] for r in runs] == [["/issue-to-impl 6"], [RESUME], [RESUME]]
    summary = result.task_summary(6)
    assert (summary["state"], summary["runs"], summary["milestones"], summary["crashes"]) == (
        "done",
        3,
        1,
        1,
    )


def test_milestone_cap_fails_the_task(fleet: Harness) -> None:
    result = fleet.run_config(
        [task(8, "milestone"), task(9, "finish")], restart={"max_milestones": 2}
    )
    assert result.returncode == 1, result.explain()
    assert len(fleet.runs_of(8)) == 3  # 2 resumes allowed; the 3rd milestone is one too many
    summary = result.task_summary(8)
    assert summary["state"] == "failed"
    assert summary["crashes"] == 0
    assert [e["task"] for e in result.events("gave-up")] == [8]
    assert result.task_summary(9)["state"] == "done"


def test_a_done_task_is_not_run_again_unless_asked_and_then_in_its_worktree(
    fleet: Harness,
) -> None:
    config = fleet.write(fleet.config([task(3, "finish")]))
    first = fleet.run(config)
    assert first.returncode == 0, first.explain()
    tree = fleet.workspace_root / "origin.git" / "trees" / "issue-3"
    (tree / "scratch.txt").write_text("left by the first fleet\n")

    # The ledger remembers: the next `up` (cron's, say) does not spend a run on it again.
    second = fleet.run(config)
    assert second.returncode == 0, second.explain()
    assert [r["run"] for r in fleet.runs_of(3)] == [1]
    (said,) = second.events("task-done-before")
    assert "not started again" in said["line"] and "--rerun 3" in said["line"], said
    assert second.task_summary(3)["state"] == "done"

    # Asked to, it runs again, in the same worktree, as run 2 (numbers go on across shifts).
    third = fleet.run(config, "--rerun", "3")
    assert third.returncode == 0, third.explain()
    assert [r["run"] for r in fleet.runs_of(3)] == [1, 2]
    assert {r["cwd"] for r in fleet.runs_of(3)} == {os.path.realpath(tree)}
    assert (tree / "scratch.txt").read_text() == "left by the first fleet\n"
    subjects = git(tree, "log", "--format=%s", "main..issue-3").splitlines()
    assert subjects == ["issue 3: implement", "issue 3: implement"]
    assert third.task_summary(3)["runs"] == 2

    # --fresh starts every listed task anew; --rerun of a task the config lacks is refused.
    fourth = fleet.run(config, "--fresh")
    assert fourth.returncode == 0 and [r["run"] for r in fleet.runs_of(3)] == [1, 2, 3]
    refused = fleet.run(config, "--rerun", "99")
    assert refused.returncode == 2 and "no task #99" in refused.stderr, refused.explain()


def test_start_interval_spaces_agent_starts(fleet: Harness) -> None:
    interval = 0.4
    result = fleet.run_config(
        [task(n, "finish") for n in range(1, 5)],
        concurrency=4,
        local={"max_agents": 4},
        start_interval=interval,
    )
    assert result.returncode == 0, result.explain()
    assert len(fleet.agent_records("end")) == 4
    # When each agent process was created: the run wrapper's pid file ("PID START_TICKS"), in
    # clock ticks since boot -- unlike the agent's own start record, free of interpreter
    # start-up jitter.
    hz = os.sysconf("SC_CLK_TCK")
    pid_files = list(result.run_dir.glob("agents/*/run-*/pid"))
    assert len(pid_files) == 4
    starts = sorted(int(p.read_text().split()[1]) / hz for p in pid_files)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= interval - 0.05, gaps


# -- crashes ------------------------------------------------------------------------------------


def test_crash_loop_fails_after_intensity_limit(fleet: Harness) -> None:
    result = fleet.run_config(
        [task(1, "finish"), task(2, "crash:1"), task(3, "finish")],
        restart={"max_crashes": 2, "crash_window": 60, "backoff_base": 0.01, "backoff_max": 0.05},
    )
    assert result.returncode == 1, result.explain()
    assert not result.leftovers, "processes outlived the fleet"
    assert [r["run"] for r in fleet.runs_of(2)] == [1, 2, 3]
    assert [r["exit"] for r in fleet.agent_records("end") if r["issue"] == 2] == [1, 1, 1]

    summary = result.summary
    assert summary["exit_code"] == 1
    failed = result.task_summary(2)
    assert failed["state"] == "failed"
    assert failed["runs"] == 3
    assert failed["crashes"] == 3
    assert failed["reason"]
    for issue in (1, 3):
        assert result.task_summary(issue)["state"] == "done"

    crashed = [e for e in result.events("crashed") if e["task"] == 2]
    gave_up = [e for e in result.events("gave-up") if e["task"] == 2]
    assert len(crashed) == 3
    assert all(e["exit_code"] == 1 for e in crashed)
    assert len(gave_up) == 1
    assert not [e for e in result.events("crashed") if e["task"] != 2]
    result.assert_seq_gapless()


def test_a_crash_restart_keeps_its_slot_through_a_short_backoff(fleet: Harness) -> None:
    """Under cap 1, "restarting in 0.3s" means that: the crashed task's next run comes before
    the tasks waiting for a slot (it used to queue behind all of them)."""
    result = fleet.run_config(
        [task(1, "crash:1,finish"), task(2, "finish"), task(3, "finish")],
        concurrency=1,
        restart={"backoff_base": 0.3, "backoff_max": 0.3},
    )
    assert result.returncode == 0, result.explain()
    order = [(r["issue"], r["run"]) for r in fleet.agent_records("start")]
    assert order == [(1, 1), (1, 2), (2, 1), (3, 1)], order
    (crashed,) = result.events("crashed")
    assert "restarting in" in crashed["line"] and "slot" not in crashed["line"], crashed


# -- stopping -----------------------------------------------------------------------------------


def _stop_config(fleet: Harness, stop_timeout: float) -> Path:
    tasks = [task(n, "grandchildren:2+hang") for n in (1, 2, 3)]
    tasks.append(task(4, "grandchildren:2+ignore-term+hang"))
    return fleet.write(
        fleet.config(
            tasks,
            concurrency=4,
            local={"max_agents": 4},
            stop_timeout=stop_timeout,
            agent={"env": {"FAKE_AGENT_STEPS": "0"}},
        )
    )


_PID_LINE = re.compile(r"^fake-agent: (?:grand-)?grandchild pid (\d+)$")


def _all_running(started: Started) -> dict[int, float] | None:
    """Every agent, grandchild and grand-grandchild pid (with create times) once all 4 are up."""
    if started.popen.poll() is not None:
        pytest.fail(f"the fleet ended early with {started.popen.returncode}")
    records = started.jsonl()
    pids: dict[int, list[int]] = defaultdict(list)
    ignoring = False
    for record in records:
        if record["stream"] != "stdout":
            continue
        if match := _PID_LINE.match(record["line"]):
            pids[record["task"]].append(int(match.group(1)))
        ignoring |= record["line"] == "fake-agent: ignoring SIGTERM"
    if not ignoring or sorted(pids) != [1, 2, 3, 4] or any(len(p) != 3 for p in pids.values()):
        return None
    found = [p for group in pids.values() for p in group]
    found += [r["pid"] for r in records if r.get("event") == "run-started"]
    return _with_create_times(found)


def _with_create_times(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            pytest.fail(f"process {pid} died before the stop")
    return out


def _wrapper_pids(started: Started) -> list[int]:
    return [
        int(p.read_text().split()[0])
        for p in started.state_dir.glob("runs/*/agents/*/run-*/wrapper")
    ]


def _alive(pids: dict[int, float]) -> list[int]:
    return [pid for pid, created in pids.items() if not proc_gone(pid, created)]


def _assert_stopped(
    fleet: Harness, started: Started, pids: dict[int, float], within: float, t0: float
) -> dict[int, float]:
    """All ``pids`` die within ``within`` s of ``t0``, then the fleet exits 130 with nothing left.

    Returns when each pid was first seen gone, in seconds after ``t0``.
    """
    died: dict[int, float] = {}
    deadline = t0 + within
    while len(died) < len(pids) and time.monotonic() < deadline:
        now = time.monotonic() - t0
        for pid in set(pids) - set(_alive(pids)):
            died.setdefault(pid, now)
        time.sleep(0.02)
    left = _alive(pids)
    assert not left, f"still alive {time.monotonic() - t0:.1f}s after the signal: {left}"
    result = started.wait(timeout=max(1.0, deadline - time.monotonic()) + 5)
    assert result.returncode == 130, result.explain()
    # Nothing of the test's processes is left: no agent, wrapper, watchdog or sleep.
    assert not result.leftovers, "processes outlived the fleet"
    stopped = {w["task"]: w["state"] for w in result.summary["workers"]}
    assert stopped == dict.fromkeys((1, 2, 3, 4), "stopped")
    assert result.summary["exit_code"] == 130
    return died


def _agent_pid(started: Started, issue: int) -> int:
    pids = [
        r["pid"] for r in started.jsonl() if r.get("event") == "run-started" and r["task"] == issue
    ]
    assert len(pids) == 1
    return int(pids[0])


def test_sigterm_stops_every_process_within_stop_timeout(fleet: Harness) -> None:
    stop_timeout = 2.0
    started = fleet.start(_stop_config(fleet, stop_timeout))
    pids = wait_for(lambda: _all_running(started), 20, "4 agents with their grandchildren")
    pids.update(_with_create_times(_wrapper_pids(started)))
    assert len(pids) == 4 * 5  # agent + 2 grandchildren + 1 grand-grandchild + wrapper, × 4
    stubborn = _agent_pid(started, 4)
    t0 = time.monotonic()
    os.kill(started.popen.pid, signal.SIGTERM)
    died = _assert_stopped(fleet, started, pids, stop_timeout + 2, t0)
    # SIGTERM first, SIGKILL only after stop_timeout: the agent ignoring SIGTERM outlives the
    # others by about stop_timeout.
    wrappers = set(_wrapper_pids(started))
    others = max(t for pid, t in died.items() if pid != stubborn and pid not in wrappers)
    assert others < stop_timeout - 0.5, died
    assert died[stubborn] > stop_timeout - 0.3, died


def test_sigint_stops_like_ctrl_c(fleet: Harness) -> None:
    stop_timeout = 2.0
    started = fleet.start(_stop_config(fleet, stop_timeout))
    pids = wait_for(lambda: _all_running(started), 20, "4 agents with their grandchildren")
    t0 = time.monotonic()
    # Ctrl-C: SIGINT to the terminal's foreground process group, i.e. the supervisor's.
    os.killpg(started.popen.pid, signal.SIGINT)
    _assert_stopped(fleet, started, pids, stop_timeout + 2, t0)


def test_second_sigint_skips_the_wait(fleet: Harness) -> None:
    stop_timeout = 20.0
    started = fleet.start(_stop_config(fleet, stop_timeout))
    pids = wait_for(lambda: _all_running(started), 20, "4 agents with their grandchildren")
    stubborn = _agent_pid(started, 4)
    t0 = time.monotonic()
    os.killpg(started.popen.pid, signal.SIGINT)
    # SIGTERM reaches everything; only the agent that ignores it is left, for stop_timeout.
    wait_for(lambda: _alive(pids) == [stubborn], 5, "everything but the stubborn agent to end")
    time.sleep(0.3)
    assert _alive(pids) == [stubborn]
    os.killpg(started.popen.pid, signal.SIGINT)
    _assert_stopped(fleet, started, pids, 4.0, t0)
    assert time.monotonic() - t0 < stop_timeout / 2


def test_stop_during_the_start_stagger_starts_no_more_agents(fleet: Harness) -> None:
    interval = 2.5
    started = fleet.start(
        fleet.write(
            fleet.config(
                [task(n, "hang") for n in (1, 2, 3)],
                start_interval=interval,
                stop_timeout=2,
                agent={"env": {"FAKE_AGENT_STEPS": "0"}},
            )
        )
    )
    wait_for(lambda: fleet.agent_records("start"), 20, "the first agent to start")
    t0 = time.monotonic()
    os.kill(started.popen.pid, signal.SIGTERM)
    result = started.wait(timeout=3 * interval + 10)
    took = time.monotonic() - t0
    assert result.returncode == 130, result.explain()
    events = [r.get("event") for r in result.records if r["stream"] == "fleet"]
    after_stop = events[events.index("stopping") :]
    assert "run-started" not in after_stop, "agents were started after the stop"
    assert sorted(w["runs"] for w in result.summary["workers"]) == [0, 0, 1]
    assert took < interval, f"`up` took {took:.1f}s to stop"


# -- output -------------------------------------------------------------------------------------


def test_no_line_is_lost_or_reordered(fleet: Harness) -> None:
    lines = 100_000
    issues = (1, 2, 3, 4)
    result = fleet.run_config(
        [task(n, f"flood:{lines}") for n in issues],
        "--quiet",
        concurrency=4,
        local={"max_agents": 4},
        agent={"env": {"FAKE_AGENT_STEPS": "0"}},
        timeout=90,
    )
    assert result.returncode == 0, result.explain()
    flood = re.compile(r"^w(\d+) l(\d{9}) x*$")
    seqs: dict[str, list[int]] = defaultdict(list)
    index: dict[int, int] = {}
    flood_records = 0
    stdout_records = 0
    for record in result.records:
        seqs[record["worker"]].append(record["seq"])
        if record["stream"] != "stdout":
            continue
        stdout_records += 1
        match = flood.match(record["line"])
        if match is None:
            assert record["line"].startswith("fake-agent: "), record
            continue
        flood_records += 1
        issue, i = int(match.group(1)), int(match.group(2))
        assert issue == record["task"], record
        assert len(record["line"]) == 99, record
        previous = index.get(issue, -1)
        assert i == previous + 1, f"worker of #{issue}: line {i} after {previous}"
        index[issue] = i
    assert flood_records == 4 * lines
    assert not [r for r in result.records if r["stream"] == "stderr"]
    assert stdout_records == 4 * lines + 4 * 2  # plus each run's two header lines
    assert index == dict.fromkeys(issues, lines - 1)
    workers = [w for w in seqs if w != "fleet"]
    assert len(workers) == 4
    for worker in [*workers, "fleet"]:
        assert seqs[worker] == list(range(1, len(seqs[worker]) + 1)), f"seq of {worker}"


@pytest.mark.parametrize("max_line_bytes", [None, 4096])
def test_odd_output_is_replaced_and_split(fleet: Harness, max_line_bytes: int | None) -> None:
    size = 3_000_000
    extra = {} if max_line_bytes is None else {"max_line_bytes": max_line_bytes}
    result = fleet.run_config([task(1, f"badutf8+longline:{size}+exit")], "--quiet", **extra)
    assert result.returncode == 0, result.explain()
    assert result.task_summary(1)["state"] == "done"
    out = [r["line"] for r in result.records if r["stream"] == "stdout"]
    assert "bad: \ufffd\ufffd \ufffd( end" in out
    assert "split: café \U0001f680 end" in out  # characters split across writes survive
    pieces = [line for line in out if line and set(line) == {"a"}]
    bound = max_line_bytes or 65536
    assert sum(map(len, pieces)) == size
    assert max(len(p.encode()) for p in pieces) <= bound
    assert len(pieces) == -(-size // bound)


# -- injection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "title",
    [
        '"; rm -rf ~ $(touch PWNED) `touch PWNED2`',
        "{prompt} {issue} $HOME\n'; touch PWNED3; echo \\",
    ],
)
def test_title_reaches_the_agent_as_one_literal_argument(fleet: Harness, title: str) -> None:
    result = fleet.run_config(
        [task(7, "finish", title=title)],
        agent={"command": [str(AGENT), "{prompt}", "{title}"]},
    )
    assert result.returncode == 0, result.explain()
    runs = fleet.runs_of(7)
    assert len(runs) == 1
    assert runs[0]["argv"] == ["/issue-to-impl 7", title]
    assert not [p for p in fleet.tmp.rglob("PWNED*")]
    assert fleet.home.is_dir()
    assert (fleet.origin / "README.md").is_file()


def test_workspace_path_with_shell_metacharacters(fleet: Harness) -> None:
    root = fleet.tmp / "work space $(touch PWNED) `touch PWNED2` 'q' \"; x"
    result = fleet.run_config(
        [task(5, "milestone,finish")],
        workspace_root=str(root),
        agent={"command": [str(AGENT), "{prompt}", "{workspace}"]},
    )
    assert result.returncode == 0, result.explain()
    tree = root / "origin.git" / "trees" / "issue-5"
    runs = fleet.runs_of(5)
    assert [r["argv"][1] for r in runs] == [str(tree)] * 2
    assert {r["cwd"] for r in runs} == {os.path.realpath(tree)}
    assert not [p for p in fleet.tmp.rglob("PWNED*")]


# -- the summary ----------------------------------------------------------------------------------


def test_summary_json_and_table(fleet: Harness) -> None:
    result = fleet.run_config(
        [task(1, "finish"), task(2, "milestone,finish"), task(3, "crash:3")],
        restart={"max_crashes": 1},
    )
    assert result.returncode == 1, result.explain()
    summary = result.summary
    assert summary["exit_code"] == 1
    by_task = {w["task"]: w for w in summary["workers"]}
    expected = {1: ("done", 1, 0, 0), 2: ("done", 2, 1, 0), 3: ("failed", 2, 0, 2)}
    for issue, (state, runs, milestones, crashes) in expected.items():
        w = by_task[issue]
        assert (w["state"], w["runs"], w["milestones"], w["crashes"]) == (
            state,
            runs,
            milestones,
            crashes,
        ), w
        assert isinstance(w["wall_time"], float) and w["wall_time"] > 0

    # The terminal: plain (NO_COLOR), every record rendered, then the summary table at the end.
    assert "\x1b[" not in result.stdout
    lines = result.stdout.rstrip("\n").splitlines()
    header = next(
        i
        for i, line in enumerate(lines)
        if line.split()[:4] == ["worker", "task", "machine", "state"]
    )
    assert lines[header].split()[4:8] == ["runs", "milestones", "crashes", "wall"]
    assert all("│" not in line and "┆" not in line for line in lines[header:])
    assert any("│" in line for line in lines[:header])  # agent output came before it
    rows = {}
    for line in lines[header + 2 : header + 2 + 3]:
        cols = line.split()
        rows[int(cols[1].lstrip("#"))] = cols
    for issue, (state, runs, milestones, crashes) in expected.items():
        assert rows[issue][2:7] == ["local", state, str(runs), str(milestones), str(crashes)]
    tail = [line for line in lines[header + 5 :] if line.strip()]
    assert all(line.startswith(("logs:", "summary:")) for line in tail), tail


def test_multiple_clones_layout_spreads_tasks_over_clones(fleet: Harness) -> None:
    """``clones_per_machine = 2``: Agentize's "multiple clones" layout, NAME.git and NAME-2.git,
    each a bare clone with ``trees/main``, the tasks' worktrees spread over both."""
    result = fleet.run_config([task(n, "finish") for n in (1, 2, 3, 4)], clones_per_machine=2)
    assert result.returncode == 0, result.explain()
    clones = {str(Path(w["workspace"]).parent.parent.name) for w in result.summary["workers"]}
    assert clones == {"origin.git", "origin-2.git"}
    for name in clones:
        bare = fleet.workspace_root / name
        assert (bare / "HEAD").is_file() and (bare / "trees" / "main").is_dir()
    for w in result.summary["workers"]:
        branch = git(Path(w["workspace"]), "rev-parse", "--abbrev-ref", "HEAD").strip()
        assert branch == f"issue-{w['task']}"


def test_agents_that_exit_at_once_all_start_and_finish(fleet: Harness) -> None:
    """An agent gone before its wrapper reads its start time (dash may reap it first) still
    counts as started: it ran, and its exit status decides, not a "did not start" failure."""
    issues = range(1, 81)
    result = fleet.run_config(
        [task(n) for n in issues],
        concurrency=8,
        local={"max_agents": 8},
        agent={"command": ["true"]},
    )
    assert result.returncode == 0, result.explain()
    rows = result.summary["workers"]
    assert [w["state"] for w in rows] == ["done"] * len(issues)
    assert all(w["runs"] == 1 for w in rows)
    for pid_file in result.run_dir.glob("agents/*/run-*/pid"):
        pid, ticks = pid_file.read_text().split()
        assert int(pid) > 0 and int(ticks) >= 0


def test_a_worktree_removed_by_hand_is_made_again(fleet: Harness) -> None:
    """`rm -rf trees/issue-N` between two fleets leaves a stale registration (and the branch):
    the next fleet prunes it and attaches the branch to a new worktree, keeping its commits."""
    first = fleet.run_config([task(1, "finish"), task(2, "finish")])
    assert first.returncode == 0, first.explain()
    rows = {w["task"]: w for w in first.summary["workers"]}
    removed = Path(rows[1]["workspace"])
    head_before = git(removed, "rev-parse", "HEAD").strip()
    shutil.rmtree(removed)

    second = fleet.run_config([task(1, "finish"), task(2, "finish")], "--fresh")
    assert second.returncode == 0, second.explain()
    again = {w["task"]: w for w in second.summary["workers"]}
    assert again[1]["workspace"] == str(removed) and (removed / ".git").is_file()
    # the branch came back with the commits the first fleet's agent made on it
    assert git(removed, "merge-base", "--is-ancestor", head_before, "HEAD") == ""
    assert again[1]["state"] == again[2]["state"] == "done"
