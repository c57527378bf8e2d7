# Signal a run's whole tree, guarded by its agent's start time: a reused pid is never signalled.
#
#   sh -c SIGNAL sh PID TICKS SIGNAL_NAME
set -u
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
kill_tree "$1" "$2" "$3"
