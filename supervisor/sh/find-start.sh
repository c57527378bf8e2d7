# After a start whose answer was lost with the link: `none` when the wrapper never ran (a new
# start is safe), else what start.sh answers.  Waits for a start still in flight.
#
#   sh -c FIND_START sh RUN_DIR WAIT
set -u
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
rd=$1
[ -d "$rd" ] || { echo none; exit 0; }
start_lock_wait "$rd" "$(($2 + 5))"
[ -e "$rd/wrapper" ] || { echo none; exit 0; }
await_start "$rd" "$2"
