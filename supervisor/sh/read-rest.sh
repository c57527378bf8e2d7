# At most LIMIT bytes of FILE from byte FROM (1-based); nothing when FILE does not exist.
#
#   sh -c READ_REST sh FILE FROM LIMIT
[ -e "$1" ] || exit 0
tail -c "+$2" -- "$1" | head -c "$3"
