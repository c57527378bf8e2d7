# Pieces of many files in one command (the SSH host's output reads when no watcher runs; the
# watcher serves the same on its stdin, see watch.sh):
#
#   sh -c FETCH sh FILE FROM LIMIT [FILE FROM LIMIT...]
#
# For each FILE, in order, a header line `SIZE LEN` and then exactly LEN bytes of FILE from
# byte FROM (lib.sh's fetch_pieces); then `end`.
set -u
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
while [ "$#" -ge 3 ]; do
    add_piece "$1" "$2" "$3"
    shift 3
done
fetch_pieces
echo end
