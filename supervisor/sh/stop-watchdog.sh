# Ends the lease watchdogs of runner.sh (argument: the lease file) once every run they guard
# has ended, rather than at their next look, up to a third of the lease timeout later.  A run
# still going (on a machine the fleet lost, say) keeps them.  Every watchdog ever started for
# the lease is listed in LEASE.dog.all (LEASE.dog names the one in charge): two runs starting
# at once may each start one, and the one not named would otherwise linger until its next look.
#
#   sh -c STOP_WATCHDOG sh LEASE
set -u
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
while read -r rd; do
    run_left "$rd" && exit 0
done <"$1.runs"
cat -- "$1.dog.all" "$1.dog" 2>/dev/null | while read -r pid ticks; do
    same_process "$pid" "$ticks" && kill "$pid" 2>/dev/null
done
exit 0
