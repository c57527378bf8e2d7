#!/bin/sh
# agentize-fleet run wrapper: the one way every agent run starts, locally and over SSH.
#
#   sh runner.sh RUN_DIR LEASE_FILE LEASE_TIMEOUT WORKDIR UMASK -- ARGV...
#
# The agent (ARGV, executed without a shell) runs in a session of its own, so that its process
# group id is its pid and `kill -SIG -- -PID` reaches its whole tree.  Files in RUN_DIR (their
# rules: lib.sh and supervisor/hosts/runfiles.py):
#   wrapper         "PID START_TICKS" of this wrapper, written first: the wrapper is alive
#                   while /proc/PID/stat still shows START_TICKS
#   pid             "PID START_TICKS" of the agent (0 if it was gone before it could be read)
#   stdout, stderr  the agent's output, appended (read back from any byte offset)
#   exit            the agent's exit status (128+N when killed by signal N)
#   note            why the watchdog intervened (lease expired), if it did
# Each is one short write: readers take a line without its newline as "not yet".  What the
# wrapper writes is private (umask 077: files 0600); the agent runs with UMASK (octal; empty:
# the umask the wrapper was started with), the user's own, since it writes into git worktrees.
# When the agent ends, whatever it left behind in its group is killed too (systemd's
# KillMode=control-group).
#
# The lease watchdog: one per LEASE_FILE (one per fleet and machine), not one per run.  Every
# run registers its RUN_DIR in LEASE_FILE.runs and starts the watchdog if the one named in
# LEASE_FILE.dog ("PID START_TICKS") is not alive.  The watchdog kills the group of every
# registered run that has not ended once LEASE_FILE has not been touched for LEASE_TIMEOUT
# seconds (0 disables it): a run never outlives its supervisor unnoticed.  It leaves when no
# registered run is left (or when another watchdog is the one named), after checking again
# that no run registered meanwhile; a run whose wrapper and agent are both gone without an
# exit status counts as ended (it is marked lost).  Two runs starting at once may both start
# one: the one named last stays, the other leaves at its next look.  Starting a run costs no
# extra process.  POSIX sh, coreutils and util-linux's setsid only.
set -u
run_dir=$1
lease=$2
lease_timeout=$3
workdir=$4
agent_umask=$5
shift 6
[ -n "$agent_umask" ] || agent_umask=$(umask)
umask 077
# Both are used after the `cd` below, by the watchdog too.
case $run_dir in /*) ;; *) run_dir=$PWD/$run_dir ;; esac
case $lease in /*) ;; *) lease=$PWD/$lease ;; esac

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
    # "Renewed since the last look" is `lease -nt stamp`; rewriting the stamp (a builtin
    # echo) marks the look, so only `sleep` is ever forked.
    stamp="$dog.seen"
    echo >"$stamp"
    missed=0
    # The first look comes after a second: a watchdog started at the same moment as another
    # one (two runs starting together) and not named by LEASE_FILE.dog leaves at once.
    pause=1
    while :; do
        [ -z "$stop" ] || exit 0
        sleep "$pause" &
        nap=$!
        [ -z "$stop" ] || { kill "$nap" 2>/dev/null; exit 0; }
        wait "$nap"
        nap=""
        [ -z "$stop" ] || exit 0
        slept=$pause
        pause=$every
        if read_pair "$dog" && [ "$_pid" != "$me" ] && same_process "$_pid" "$_ticks"; then
            exit 0 # another watchdog is the one named
        fi
        echo "$me $my_ticks" >"$dog"
        # shellcheck disable=SC3013 # dash, bash, busybox sh and ksh all have -nt
        if [ "$lease" -nt "$stamp" ]; then
            echo >"$stamp"
            missed=0
        else
            missed=$((missed + slept))
        fi
        if [ "$missed" -gt "$limit" ]; then
            stop_runs TERM "lease $lease not renewed for ${limit}s: stopping the run"
            sleep 5
            stop_runs KILL ""
            exit 0
        fi
        if ! runs_left; then
            : >"$dog" # leaving; a run registered from now on starts a new watchdog
            runs_left || exit 0
            echo "$me $my_ticks" >"$dog" # one did register meanwhile: stay
        fi
    done
}

# Has a registered run not ended?
runs_left() {
    while read -r _rd; do
        run_left "$_rd" && return 0
    done <"$registry"
    return 1
}

# Signal the tree of every registered run that has not ended, if it is still the agent's.
stop_runs() {
    while read -r _rd; do
        [ -e "$_rd/exit" ] && continue
        recorded_alive "$_rd/pid" || continue
        [ -n "$2" ] && echo "$2" >>"$_rd/note"
        kill_tree "$_pid" "$_ticks" "$1"
    done <"$registry"
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
    [ "$every" -ge 1 ] || every=1
    dog="$lease.dog"
    registry="$lease.runs"
    echo "$run_dir" >>"$registry"
    if ! recorded_alive "$dog"; then
        watchdog </dev/null >/dev/null 2>&1 &
        ticks_of "$!"
        echo "$! $_t" >"$dog" # named at once: the next run to start finds it alive
        # Every watchdog started for this lease: the fleet's dismissal ends them all, the one
        # named and any other not yet gone (one that lost the naming leaves only at a look).
        echo "$! $_t" >>"$dog.all"
    fi
    ;;
esac

wait "$agent"
code=$?
kill -s KILL -- "-$agent" 2>/dev/null
echo "$code" >"$run_dir/exit"
exit 0
