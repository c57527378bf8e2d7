# shellcheck shell=sh
# The run directory's rules in sh, written once (their Python side: supervisor/hosts/runfiles.py).
#
# Not run on its own: supervisor.sh.script(NAME) puts into each script the functions of this
# file it uses (and those they use), in place of its `. "$(dirname -- "$0")/lib.sh"` line, so a
# remote `sh -c TEXT sh ARGS...` stays one self-contained command.  Each function starts at a
# line `NAME() {` and ends at the next line `}`; the comment lines above it go with it.
#
# The files of a run directory (RD): `wrapper` and `pid` hold "PID START_TICKS" (of the wrapper
# and of the agent, whose pgid and sid equal its pid), `exit` the agent's status (0..255) or
# `lost`, `note` why someone intervened, `meta` key=value lines, `start.lock` the remote start's
# flock.  Each is written in one short write; a line without its newline means "not yet".

# ticks_of PID: set _t to PID's start time in clock ticks since boot (field 22 of
# /proc/PID/stat, i.e. field 20 after "PID (COMM) "); false, _t empty, when there is no such
# process or it is a zombie (dead, only not reaped yet).  PID may be `self`.
ticks_of() {
    _t=""
    _st=""
    case $1 in '' | */*) return 1 ;; esac
    read -r _st 2>/dev/null <"/proc/$1/stat" || return 1
    set -f
    # shellcheck disable=SC2086 # split on purpose: the fields after the command name
    _stat_fields ${_st##*) }
    set +f
    [ -n "$_t" ]
}

# _stat_fields FIELDS...: ticks_of's helper ($1 is the state, $20 the start time).
_stat_fields() {
    [ "$1" = Z ] || _t=${20:-}
}

# same_process PID TICKS: PID lives and started at TICKS: it is the very process that
# recorded itself, never another one that got its pid later.
same_process() {
    case $1 in '' | *[!0-9]* | 0 | 1) return 1 ;; esac
    case $2 in '' | *[!0-9]*) return 1 ;; esac
    ticks_of "$1" && [ "$_t" = "$2" ]
}

# read_pair FILE: set _pid and _ticks from a complete "PID TICKS" line; false when FILE is
# missing or not written whole yet.
read_pair() {
    _pid=""
    _ticks=""
    read -r _pid _ticks _rest 2>/dev/null <"$1" && [ -n "$_ticks" ]
}

# recorded_alive FILE: FILE ("PID TICKS") names a process that still lives as itself.  With
# FILE = RD/wrapper this is the one "wrapper alive" rule, with RD/pid "agent leader alive".
recorded_alive() {
    read_pair "$1" && same_process "$_pid" "$_ticks"
}

# kill_tree PID TICKS SIG: SIG to the run whose agent leader is PID (started at TICKS): its
# process group, then what left the group but not the session (a session id is not reused
# while any process of it lives).  A PID now naming another process is left alone.
kill_tree() {
    case $1 in '' | *[!0-9]* | 0 | 1) return 0 ;; esac
    if same_process "$1" "$2"; then
        kill -s "$3" -- "-$1" 2>/dev/null
    elif ticks_of "$1"; then
        return 0
    fi
    if command -v pkill >/dev/null 2>&1; then pkill "-$3" -s "$1" 2>/dev/null; fi
    return 0
}

# end_lost RD NOTE: end a run whose wrapper is gone without recording the end: kill what is
# left of its tree, then write NOTE and `exit` = lost, so that every reader (the supervisor,
# the lease watchdog's "runs left") sees it ended.  An `exit` written meanwhile is kept.
end_lost() {
    if read_pair "$1/pid"; then kill_tree "$_pid" "$_ticks" KILL; fi
    [ -e "$1/exit" ] && return 0
    printf '%s\n' "$2" >>"$1/note"
    echo lost >"$1/exit"
}

# run_left RD: the run has not ended.  A run without `exit` whose wrapper and agent are both
# gone has ended all the same, and is marked lost here (whoever finds it ends it); one whose
# agent outlived its wrapper is left to the lease.
run_left() {
    [ -e "$1/exit" ] && return 1
    recorded_alive "$1/wrapper" && return 0
    recorded_alive "$1/pid" && return 0
    [ -e "$1/exit" ] && return 1 # written by the wrapper as it ended, since the first look
    [ -e "$1/wrapper" ] || return 0 # a start in flight: the wrapper writes it first thing
    end_lost "$1" "the run's wrapper and agent were gone without an exit status: marked lost"
    return 1
}

# start_lock_wait RD SECONDS: wait (at most SECONDS) for a remote start in flight in RD to be
# done: the start script holds RD/start.lock from the moment it makes RD until `pid` or
# `exit` exists, so a run is never judged unstarted while it starts.
start_lock_wait() {
    [ -e "$1/start.lock" ] || return 0
    command -v flock >/dev/null 2>&1 || return 0
    flock -s -w "$2" "$1/start.lock" true 2>/dev/null
    return 0
}

# await_start RD SECONDS: wait for the wrapper's `pid` (or its `exit`: the agent could not be
# started), then print the two lines a start answers with: `pid` and `wrapper`.
await_start() {
    _n=$(($2 * 20))
    while [ ! -s "$1/pid" ] && [ ! -e "$1/exit" ]; do
        _n=$((_n - 1))
        if [ "$_n" -lt 0 ]; then
            echo "the wrapper wrote no pid file in $1" >&2
            return 91
        fi
        sleep 0.05
    done
    cat -- "$1/pid" 2>/dev/null || echo
    cat -- "$1/wrapper" 2>/dev/null || echo
}

# add_piece FILE FROM LIMIT: one more piece for fetch_pieces (kept in _pf1, _po1, _pl1, ...,
# _np of them; sh has no arrays).
add_piece() {
    _np=$((${_np:-0} + 1))
    eval "_pf$_np=\$1 _po$_np=\$2 _pl$_np=\$3"
}

# fetch_pieces: print the pieces added (then forget them): for each, in order, a header line
# `SIZE LEN` and exactly LEN bytes of FILE from byte FROM (0 = the first); SIZE is FILE's size
# when looked at, LEN = min(SIZE - FROM, LIMIT), 0 when negative; a missing FILE is `-1 0`.
# Files are only ever appended to, so the LEN bytes a header promises are there (a file cut
# short meanwhile breaks the count, which the reader sees).  One `stat` for all the files, one
# `dd` per piece that has bytes.
fetch_pieces() {
    set --
    _i=1
    while [ "$_i" -le "${_np:-0}" ]; do
        eval "_f=\$_pf$_i"
        # shellcheck disable=SC2154 # set through eval
        if [ -e "$_f" ]; then
            set -- "$@" "$_f"
            eval "_pe$_i=1"
        else
            eval "_pe$_i=0"
        fi
        _i=$((_i + 1))
    done
    _sizes=""
    [ "$#" -eq 0 ] || _sizes=$(stat -c %s -- "$@" 2>/dev/null)
    set -f
    # shellcheck disable=SC2086 # split on purpose: one size per word
    _emit_pieces $_sizes
    set +f
    _np=0
}

# _emit_pieces SIZE...: fetch_pieces' helper, from the sizes of the files that exist.
_emit_pieces() {
    _i=1
    while [ "$_i" -le "$_np" ]; do
        eval "_f=\$_pf$_i _from=\$_po$_i _limit=\$_pl$_i _there=\$_pe$_i"
        # shellcheck disable=SC2154 # set through eval
        if [ "$_there" = 0 ] || [ "$#" -eq 0 ]; then
            echo "-1 0"
        else
            _len=$(($1 - _from))
            [ "$_len" -le "$_limit" ] || _len=$_limit
            [ "$_len" -ge 0 ] || _len=0
            echo "$1 $_len"
            shift
            if [ "$_len" -gt 0 ]; then
                dd if="$_f" bs=1048576 skip="$_from" count="$_len" \
                    iflag=skip_bytes,count_bytes 2>/dev/null
            fi
        fi
        _i=$((_i + 1))
    done
}

# read_claim WORKDIR: set h (holder), d (its description) and age (seconds since the holder
# last renewed it: the claim file's own mtime) from WORKDIR's claim (supervisor/claim.py);
# false when WORKDIR has no claim.
# shellcheck disable=SC2034 # h, d and age are for the caller
read_claim() {
    { IFS= read -r h && IFS= read -r d; } 2>/dev/null <"$1/.agentize-fleet/claim" &&
        age=$(($(date +%s) - $(stat -c %Y -- "$1/.agentize-fleet/claim")))
}
