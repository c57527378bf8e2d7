# The processes of a run's session: first `hz TICKS_PER_SECOND`, then one line per process,
# "PID RSS_KIB STAT CPU_TICKS" (utime + stime, fields 14 and 15 of /proc/PID/stat: two looks
# give the CPU% in between).  Nothing when the agent's pid now names another process.
#
#   sh -c TREE sh PID TICKS
set -u
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
case $1 in '' | *[!0-9]* | 0 | 1) exit 0 ;; esac
if ! same_process "$1" "$2" && ticks_of "$1"; then exit 0; fi
echo "hz $(getconf CLK_TCK 2>/dev/null || echo 100)"
ps -o pid=,rss=,stat= -s "$1" 2>/dev/null | while read -r p r s; do
    t=""
    if read -r st <"/proc/$p/stat" 2>/dev/null; then
        set -f
        # shellcheck disable=SC2086 # split on purpose: the fields after the command name
        set -- ${st##*) }
        set +f
        t=$((${12} + ${13}))
    fi
    echo "$p $r $s $t"
done
