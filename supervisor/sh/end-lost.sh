# End a run found with its wrapper gone and no exit status (ORPHANED or DEAD): kill what is
# left of its tree, write NOTE and `exit` = lost.
#
#   sh -c END_LOST sh RUN_DIR NOTE
set -u
umask 077
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
end_lost "$1" "$2"
