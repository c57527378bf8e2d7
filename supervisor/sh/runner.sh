#!/bin/sh
# agentize-fleet run wrapper: the one way every agent run starts, locally and over SSH.
#
#   sh runner.sh RUN_DIR DOG LEASE_TIMEOUT WORKDIR UMASK -- ARGV...
#
# The agent (ARGV, executed without a shell) runs in a session of its own, so that its process
# group id is its pid and `kill -SIG -- -PID` reaches its whole tree.  Files in RUN_DIR (their
# rules: lib.sh and supervisor/hosts/runfiles.py):
#   wrapper         "PID START_TICKS" of this wrapper, written first: the wrapper is alive
#                   while /proc/PID/stat still shows START_TICKS
#   pid             "PID START_TICKS" of the agent (0 if it was gone before it could be read)
#   stdout, stderr  the agent's output, appended (read back from any byte offset)
#   exit            the agent's exit status (128+N when killed by signal N)
#   lease           made by the host's start; its mtime is renewed by the fleet for as long as
#                   it supervises this run
#   note            why the watchdog intervened, if it did
# Each is one short write: readers take a line without its newline as "not yet".  What the
# wrapper writes is private (umask 077: files 0600); the agent runs with UMASK (octal; empty:
# the umask the wrapper was started with), the user's own, since it writes into git worktrees.
# When the agent ends, whatever it left behind in its group is killed too (systemd's
# KillMode=control-group).
#
# The lease watchdog: one per DOG (the shift's lease path on this machine), not one per run.
# Every run registers in the directory DOG.runs (an entry named after this wrapper's pid and
# start ticks, holding RUN_DIR) and starts the watchdog if the one named in DOG.dog ("PID
# START_TICKS") is not alive.  Every min(LEASE_TIMEOUT / 3, 5) seconds the watchdog looks at
# each registered run: the entry of a run that ended is removed (a look costs what the live
# runs cost, not the shift's whole history); a run whose own lease has not been renewed for
# LEASE_TIMEOUT seconds (0 disables the watchdog) is stopped, its note saying so: SIGTERM, then
# SIGKILL 5 s later, and `exit` = lost when its wrapper is gone too.  A run never outlives the
# supervision of its fleet unnoticed, and a fleet that stops supervising one run (its machine
# was away) no longer keeps it alive by renewing the others.  The watchdog leaves when no
# entry is left (or when another watchdog is the one named), after checking again that no
# run registered meanwhile; a run whose wrapper and agent are both gone without an exit status
# counts as ended (it is marked lost).  Two runs starting at once may both start one: the one
# named last stays, the other leaves at its next look.  Starting a run costs no extra process
# (but the first run's `mkdir` of DOG.runs).  POSIX sh, coreutils and util-linux's setsid only.
set -u
run_dir=$1
dog=$2
lease_timeout=$3
workdir=$4
agent_umask=$5
shift 6
[ -n "$agent_umask" ] || agent_umask=$(umask)
umask 077
# Both are used after the `cd` below, by the watchdog too.
case $run_dir in /*) ;; *) run_dir=$PWD/$run_dir ;; esac
case $dog in /*) ;; *) dog=$PWD/$dog ;; esac

# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"

watchdog() {
    nap="" stop=""
    # TERM (the fleet's dismissal) ends the watchdog and its nap.  It may come between the fork
    # of a nap and `nap=$!`: the flag then has that nap killed right after, never left behind.
    trap 'stop=1; [ -n "$nap" ] && kill "$nap" 2>/dev/null' TERM
    ticks_of self
    my_ticks=$_t
    read -r me _rest </proc/self/stat
    # "Renewed within LEASE_TIMEOUT" is `RUN_DIR/lease -nt stamp`, the stamp touched to
    # LEASE_TIMEOUT seconds ago at each look: a builtin test per run, no fork.
    stamp="$dog.stamp"
    stopped=" "
    # The first look comes after a second: a watchdog started at the same moment as another
    # one (two runs starting together) and not named by DOG.dog leaves at once.
    pause=1
    while :; do
        doze "$pause"
        pause=$every
        if read_pair "$dog.dog" && [ "$_pid" != "$me" ] && same_process "$_pid" "$_ticks"; then
            exit 0 # another watchdog is the one named
        fi
        echo "$me $my_ticks" >"$dog.dog"
        if touch -d "$limit seconds ago" -- "$stamp" 2>/dev/null; then
            look TERM
            if [ "$stopping" = 1 ]; then
                doze 5
                look KILL
            fi
        else
            look "" # cannot tell a lease's age here: stop nothing
        fi
        if [ "$left" = 0 ]; then
            : >"$dog.dog" # leaving; a run registered from now on starts a new watchdog
            look ""
            [ "$left" = 1 ] || exit 0
            echo "$me $my_ticks" >"$dog.dog" # one did register meanwhile: stay
        fi
    done
}

# doze SECONDS: sleep, unless the fleet dismissed the watchdog (which then leaves).
doze() {
    [ -z "$stop" ] || exit 0
    sleep "$1" &
    nap=$!
    [ -z "$stop" ] || { kill "$nap" 2>/dev/null; exit 0; }
    wait "$nap"
    nap=""
    [ -z "$stop" ] || exit 0
}

# look [TERM|KILL]: one look at every registered run.  The entries of ended runs go; with TERM,
# a run whose lease is older than the stamp is signalled (its note written the first time),
# with KILL those signalled before that are still there.  Sets `left` (a registered run has
# not ended) and `stopping` (a run was signalled).
look() {
    left=0
    stopping=0
    for entry in "$dog.runs"/*; do
        [ -e "$entry" ] || continue # no entry at all: the pattern itself
        if ! IFS= read -r rd 2>/dev/null <"$entry"; then
            left=1 # being written
            continue
        fi
        if ! run_left "$rd"; then
            rm -f -- "$entry"
            continue
        fi
        left=1
        name=${entry##*/}
        case $stopped in *" $name "*) signalled=1 ;; *) signalled=0 ;; esac
        case $1 in
        "") continue ;;
        KILL) [ "$signalled" = 1 ] || continue ;; # only those TERM could not end
        *)
            # shellcheck disable=SC3013 # dash, bash, busybox sh and ksh all have -nt
            [ "$rd/lease" -nt "$stamp" ] && continue
            if [ "$signalled" = 0 ]; then
                echo "stopped by the watchdog: lease not renewed for ${limit}s" >>"$rd/note"
                stopped="$stopped$name "
            fi
            ;;
        esac
        stopping=1
        if read_pair "$rd/pid"; then kill_tree "$_pid" "$_ticks" "$1"; fi
        if [ "$1" = KILL ] && ! recorded_alive "$rd/wrapper"; then
            end_lost "$rd" "its wrapper was gone too: marked lost"
        fi
    done
}

ticks_of $$
echo "$$ $_t" >"$run_dir/wrapper"
: >>"$run_dir/stdout"
: >>"$run_dir/stderr"

if ! cd "$workdir" 2>>"$run_dir/stderr"; then
    echo 127 >"$run_dir/exit"
    exit 127
fi

# Our background job is not a process group leader (we are, in our own session), so setsid
# makes the new session without forking and then becomes the agent: $! is the agent's pid and,
# once setsid has run, its process group and session id too.  Its start time is fixed at fork,
# and so is its umask (the user's, given back for the fork only).
umask "$agent_umask"
setsid "$@" </dev/null >>"$run_dir/stdout" 2>>"$run_dir/stderr" &
agent=$!
umask 077
ticks_of "$agent"
# An agent that ended at once may be reaped already (dash collects finished jobs early): its
# start time is unknown, and 0 matches no live process, so nobody ever signals that pid.
ticks=${_t:-0}
echo "$agent $ticks" >"$run_dir/pid"

case "$lease_timeout" in
0 | 0.0 | "") ;;
*)
    limit=${lease_timeout%%.*}
    [ "$limit" -ge 1 ] 2>/dev/null || limit=1
    every=$((limit / 3))
    [ "$every" -le 5 ] || every=5
    [ "$every" -ge 1 ] || every=1
    [ -d "$dog.runs" ] || mkdir -p -- "$dog.runs"
    ticks_of $$
    echo "$run_dir" >"$dog.runs/$$-$_t"
    if ! recorded_alive "$dog.dog"; then
        watchdog </dev/null >/dev/null 2>&1 &
        ticks_of "$!"
        echo "$! $_t" >"$dog.dog" # named at once: the next run to start finds it alive
        # Every watchdog started for DOG: the fleet's dismissal ends them all, the one named
        # and any other not yet gone (one that lost the naming leaves only at a look).
        echo "$! $_t" >>"$dog.dog.all"
    fi
    ;;
esac

wait "$agent"
code=$?
kill -s KILL -- "-$agent" 2>/dev/null
echo "$code" >"$run_dir/exit"
exit 0
