# A new worktree of a new branch, registered the way `git worktree add` registers it (the
# layout of gitrepository-layout(5): worktrees/ID/{gitdir,commondir,HEAD,locked} and the
# tree's `.git` file), then populated by the same `git reset --hard` git runs there.  `git
# worktree add` reads every registered worktree twice (itself and its `git branch`), so adding
# the thousandth costs ~90 ms where this costs ~9 ms.  Only the plain case is done here: exit 3
# (nothing left behind) asks for `git worktree add` whenever the ID, the directory or the branch
# exists, or a post-checkout hook would have to run.  `locked` keeps a concurrent `git worktree
# prune` away while the tree is filled, as git's own add does.
#
#   sh -c WORKTREE_ADD sh CLONE NAME TREE START
set -u
clone=$1 name=$2 tree=$3 start=$4
reg=$clone/worktrees/$name
case $clone in /*) ;; *) exit 3 ;; esac  # absolute paths only, as git writes them
case $tree in /*) ;; *) exit 3 ;; esac
if [ -e "$reg" ] || [ -e "$tree" ] || [ -e "$clone/hooks/post-checkout" ]; then exit 3; fi
git -C "$clone" update-ref "refs/heads/$name" "$start^{commit}" "" 2>/dev/null || exit 3
undo() {
    rm -rf "$reg" "$tree"
    git -C "$clone" update-ref -d "refs/heads/$name" 2>/dev/null
    exit 3
}
mkdir "$reg" "$tree" 2>/dev/null || undo
{ echo initializing >"$reg/locked" && echo "$tree/.git" >"$reg/gitdir" &&
    echo ../.. >"$reg/commondir" && echo "ref: refs/heads/$name" >"$reg/HEAD" &&
    echo "gitdir: $reg" >"$tree/.git"; } || undo
git -C "$tree" reset --hard --no-recurse-submodules --quiet || undo
rm -f "$reg/locked"
