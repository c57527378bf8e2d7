# The run directories at any depth under ROOT that have no `exit` file: a run started (its
# `meta` or `wrapper` is there) whose end nobody recorded.  One per line, possibly twice.
#
#   sh -c SCAN sh ROOT
[ -d "$1" ] || exit 0
find "$1" -type f \( -name wrapper -o -name meta \) -print 2>/dev/null | while IFS= read -r f; do
    d=${f%/*}
    [ -e "$d/exit" ] || printf '%s\n' "$d"
done
