"""The report's commits per worktree: listed only where the worktree moved from the base, found
with one `git worktree list` per clone (real git, real worktrees made the fleet's way)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from conftest import git, make_origin

from supervisor.hosts.local import LocalHost
from supervisor.report import _branch_commits, _unmoved
from supervisor.workspace import ensure_clone, ensure_worktree


@pytest.mark.anyio
async def test_commits_only_for_worktrees_that_moved(tmp_path: Path) -> None:
    origin = make_origin(tmp_path / "origin")
    host = LocalHost()
    with anyio.fail_after(60):
        clone = await ensure_clone(host, str(origin), str(tmp_path / "ws"), "origin.git", None)
        trees = [await ensure_worktree(clone, f"issue-{n}") for n in (1, 2, 3)]
        moved = Path(trees[1])
        (moved / "work.txt").write_text("done\n")
        git(moved, "add", "work.txt")
        git(moved, "commit", "-q", "-m", "issue 2: implement")
        git(moved, "commit", "-q", "--allow-empty", "-m", "issue 2: polish")
        gone = str(tmp_path / "ws" / "origin.git" / "trees" / "issue-9")  # never made
        found = await _branch_commits(host, [*trees, gone], clone.default_branch)
        await host.aclose()
    assert found[trees[0]] == [] and found[trees[2]] == []
    assert [c.split(" ", 1)[1] for c in found[trees[1]]] == [
        "issue 2: polish",
        "issue 2: implement",
    ]
    assert found[gone] == []  # not a worktree: nothing to list, and no error


def test_unmoved_reads_the_porcelain_listing() -> None:
    base = "a" * 40
    listing = (
        f"\036{base}\n"
        "worktree /w/r.git\nbare\n\n"
        f"worktree /w/r.git/trees/issue-1\nHEAD {base}\nbranch refs/heads/issue-1\n\n"
        f"worktree /w/r.git/trees/issue-2\nHEAD {'b' * 40}\nbranch refs/heads/issue-2\n\n"
        "\036\n"  # a clone where the base did not resolve: nothing counts as unmoved
        f"worktree /w/s.git/trees/issue-3\nHEAD {base}\n"
    )
    assert _unmoved(listing) == {"/w/r.git/trees/issue-1"}


def test_machine_lines_name_what_happened_to_each_machine() -> None:
    """The report's machine section, from the ledger's reachability changes: an outage that
    ended, one that did not, a slow spell, a machine left out; a quick reconnection is no
    line."""
    from datetime import datetime

    from supervisor.report import machine_lines

    def at(hhmm: str) -> float:
        return datetime.strptime(f"2026-12-01 {hhmm}", "%Y-%m-%d %H:%M:%S").timestamp()

    events = [
        {"machine": "m1", "state": "connecting", "at": at("02:13:00"), "detail": "link lost"},
        {"machine": "m1", "state": "up", "at": at("02:13:01")},
        {"machine": "m1", "state": "connecting", "at": at("02:14:00")},
        {"machine": "m1", "state": "unreachable", "at": at("02:14:05"), "detail": "refused"},
        {"machine": "m2", "state": "slow", "at": at("02:20:00")},
        {"machine": "m1", "state": "back", "at": at("02:31:40")},
        {"machine": "m1", "state": "up", "at": at("02:31:41")},
        {"machine": "m2", "state": "up", "at": at("02:21:30")},
        {"machine": "m3", "state": "refused", "at": at("02:00:00"), "detail": "host key"},
        {"machine": "m2", "state": "unreachable", "at": at("03:00:00")},
    ]
    assert machine_lines(events) == [
        "m1 unreachable since 02:14:05, back at 02:31:40",
        "m2 slow from 02:20:00 to 02:21:30",
        "m3 left out of the shift: host key",
        "m2 unreachable since 03:00:00, not back by the shift's end",
    ]
