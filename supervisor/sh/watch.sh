# Follow many run directories at once (one watcher per machine, for all the runs followed there)
# and print what changed, only when something did:
#
#   sh -c WATCH sh FAST SLOW QUIET BEAT TICKS      (requests on stdin, which stays open)
#
# For each run directory whose facts changed since the last pass, one line
#
#   I OUT ERR EXIT ALIVE
#
# I: its number (the first `watch` request is 1); OUT, ERR: the sizes of its `stdout` and
# `stderr` (`-`: missing, the run directory is gone); EXIT: `-` while `exit` holds no complete
# line, else its first word; ALIVE: 0 once its wrapper is gone (`kill -0` every pass, the start
# ticks of `wrapper` at the first look and every TICKS passes), else 1.  Then `.` (the pass is complete).  A pass that
# found no change prints nothing, except `.` every BEAT quiet passes: the host knows the watcher
# lives.  `exit` is looked at before the sizes, so the sizes on a line with an EXIT are final.
#
# Passes come every FAST seconds (a `sleep` fork and one `stat` over every file are all it costs)
# while something changes, every SLOW seconds once QUIET passes in a row found nothing, and at
# once when poked.  Requests, a line each, are read by a second process (no new login for any of
# them), which answers on stderr, in order:
#
#   watch RUN_DIR              follow one more run directory (numbered in the order given)
#   poke                       a pass now (the host expects news: it signalled a run)
#   signal PID TICKS SIG       lib.sh's kill_tree (a run's whole tree), then a pass; `signalled`
#   lease PATH ... renew       touch those files (never made): leases, the claim; `renewed`
#   piece FROM LIMIT FILE ... fetch
#                              `pieces`, then lib.sh's fetch_pieces, then `end`
#
# When stdin reaches EOF (the host closed the channel, or the link died) the watcher ends.
# Exit 5: a file vanished under the watch (the host starts a new watcher, which sees what is
# left); exit 6: no temporary file for the list of runs (none is left behind: it is unlinked
# as soon as it is open).
# shellcheck disable=SC2034,SC2154 # variables named by eval: sh has no arrays
set -u
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
fast=$1 slow=$2 quiet_after=$3 beat=$4 ticks_every=$5
umask 077
# The run directories, a line each, appended by the second process (one write a line: a reader
# never sees half of one) on fd 4 and read by this one as they come on fd 5; the file itself is
# unlinked at once, so nothing is left behind however the watcher ends.
list=$(mktemp "${TMPDIR:-/tmp}/agentize-watch.XXXXXX") || exit 6
# shellcheck disable=SC2094 # one writer, one reader, on purpose
exec 4>>"$list" 5<"$list"
rm -f -- "$list"
me=$$
nap=""
poked=""
trap 'exit 0' TERM HUP PIPE
trap 'poked=1; [ -n "$nap" ] && kill "$nap" 2>/dev/null' USR1
# A background job's stdin is /dev/null unless given explicitly: hence fd 3.
exec 3<&0
(
    exec 5<&-
    set --
    _np=0
    while read -r word rest; do
        case $word in
        watch)
            printf '%s\n' "$rest" >&4
            kill -s USR1 "$me" 2>/dev/null
            ;;
        poke) kill -s USR1 "$me" 2>/dev/null ;;
        signal)
            pid=${rest%% *}
            rest=${rest#* }
            kill_tree "$pid" "${rest%% *}" "${rest#* }"
            echo signalled >&2
            kill -s USR1 "$me" 2>/dev/null # its end may come at once: a pass now
            ;;
        lease) set -- "$@" "$rest" ;;
        renew)
            [ "$#" -eq 0 ] || touch -c -- "$@" 2>/dev/null
            set --
            echo renewed >&2
            ;;
        piece)
            from=${rest%% *}
            rest=${rest#* }
            add_piece "${rest#* }" "$from" "${rest%% *}"
            ;;
        fetch)
            echo pieces >&2
            fetch_pieces >&2
            echo end >&2
            ;;
        esac
    done <&3
    kill "$me" 2>/dev/null
) >/dev/null &
exec 3<&- 4>&-
# Only that process speaks on stderr: its answers are the host's to parse.
exec 2>/dev/null

# report SIZE...: print the line of each run whose facts changed (from the sizes `stat` gave
# and the x$i/a$i the pass set); `changed` says whether any did.
report() {
    changed=0
    out=""
    j=1
    while [ "$j" -le "$n" ]; do
        eval "m=\$m$j"
        if [ "$m" = 1 ]; then
            o=- e=-
        elif [ "$#" -ge 2 ]; then
            o=$1 e=$2
            shift 2
        else
            exit 5 # fewer sizes than files: one vanished
        fi
        eval "now=\"$j \$o \$e \$x$j \$a$j\" was=\$s$j"
        if [ "$now" != "$was" ]; then
            eval "s$j=\$now"
            out="$out$now
"
            changed=1
        fi
        j=$((j + 1))
    done
    [ "$changed" = 0 ] || printf '%s.\n' "$out"
}

n=0
pass=0
quiet=0
pause=$fast
while :; do
    # Runs given since the last pass: read them in, and make the positional parameters the
    # files `stat` looks at again, two per run directory that has both (the others are
    # reported missing once).
    added=""
    while IFS= read -r line <&5; do
        n=$((n + 1))
        added=1
        eval "r$n=\$line w$n= t$n= s$n="
        if [ -e "$line/stdout" ] && [ -e "$line/stderr" ]; then
            eval "m$n=0"
        else
            eval "m$n=1"
        fi
    done
    if [ -n "$added" ]; then
        set --
        i=1
        while [ "$i" -le "$n" ]; do
            eval "rd=\$r$i m=\$m$i"
            [ "$m" = 1 ] || set -- "$@" "$rd/stdout" "$rd/stderr"
            i=$((i + 1))
        done
    fi
    pass=$((pass + 1))
    deep=0
    [ $(((pass - 1) % ticks_every)) -ne 0 ] || deep=1
    i=1
    while [ "$i" -le "$n" ]; do
        eval "rd=\$r$i w=\$w$i t=\$t$i seen=\$s$i"
        x=-
        if [ -e "$rd/exit" ] && IFS=' ' read -r x _rest 2>/dev/null <"$rd/exit"; then
            [ -n "$x" ] || x='?'
        else
            x=-
        fi
        if [ -z "$w" ] && read_pair "$rd/wrapper"; then
            w=$_pid t=$_ticks
            eval "w$i=\$w t$i=\$t"
        fi
        a=1
        if [ "$w" = - ]; then
            a=0
        elif [ -n "$w" ]; then
            if ! kill -0 "$w" 2>/dev/null; then
                a=0
            elif { [ "$deep" = 1 ] || [ -z "$seen" ]; } && ! same_process "$w" "$t"; then
                a=0
            fi
            # Gone for good (a zombie not reaped yet would pass kill -0 again).
            [ "$a" = 1 ] || eval "w$i=-"
        fi
        eval "x$i=\$x a$i=\$a"
        i=$((i + 1))
    done
    sizes=""
    if [ "$#" -gt 0 ]; then
        sizes=$(stat -c %s -- "$@" 2>/dev/null)
    fi
    set -f
    # shellcheck disable=SC2086 # split on purpose: one size per word
    report $sizes
    set +f
    if [ "$changed" = 1 ] || [ -n "$poked" ]; then
        quiet=0
        pause=$fast
    else
        quiet=$((quiet + 1))
        [ "$quiet" -lt "$quiet_after" ] || pause=$slow
        [ $((quiet % beat)) -ne 0 ] || echo .
    fi
    # A poke (USR1) ends the nap at once; one that came during the pass skips it.
    if [ -z "$poked" ]; then
        sleep "$pause" &
        nap=$!
        [ -n "$poked" ] && kill "$nap" 2>/dev/null
        wait "$nap"
        nap=""
    fi
    poked=""
done
