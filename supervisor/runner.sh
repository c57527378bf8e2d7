#!/bin/sh
# agentize-fleet run wrapper: the one way every agent run starts, locally and over SSH.
#
#   sh runner.sh RUN_DIR LEASE_FILE LEASE_TIMEOUT WORKDIR -- ARGV...
#
# The agent (ARGV, executed without a shell) runs in a session of its own, so that its process
# group id is its pid and `kill -SIG -- -PID` reaches its whole tree.  Files in RUN_DIR:
#   stdout, stderr  the agent's output, appended (read back from any byte offset)
#   pid             "PID START_TICKS" (field 22 of /proc/PID/stat; 0 if the agent was gone
#                   before it could be read), one short write
#   wrapper         the wrapper's own pid
#   exit            the agent's exit status (128+N when killed by signal N), one short write
#   note            why the watchdog intervened (lease expired), if it did
# When the agent ends, whatever it left behind in its group is killed too (systemd's
# KillMode=control-group).
#
# The lease watchdog: one per LEASE_FILE (one per fleet and machine), not one per run.  Every
# run registers its RUN_DIR in LEASE_FILE.runs and starts the watchdog if the one named in
# LEASE_FILE.dog ("PID START_TICKS") is not alive.  The watchdog kills the group of every
# registered run that has not ended once LEASE_FILE has not been touched for LEASE_TIMEOUT
# seconds (0 disables it): a run never outlives its supervisor unnoticed.  It leaves when no
# registered run is left (or when another watchdog is the one named), after checking again
# that no run registered meanwhile.  Two runs starting at once may both start one: the one
# named last stays, the other leaves at its next look.  Starting a run costs no extra process.
# POSIX sh, coreutils and util-linux's setsid only: remote machines need nothing else.
set -u
run_dir=$1
lease=$2
lease_timeout=$3
workdir=$4
shift 5
# Both are used after the `cd` below, by the watchdog too.
case $run_dir in /*) ;; *) run_dir=$PWD/$run_dir ;; esac
case $lease in /*) ;; *) lease=$PWD/$lease ;; esac

# Field 20 after "PID (COMM) ", i.e. field 22 of /proc/PID/stat: the start time in ticks.
ticks_of() {
    _t=""
    if read -r _st <"/proc/$1/stat" 2>/dev/null; then
        set -f
        _field20 ${_st##*) }
        set +f
    fi
}
_field20() { _t=${20}; }

# Is the watchdog named in LEASE_FILE.dog alive, as the very process that wrote it?
dog_alive() {
    read -r _dpid _dticks <"$dog" 2>/dev/null || return 1
    ticks_of "$_dpid"
    [ -n "$_t" ] && [ "$_t" = "$_dticks" ]
}

# Has a registered run not ended (no exit file)?  Its wrapper may have been killed: its agent
# may live on, so it counts until the lease says otherwise.
runs_left() {
    while read -r _rd; do
        [ -e "$_rd/exit" ] || return 0
    done <"$registry"
    return 1
}

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
        if read -r _dpid _dticks <"$dog" 2>/dev/null && [ "$_dpid" != "$me" ] && dog_alive; then
            exit 0  # another watchdog is the one named
        fi
        echo "$me $my_ticks" >"$dog"
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
            : >"$dog"  # leaving; a run registered from now on starts a new watchdog
            runs_left || exit 0
            echo "$me $my_ticks" >"$dog"  # one did register meanwhile: stay
        fi
    done
}

# Signal the group of every registered run that has not ended, if it is still the agent's.
stop_runs() {
    while read -r _rd; do
        [ -e "$_rd/exit" ] && continue
        read -r _apid _aticks <"$_rd/pid" 2>/dev/null || continue
        ticks_of "$_apid"
        [ -n "$_t" ] && [ "$_t" = "$_aticks" ] || continue
        [ -n "$2" ] && echo "$2" >>"$_rd/note"
        kill -s "$1" -- "-$_apid" 2>/dev/null
    done <"$registry"
}

echo $$ >"$run_dir/wrapper"
: >>"$run_dir/stdout"
: >>"$run_dir/stderr"

if ! cd "$workdir" 2>>"$run_dir/stderr"; then
    echo 127 >"$run_dir/exit"
    exit 127
fi

# Our background job is not a process group leader (we are, in our own session), so setsid
# makes the new session without forking and then becomes the agent: $! is the agent's pid and,
# once setsid has run, its process group and session id too.  Its start time is fixed at fork.
setsid "$@" </dev/null >>"$run_dir/stdout" 2>>"$run_dir/stderr" &
agent=$!
ticks_of "$agent"
# An agent that ended at once may be reaped already (dash collects finished jobs early): its
# start time is unknown, and 0 matches no live process, so nobody ever signals that pid.
ticks=${_t:-0}
# One short write: readers take a line without both fields (or its newline) as "not yet".
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
    if ! dog_alive; then
        watchdog </dev/null >/dev/null 2>&1 &
        ticks_of "$!"
        echo "$! $_t" >"$dog"  # named at once: the next run to start finds it alive
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
