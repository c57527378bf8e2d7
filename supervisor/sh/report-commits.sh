# For each worktree WS: a line "\036WS", then the commits on its branch since BASE ("%h %s").
#
#   sh -c REPORT_COMMITS sh BASE WS...
base=$1
shift
for ws in "$@"; do
    printf '\036%s\n' "$ws"
    git -C "$ws" log --format='%h %s' "$base..HEAD" 2>/dev/null
done
