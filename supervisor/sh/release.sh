# Give a workdir's claim back, if it is still HOLDER's.
#
#   sh -c RELEASE sh WORKDIR HOLDER
dir=$1/.agentize-fleet
[ -e "$dir/claim" ] || exit 0
exec 9>>"$dir/claim.lock" || exit 2
if command -v flock >/dev/null 2>&1; then flock -w 10 9 || exit 2; fi
IFS= read -r h 2>/dev/null <"$dir/claim" && [ "$h" = "$2" ] && rm -f -- "$dir/claim"
exit 0
