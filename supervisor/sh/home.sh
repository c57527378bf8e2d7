# The absolute home directory of USER (empty: the login's own), printed without a newline.
# USER was checked to be a plain user name by the caller: it is pasted into `cd ~USER`.
#
#   sh -c HOME sh USER
if [ -z "$1" ]; then
    h=$HOME
    case $h in /*) ;; *) h=$(cd && pwd -P) || exit 1 ;; esac
else
    case $1 in *[!A-Za-z0-9._-]* | -*) echo "bad user name: $1" >&2; exit 2 ;; esac
    h=$(eval "cd ~$1" && pwd -P) || exit 1
fi
printf '%s' "$h"
