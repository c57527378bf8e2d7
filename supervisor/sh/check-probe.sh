# What `agentize-fleet check` wants to know of a machine, as key=value lines: git, the agent,
# free disk at the workdir (or its nearest existing parent), the workdir's claim, the load.
#
#   sh -c CHECK_PROBE sh AGENT WORKDIR
# shellcheck source=lib.sh
. "$(dirname -- "$0")/lib.sh"
agent=$1
wd=$2
if command -v git >/dev/null 2>&1; then
    echo "git=$(git --version 2>/dev/null | head -n 1)"
else
    echo "git="
fi
if command -v "$agent" >/dev/null 2>&1; then echo "agent=1"; else echo "agent=0"; fi
# shellcheck disable=SC2088 # the literal "~/" the config may hold
case $wd in
"~") wd=$HOME ;;
"~/"*) wd=$HOME/${wd#"~/"} ;;
/*) ;;
*) wd=$HOME/$wd ;;
esac
d=$wd
while [ ! -e "$d" ] && [ "$d" != / ] && [ -n "$d" ]; do d=$(dirname -- "$d"); done
df -Pk -- "$d" 2>/dev/null | awk 'NR == 2 { print "disk_kib=" $4 }'
# The workdir's claim (supervisor/claim.py): which fleet holds it, and how fresh its lease is.
if read_claim "$wd"; then
    echo "claim_holder=$h"
    echo "claim_age=$age"
    echo "claim_by=$d"
fi
if [ -r /proc/loadavg ]; then
    read -r l _ </proc/loadavg && echo "load=$l"
else
    uptime 2>/dev/null | sed -n 's/.*load average[s]*: *\([0-9.]*\).*/load=\1/p'
fi
