# Stream RUN_DIR/stdout from byte FROM_OUT (1-based) to stdout and RUN_DIR/stderr from byte
# FROM_ERR to stderr, until the run has ended.  Exit 0: ended (`exit` written); 4: the wrapper
# died without writing it; 3: no such run directory.  When stdin reaches EOF (the reader went
# away, or the link died) everything started here is stopped.
#
#   sh -c STREAM sh RUN_DIR FROM_OUT FROM_ERR
set -u
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
rd=$1
cd -- "$rd" 2>/dev/null || exit 3
exec 3<&0
tail -s 0.5 -c "+$2" -F stdout 2>/dev/null &
a=$!
tail -s 0.5 -c "+$3" -F stderr >&2 2>/dev/null &
b=$!
me=$$
(cat <&3 >/dev/null 2>&1; kill "$a" "$b" "$me" 2>/dev/null) >/dev/null 2>&1 &
c=$!
exec 3<&-
code=0
read_pair wrapper || _pid=""
w=$_pid
n=0
while [ ! -e exit ]; do
    n=$((n + 1))
    # kill -0 is cheap; every 5 s also make sure the pid is still the wrapper's
    if [ -z "$w" ] || ! kill -0 "$w" 2>/dev/null ||
        { [ $((n % 25)) -eq 0 ] && ! recorded_alive wrapper; }; then
        [ -e exit ] || code=4
        break
    fi
    sleep 0.2
done
kill "$c" 2>/dev/null
kill "$a" "$b" 2>/dev/null
wait "$a" "$b" 2>/dev/null
exit "$code"
