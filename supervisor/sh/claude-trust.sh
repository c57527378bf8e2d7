# Claude Code's global config and a worktree's real path, for marking the worktree trusted the
# way Agentize's `wt spawn` does (supervisor/worktree_trust.py; the JSON merge is Python's,
# supervisor/agents/trust.py, so this script only reads and replaces the file).
#
#   sh -c CLAUDE_TRUST sh read WORKTREE CONFIG_DIR
#       prints the worktree's real path (`pwd -P`: the key Claude Code looks the trust up by),
#       the config file's path (CONFIG_DIR/.claude.json; empty CONFIG_DIR: $CLAUDE_CONFIG_DIR,
#       else $HOME), the file's `cksum` ("-" when there is no file), one a line, then the file
#   sh -c CLAUDE_TRUST sh write FILE CKSUM < CONTENT
#       replaces FILE with CONTENT (a temporary file beside it, its mode kept, renamed over it)
#       unless FILE changed since it was read -- its cksum is no longer CKSUM: exit 75 then.
#       Claude Code rewrites the file itself; the rename is atomic, and the check narrows the
#       window in which one of two writers could lose the other's change to a moment.
case $1 in
read)
    real=$(cd -- "$2" && pwd -P) || exit 1
    dir=${3:-${CLAUDE_CONFIG_DIR:-$HOME}}
    file=$dir/.claude.json
    printf '%s\n%s\n' "$real" "$file"
    if [ -f "$file" ]; then
        sum=$(cksum <"$file") || exit 1
        printf '%s\n' "$sum"
        cat -- "$file"
    else
        printf '%s\n' -
    fi
    ;;
write)
    file=$2
    now=$(cksum <"$file") || exit 1
    [ "$now" = "$3" ] || exit 75
    tmp=$file.agentize-fleet.$$
    if cp -p -- "$file" "$tmp" && cat >"$tmp" && mv -f -- "$tmp" "$file"; then
        exit 0
    fi
    rm -f -- "$tmp"
    exit 1
    ;;
*)
    echo "claude-trust: read or write, not $1" >&2
    exit 2
    ;;
esac
