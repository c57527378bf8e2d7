# Take a workdir's claim for this fleet (supervisor/claim.py).
#
#   sh -c CLAIM sh WORKDIR HOLDER LEASE STALE_AFTER DESCRIPTION
#
# Exit 0: ours (the lease is touched, so it is fresh from this moment).  Exit 75: held by a
# live fleet; stdout says "AGE DESCRIPTION" of the holder.  Any other exit: could not tell.
# The claim, its lock and the lease are private files (umask 077).
set -u
umask 077
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
dir=$1/.agentize-fleet holder=$2 lease=$3 stale=$4 desc=$5
mkdir -p -- "$dir" "$(dirname -- "$lease")" || exit 2
exec 9>>"$dir/claim.lock" || exit 2
if command -v flock >/dev/null 2>&1; then
    flock -w 30 9 || { echo "cannot lock $dir/claim.lock" >&2; exit 2; }
fi
if read_claim "$1" && [ "$h" != "$holder" ] && [ "$age" -lt "$stale" ]; then
    echo "$age $d"
    exit 75
fi
touch -- "$lease" || exit 2
printf '%s\n%s\n%s\n' "$holder" "$lease" "$desc" >"$dir/claim.new" &&
    mv -f -- "$dir/claim.new" "$dir/claim"
