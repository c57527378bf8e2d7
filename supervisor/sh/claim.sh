# Take a workdir's claim for this fleet (supervisor/claim.py).
#
#   sh -c CLAIM sh WORKDIR HOLDER STALE_AFTER DESCRIPTION
#
# Exit 0: ours (the claim is written, so it is fresh from this moment; the fleet renews its
# mtime with its runs' leases).  Exit 75: held by a live fleet (renewed less than STALE_AFTER
# seconds ago); stdout says "AGE DESCRIPTION" of the holder.  Any other exit: could not tell.
# The claim and its lock are private files (umask 077).
set -u
umask 077
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
dir=$1/.agentize-fleet holder=$2 stale=$3 desc=$4
mkdir -p -- "$dir" || exit 2
exec 9>>"$dir/claim.lock" || exit 2
if command -v flock >/dev/null 2>&1; then
    flock -w 30 9 || { echo "cannot lock $dir/claim.lock" >&2; exit 2; }
fi
if read_claim "$1" && [ "$h" != "$holder" ] && [ "$age" -lt "$stale" ]; then
    echo "$age $d"
    exit 75
fi
printf '%s\n%s\n' "$holder" "$desc" >"$dir/claim.new" && mv -f -- "$dir/claim.new" "$dir/claim"
