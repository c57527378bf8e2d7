"""Task worktrees: the plain ones the fleet registers itself must be git's own in every respect,
and every case the plain path does not cover must still come out right through ``git worktree
add`` (real git, real clones)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import anyio
import pytest
from conftest import git, make_origin

from supervisor.hosts.local import LocalHost
from supervisor.workspace import Clone, ensure_clone, ensure_worktree

pytestmark = pytest.mark.anyio


async def make_clone(tmp_path: Path, name: str = "origin.git") -> tuple[LocalHost, Clone]:
    origin = tmp_path / "origin"
    if not origin.exists():
        make_origin(origin)
    host = LocalHost()
    clone = await ensure_clone(host, str(origin), str(tmp_path / "ws"), name, None)
    return host, clone


def listed(clone: Clone) -> dict[str, str]:
    """``git worktree list --porcelain``: worktree path -> its branch (or "bare"/"detached")."""
    found: dict[str, str] = {}
    for entry in git(Path(clone.path), "worktree", "list", "--porcelain").split("\n\n"):
        fields = dict(line.partition(" ")[::2] for line in entry.splitlines() if line)
        if "worktree" in fields:
            found[fields["worktree"]] = fields.get("branch", "bare" if "bare" in fields else "")
    return found


def registration(clone: Clone, tree: str) -> dict[str, str]:
    """The files git keeps for a worktree, with this test's paths taken out."""
    gitfile = Path(tree, ".git").read_text()
    reg = Path(gitfile.removeprefix("gitdir: ").strip())
    files = {
        p.name: p.read_text() for p in sorted(reg.iterdir()) if p.is_file() and p.name != "index"
    }
    files[".git"] = gitfile
    return {k: v.replace(str(Path(clone.path).resolve()), "CLONE") for k, v in files.items()}


async def test_plain_worktrees_are_git_worktrees(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        host, clone = await make_clone(tmp_path)
        assert clone.plain_worktrees
        trees = [await ensure_worktree(clone, f"issue-{n}") for n in (1, 2, 3)]
        again = await ensure_worktree(clone, "issue-2")  # re-used, never recreated
        await host.aclose()
    assert again == trees[1]
    worktrees = listed(clone)
    for number, tree in zip((1, 2, 3), trees, strict=True):
        assert worktrees[tree] == f"refs/heads/issue-{number}"
        assert (Path(tree) / "README.md").read_text() == "# e2e project\n"
        assert git(Path(tree), "status", "--porcelain") == ""
        assert git(Path(tree), "rev-parse", "--abbrev-ref", "HEAD").strip() == f"issue-{number}"
        assert not any(Path(clone.path, "worktrees").glob("*/locked"))  # unlocked when filled

    # Work in one, then git's own maintenance: prune keeps them all, remove removes one.
    (Path(trees[0]) / "work.txt").write_text("done\n")
    git(Path(trees[0]), "add", "work.txt")
    git(Path(trees[0]), "commit", "-q", "-m", "issue 1: work")
    git(Path(clone.path), "worktree", "prune")
    assert set(trees) <= set(listed(clone))
    git(Path(clone.path), "worktree", "remove", trees[2])
    assert trees[2] not in listed(clone) and not Path(trees[2]).exists()
    log = git(Path(clone.path), "log", "--format=%s", "issue-1")
    assert log.splitlines()[0] == "issue 1: work"


async def test_a_plain_worktree_is_registered_as_git_registers_one(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        host, clone = await make_clone(tmp_path)
        tree = await ensure_worktree(clone, "issue-7")
        await host.aclose()
    by_git = str(Path(clone.path, "trees", "issue-8"))
    git(Path(clone.path), "worktree", "add", "--quiet", "-b", "issue-8", by_git, "main")
    ours, theirs = registration(clone, tree), registration(clone, by_git)
    assert set(ours) - {"ORIG_HEAD"} == set(theirs) - {"ORIG_HEAD"}
    for name, text in theirs.items():
        if name != "ORIG_HEAD":
            assert ours[name] == text.replace("issue-8", "issue-7"), name
    assert Path(clone.path, "worktrees", "issue-7", "index").is_file()  # filled by git


async def test_under_a_hook_or_a_setting_git_adds_the_worktree(tmp_path: Path) -> None:
    """A post-checkout hook must run (git runs it), and settings such as core.hooksPath or a
    sparse checkout make every add go through git."""
    with anyio.fail_after(60):
        host, clone = await make_clone(tmp_path)
        hook = Path(clone.path, "hooks", "post-checkout")
        hook.parent.mkdir(exist_ok=True)
        hook.write_text('#!/bin/sh\necho "$3" > hooked\n')
        hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
        hooked = await ensure_worktree(clone, "issue-1")
        hook.unlink()
        git(Path(clone.path), "config", "core.sparseCheckout", "false")
        _, configured = await make_clone(tmp_path)  # the same clone, looked at again
        plain_after = configured.plain_worktrees
        tree = await ensure_worktree(configured, "issue-2")
        await host.aclose()
    assert (Path(hooked) / "hooked").read_text() == "1\n"  # run by git worktree add
    assert not plain_after
    assert listed(clone)[tree] == "refs/heads/issue-2"


async def test_a_branch_or_registration_left_behind_is_handled(tmp_path: Path) -> None:
    """A branch that outlived its worktree is checked out again (its commits kept); an id that
    a registration elsewhere holds makes git pick another id, never overwrite it."""
    with anyio.fail_after(60):
        host, clone = await make_clone(tmp_path)
        first = await ensure_worktree(clone, "issue-4")
        (Path(first) / "kept.txt").write_text("kept\n")
        git(Path(first), "add", "kept.txt")
        git(Path(first), "commit", "-q", "-m", "issue 4: kept")
        git(Path(clone.path), "worktree", "remove", first)  # the branch issue-4 stays
        back = await ensure_worktree(clone, "issue-4")

        elsewhere = tmp_path / "elsewhere" / "issue-5"
        git(Path(clone.path), "worktree", "add", "--quiet", "-b", "other", str(elsewhere), "main")
        fifth = await ensure_worktree(clone, "issue-5")
        await host.aclose()
    assert back == first and (Path(back) / "kept.txt").read_text() == "kept\n"
    worktrees = listed(clone)
    assert worktrees[str(elsewhere)] == "refs/heads/other"  # untouched
    assert worktrees[fifth] == "refs/heads/issue-5"


async def test_many_at_once(tmp_path: Path) -> None:
    with anyio.fail_after(120):
        host, clone = await make_clone(tmp_path)
        made: dict[int, str] = {}

        async def add(number: int) -> None:
            made[number] = await ensure_worktree(clone, f"issue-{number}")

        async with anyio.create_task_group() as group:
            for number in range(1, 31):
                group.start_soon(add, number)
        await host.aclose()
    worktrees = listed(clone)
    for number, tree in made.items():
        assert worktrees[tree] == f"refs/heads/issue-{number}"
    assert len(worktrees) == 30 + 2  # the bare clone and trees/main too
    git(Path(clone.path), "fsck", "--no-progress")
    assert os.listdir(Path(clone.path, "worktrees")) and not any(
        Path(clone.path, "worktrees").glob("*/locked")
    )
