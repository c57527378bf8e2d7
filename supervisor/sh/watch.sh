# Follow many run directories at once (one watcher per machine, for all the runs followed there)
# and print what changed, only when something did:
#
#   sh -c WATCH sh FAST SLOW QUIET BEAT TICKS    (the run directories on stdin, a line each,
#                                                 then an empty line; stdin stays open)
#
# For each run directory whose facts changed since the last pass, one line
#
#   I OUT ERR EXIT ALIVE
#
# I: its position in the list (1 = first); OUT, ERR: the sizes of its `stdout` and `stderr`
# (`-`: missing, the run directory is gone); EXIT: `-` while `exit` holds no complete line, else
# its first word; ALIVE: 0 once its wrapper is gone (`kill -0` every pass, the start ticks of
# `wrapper` every TICKS passes), else 1.  Then `.` (the pass is complete).  A pass that found
# no change prints nothing, except `.` every BEAT quiet passes: the host knows the watcher
# lives.  `exit` is looked at before the sizes, so the sizes on a line with an EXIT are final.
#
# Passes come every FAST seconds (a `sleep` fork and one `stat` over every file are all it costs)
# while something changes, every SLOW seconds once QUIET passes in a row found nothing.  When
# stdin reaches EOF (the host closed the channel, or the link died) the watcher ends.  The
# host renews leases and reads output through its stdin too (below): no new login for either.
# Exit 5: a file vanished under the watch (the host starts a new watcher, which sees what is
# left).
# shellcheck disable=SC2034,SC2154 # variables named by eval: sh has no arrays
set -u
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
fast=$1 slow=$2 quiet_after=$3 beat=$4 ticks_every=$5
n=0
while IFS= read -r line && [ -n "$line" ]; do
    n=$((n + 1))
    eval "r$n=\$line"
done
me=$$
nap=""
trap '[ -n "$nap" ] && kill "$nap" 2>/dev/null; exit 0' TERM
# The rest of stdin is the host's, read by a second process (a background job's stdin is
# /dev/null unless given explicitly: hence fd 3), which answers on stderr, in order (no new
# login for either):
#   lease PATH ... then renew       touch those files (never made): leases, the claim;
#                                   answer `renewed`
#   piece FROM LIMIT FILE ... then fetch
#                                   answer `pieces`, then lib.sh's fetch_pieces, then `end`
# Its EOF ends the watcher (and its nap).
exec 3<&0
(
    set --
    _np=0
    while read -r word rest; do
        case $word in
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
exec 3<&-
# Only that process speaks on stderr: its answers are the host's to parse.
exec 2>/dev/null

# The positional parameters become the files `stat` looks at, two per run directory that has
# both (the others are reported missing once).
set --
i=1
while [ "$i" -le "$n" ]; do
    eval "rd=\$r$i"
    if [ -e "$rd/stdout" ] && [ -e "$rd/stderr" ]; then
        set -- "$@" "$rd/stdout" "$rd/stderr"
        eval "m$i=0"
    else
        eval "m$i=1"
    fi
    eval "w$i= t$i= s$i="
    i=$((i + 1))
done

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

pass=0
quiet=0
pause=$fast
while :; do
    pass=$((pass + 1))
    deep=0
    [ $(((pass - 1) % ticks_every)) -ne 0 ] || deep=1
    i=1
    while [ "$i" -le "$n" ]; do
        eval "rd=\$r$i w=\$w$i t=\$t$i"
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
            elif [ "$deep" = 1 ] && ! same_process "$w" "$t"; then
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
    if [ "$changed" = 1 ]; then
        quiet=0
        pause=$fast
    else
        quiet=$((quiet + 1))
        [ "$quiet" -lt "$quiet_after" ] || pause=$slow
        [ $((quiet % beat)) -ne 0 ] || echo .
    fi
    sleep "$pause" &
    nap=$!
    wait "$nap"
    nap=""
done
