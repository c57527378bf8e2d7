# Start a run on a remote machine, detached, and answer with its `pid` and `wrapper` lines.
#
#   sh -c START sh RUN_DIR DOG META WAIT COMMAND...     (the run wrapper's text on stdin)
#
# COMMAND starts the wrapper (RUN_DIR/runner.sh, copied from stdin); DOG is where the shift's
# lease watchdog keeps its files (see runner.sh), RUN_DIR/lease the run's own lease, made here,
# fresh from the start; META is the text of RUN_DIR/meta; WAIT is how many seconds the wrapper has to write its `pid`.  The run directory
# and what is written here are private (umask 077); the wrapper starts with the login's own
# umask, which it gives the agent.  From the moment RUN_DIR exists until `pid` or `exit` does,
# RUN_DIR/start.lock is held (flock): a supervisor that died during the start leaves a run the
# next one's probe waits for, never one it takes for unstarted.  Exit 90: RUN_DIR holds a run
# already; 91: no pid in time; 92: setsid missing.
set -eu
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
rd=$1
dog=$2
meta=$3
wait_s=$4
shift 4
command -v setsid >/dev/null 2>&1 || { echo "setsid not found (install util-linux)" >&2; exit 92; }
login_umask=$(umask)
umask 077
mkdir -p -- "$rd"
exec 9>>"$rd/start.lock"
if command -v flock >/dev/null 2>&1; then
    flock -w 30 9 || { echo "cannot lock $rd/start.lock" >&2; exit 2; }
fi
if [ -e "$rd/wrapper" ]; then echo "run directory $rd already holds a run" >&2; exit 90; fi
cat >"$rd/runner.sh"
printf '%s' "$meta" >"$rd/meta"
: >"$rd/lease"
[ -d "${dog%/*}" ] || mkdir -p -- "${dog%/*}"
cd /
# The wrapper must not hold the lock (fd 9): it would keep it for the whole run.
(umask "$login_umask" && exec "$@") </dev/null >/dev/null 2>&1 9>&- &
await_start "$rd" "$wait_s"
