# The raw facts of run directories, for supervisor/hosts/runfiles.py to judge (it alone decides
# what they mean).  For each RUN_DIR, in this order:
#
#   run RUN_DIR
#   age SECONDS          since the directory last changed (absent: no such directory)
#   wrapper PID TICKS 1  the `wrapper` file, and 1 when that process still lives as itself
#                        (`wrapper - - 0`: a complete line that is no such pair)
#   leader PID TICKS 0   the same for `pid` (the agent)
#   exit TEXT            the `exit` file's line, once complete
#   note LINE            each line of `note`
#   meta KEY=VALUE       each line of `meta`
#   end
#
#   sh -c STATUS sh LOCK_WAIT RUN_DIR...
#
# A start in flight (start.lock held) is waited for, at most LOCK_WAIT seconds.  `exit` is read
# after the processes: a wrapper that ended between the two looks has written it by then.
set -u
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
lock_wait=$1
shift
now=$(date +%s)
for rd; do
    printf 'run %s\n' "$rd"
    if [ -d "$rd" ]; then
        start_lock_wait "$rd" "$lock_wait"
        printf 'age %s\n' "$((now - $(stat -c %Y -- "$rd")))"
        for f in wrapper pid; do
            if read_pair "$rd/$f"; then
                a=0
                same_process "$_pid" "$_ticks" && a=1
                [ "$f" = pid ] && f=leader
                printf '%s %s %s %s\n' "$f" "$_pid" "$_ticks" "$a"
            elif [ "$f" = wrapper ] && IFS= read -r x 2>/dev/null <"$rd/wrapper"; then
                echo "wrapper - - 0"
            fi
        done
        if IFS= read -r x 2>/dev/null <"$rd/exit"; then printf 'exit %s\n' "$x"; fi
        for f in note meta; do
            while IFS= read -r x; do printf '%s %s\n' "$f" "$x"; done 2>/dev/null <"$rd/$f"
        done
    fi
    echo end
done
