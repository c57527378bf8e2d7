# The paths under DIR (relative to it) matching any PATTERN, each followed by a NUL.
#
#   sh -c GLOB sh DIR PATTERN...
cd -- "$1" 2>/dev/null || exit 0
shift
IFS=
for p in "$@"; do
    # shellcheck disable=SC2231 # the pattern is meant to expand (IFS is empty: no splitting)
    for f in $p; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
    done
done
