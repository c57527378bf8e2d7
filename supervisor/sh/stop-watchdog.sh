# Ends the lease watchdogs of runner.sh (argument: DOG, the shift's lease path) once every run
# they guard has ended, rather than at their next look, up to five seconds later.  A run still
# going (on a machine the fleet lost, say) keeps them.  Every watchdog ever started for DOG is
# listed in DOG.dog.all (DOG.dog names the one in charge): two runs starting at once may each
# start one, and the one not named would otherwise linger until its next look.
#
#   sh -c STOP_WATCHDOG sh DOG
set -u
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
for entry in "$1.runs"/*; do
    [ -e "$entry" ] || continue
    IFS= read -r rd 2>/dev/null <"$entry" || exit 0 # being written: a run is starting
    run_left "$rd" && exit 0
done
cat -- "$1.dog.all" "$1.dog" 2>/dev/null | while read -r pid ticks; do
    same_process "$pid" "$ticks" && kill "$pid" 2>/dev/null
done
exit 0
