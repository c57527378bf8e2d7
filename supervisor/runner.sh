#!/bin/sh
# agentize-fleet run wrapper: the one way every agent run starts, locally and over SSH.
#
#   sh runner.sh RUN_DIR LEASE_FILE LEASE_TIMEOUT WORKDIR -- ARGV...
#
# The agent (ARGV, executed without a shell) runs in a session of its own, so that its process
# group id is its pid and `kill -SIG -- -PID` reaches its whole tree.  Files in RUN_DIR:
#   stdout, stderr  the agent's output, appended (read back from any byte offset)
#   pid             "PID START_TICKS" (field 22 of /proc/PID/stat), one short write
#   wrapper         the wrapper's own pid
#   exit            the agent's exit status (128+N when killed by signal N), one short write
#   note            why the wrapper intervened (lease expired), if it did
# A watchdog kills the agent's group when LEASE_FILE has not been touched for LEASE_TIMEOUT
# seconds (0 disables it): a run never outlives its supervisor unnoticed.  When the agent ends,
# whatever it left behind in its group is killed too (systemd's KillMode=control-group).
# POSIX sh, coreutils and util-linux's setsid only: remote machines need nothing else.
set -u
run_dir=$1
lease=$2
lease_timeout=$3
workdir=$4
shift 5

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
ticks=""
if read -r st <"/proc/$agent/stat"; then
    start() { ticks=${20}; }
    set -f
    start ${st##*) }
    set +f
fi
# One short write: readers take a line without both fields (or its newline) as "not yet".
echo "$agent $ticks" >"$run_dir/pid"

dog=""
case "$lease_timeout" in
0 | 0.0 | "") ;;
*)
    limit=${lease_timeout%%.*}
    [ "$limit" -ge 1 ] 2>/dev/null || limit=1
    every=$((limit / 3))
    [ "$every" -ge 1 ] || every=1
    (
        trap 'kill "$nap" 2>/dev/null; exit 0' TERM
        # Only `sleep` is forked: "renewed since the last look" is `lease -nt stamp`, and
        # rewriting the stamp (a builtin echo) marks the look.
        stamp="$run_dir/lease-seen"
        echo >"$stamp"
        missed=0
        while :; do
            sleep "$every" &
            nap=$!
            wait "$nap"
            # The wrapper gone (killed) means the group id may no longer be the agent's.
            kill -0 "$$" 2>/dev/null || exit 0
            if [ "$lease" -nt "$stamp" ]; then
                echo >"$stamp"
                missed=0
                continue
            fi
            missed=$((missed + every))
            if [ "$missed" -gt "$limit" ]; then
                echo "lease $lease not renewed for ${limit}s: stopping the run" >>"$run_dir/note"
                kill -s TERM -- "-$agent" 2>/dev/null
                sleep 5
                kill -s KILL -- "-$agent" 2>/dev/null
                exit 0
            fi
        done
    ) </dev/null >/dev/null 2>&1 &
    dog=$!
    ;;
esac

wait "$agent"
code=$?
kill -s KILL -- "-$agent" 2>/dev/null
[ -n "$dog" ] && kill "$dog" 2>/dev/null
echo "$code" >"$run_dir/exit"
exit 0
