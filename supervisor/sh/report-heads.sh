# For each worker clone: a line "\036COMMIT" (what BASE names there, empty if nothing), then
# `git worktree list --porcelain`: one git process per clone says which worktrees are still
# where BASE is (most, in a fleet that just started; they have no commits to list).
#
#   sh -c REPORT_HEADS sh BASE CLONE...
base=$1
shift
for clone in "$@"; do
    printf '\036%s\n' "$(git -C "$clone" rev-parse --verify --quiet "$base^{commit}")"
    git -C "$clone" worktree list --porcelain 2>/dev/null
done
