"""Worker clones and worktrees, laid out the way Agentize's ``wt`` lays them out.

A worker clone is a bare repository ``NAME.git`` under the machine's workspace root, made as
``wt clone`` makes it (``git clone --bare``, origin tracking branches, ``fetch.prune``), with
``trees/main`` on the default branch as ``wt init`` makes it.  Each task gets
``trees/issue-N`` on branch ``issue-N`` (``wt spawn``'s naming), so that a user can switch
between the fleet and ``wt`` by hand on the same clone.

Unlike ``wt spawn``, an existing worktree is re-used, never recreated: a resumed or restarted
run must see its predecessor's commits and files.  All of it runs through ``Host.run``, so the
same code prepares local and remote machines.
"""

from __future__ import annotations

import posixpath
import random
import re
from dataclasses import dataclass

import anyio

from supervisor import sh
from supervisor.hosts.base import CommandFailed, CommandResult, Host

_locks: dict[tuple[str, str], anyio.Lock] = {}
_adders: dict[tuple[str, str], anyio.Semaphore] = {}

#: ``git worktree add`` at once per clone.  Each one reads every registered worktree (git
#: 2.39: ~10 syscalls per worktree), and one that reads a worktree another is still writing
#: fails ("failed to read worktrees/X/commondir"): a few at a time overlap the git processes'
#: start-up without making that race frequent.
ADDS_PER_CLONE = 4
ADD_ATTEMPTS = 8


def _lock(host: Host, clone: str) -> anyio.Lock:
    """Git does not like two ``worktree add`` at once in one repository: one at a time."""
    return _locks.setdefault((host.name, clone), anyio.Lock())


# New worktrees of new branches are registered the way `git worktree add` registers them, by
# ``sh/worktree-add.sh`` (about 10x faster with a thousand worktrees; exit 3, leaving nothing
# behind, asks for `git worktree add`).

#: Settings under which `git worktree add` does more than ``sh/worktree-add.sh`` (hooks
#: elsewhere, per-worktree config, sparse checkouts, upstream set up for new branches): a clone
#: whose config names any of them always gets `git worktree add`.
_GIT_ONLY_SETTINGS = (
    r"^(core\.hookspath|extensions\.worktreeconfig|core\.sparsecheckout"
    r"|core\.sparsecheckoutcone|branch\.autosetupmerge|extensions\.relativeworktrees"
    r"|worktree\.userelativepaths)$"
)


def _adder(host: Host, clone: str) -> anyio.Semaphore:
    return _adders.setdefault((host.name, clone), anyio.Semaphore(ADDS_PER_CLONE))


def slugify(title: str, max_length: int = 40) -> str:
    """The ``issue-N-title`` suffix older ``wt`` versions used: lower case, dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return slug[:max_length].rstrip("-")


def worktree_name(template: str, issue: int, title: str) -> str:
    """``issue-42`` (or ``issue-42-fix-the-parser`` with the older template)."""
    name = template.replace("{issue}", str(issue)).replace("{slug}", slugify(title))
    return name.rstrip("-")


def clone_name(base: str, index: int) -> str:
    """The ``index``-th worker clone's directory: ``NAME.git``, then ``NAME-2.git``, …"""
    if index == 0:
        return base
    stem = base.removesuffix(".git")
    return f"{stem}-{index + 1}.git"


@dataclass(frozen=True)
class Clone:
    """A worker clone on one machine."""

    host: Host
    path: str
    default_branch: str
    #: New worktrees may be registered by ``sh/worktree-add.sh`` (no setting of the
    #: clone's asks for more than that).
    plain_worktrees: bool = False

    def tree(self, name: str) -> str:
        return posixpath.join(self.path, "trees", name)


async def _git(host: Host, *args: str, cwd: str | None = None, check: bool = True) -> str:
    result = await host.run(["git", *args], cwd=cwd, check=check, timeout=600.0)
    return result.stdout.strip() if result.exit_code == 0 else ""


async def detect_default_branch(host: Host, clone_path: str, override: str | None) -> str:
    """``wt``'s rule: the override, else what the bare repo's HEAD names, else main, else master."""
    if override:
        return override
    head = await _git(host, "symbolic-ref", "--short", "HEAD", cwd=clone_path, check=False)
    candidates = [head] if head else []
    candidates += ["main", "master"]
    for branch in candidates:
        ok = await host.run(
            ["git", "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"],
            cwd=clone_path,
            check=False,
        )
        if ok.exit_code == 0:
            return branch
    return candidates[0]


async def ensure_clone(
    host: Host, repository: str, root: str, name: str, default_branch: str | None
) -> Clone:
    """Make (once) the bare worker clone ``root/name`` with ``trees/main``, and return it."""
    root = await host.resolve_path(root)
    path = posixpath.join(root, name)
    async with _lock(host, path):
        if not await host.exists(posixpath.join(path, "HEAD")):
            await host.run(["mkdir", "-p", root])
            partial = f"{path}.partial"
            await host.run(["rm", "-rf", partial])
            await _git(host, "clone", "--quiet", "--bare", repository, partial)
            await _git(
                host,
                "config",
                "remote.origin.fetch",
                "+refs/heads/*:refs/remotes/origin/*",
                cwd=partial,
            )
            await _git(host, "config", "fetch.prune", "true", cwd=partial)
            await _git(host, "fetch", "--quiet", "origin", cwd=partial)
            await host.run(["mv", partial, path])
        branch = await detect_default_branch(host, path, default_branch)
        # Forget worktrees removed by hand since the last fleet, once, before adding any
        # (~10 ms with 1,000 worktrees; a check of ours in sh first cost more: dash reads a
        # file a byte at a time).
        await _git(host, "worktree", "prune", cwd=path, check=False)
        main_tree = posixpath.join(path, "trees", "main")
        if not await host.exists(main_tree):
            await _git(host, "worktree", "add", "--quiet", main_tree, branch, cwd=path)
        settings = await host.run(
            ["git", "config", "--get-regexp", _GIT_ONLY_SETTINGS], cwd=path, check=False
        )
    return Clone(host, path, branch, plain_worktrees=settings.exit_code == 1)


async def ensure_worktree(clone: Clone, name: str) -> str:
    """The task's worktree ``trees/NAME`` on branch ``NAME``: re-used if it exists.

    A new worktree of a new branch is registered by ``sh/worktree-add.sh`` (git's layout,
    filled by git, without git's scan of every other worktree) where the clone allows it;
    every other case goes to ``git worktree add``.

    Worktrees of different branches can be added concurrently (git locks each new worktree and
    ref on its own), a few at a time per clone (:data:`ADDS_PER_CLONE`), so tasks starting
    together do not queue behind one another.  A failed add is retried with a growing,
    jittered delay: git fails an add that reads a worktree registration another add is still
    writing, and a stale registration (removed by hand) is cleared by ``git worktree prune``.
    """
    host = clone.host
    path = clone.tree(name)
    if await host.exists(posixpath.join(path, ".git")):
        return path
    if clone.plain_worktrees:
        start = clone.default_branch
        plain = await host.run(
            sh.command("worktree-add", clone.path, name, path, start),
            check=False,
            timeout=600.0,
        )
        if plain.exit_code == 0:
            return path  # anything else left nothing behind: git does it below
    last: CommandResult | None = None
    argv: list[str] = []
    for attempt in range(ADD_ATTEMPTS):
        async with _adder(host, clone.path):
            argv = ["git", "worktree", "add", "--quiet", "-b", name, path, clone.default_branch]
            last = await host.run(argv, cwd=clone.path, check=False, timeout=600.0)
            if last.exit_code != 0 and "already exists" in last.stderr and "branch" in last.stderr:
                # The branch survived its worktree (an add that failed after making it, a
                # worktree removed by hand, a crash): attach it again.
                argv = ["git", "worktree", "add", "--quiet", path, name]
                last = await host.run(argv, cwd=clone.path, check=False, timeout=600.0)
        if last.exit_code == 0 or await host.exists(posixpath.join(path, ".git")):
            return path
        if "failed to read" not in last.stderr:
            async with _lock(host, clone.path):
                await _git(host, "worktree", "prune", cwd=clone.path, check=False)
        await anyio.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    assert last is not None
    raise CommandFailed(host.name, argv, last)
