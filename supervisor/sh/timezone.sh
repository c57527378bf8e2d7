# The machine's local time zone as it can be told: `tz` ($TZ), `etc` (/etc/timezone), `link`
# (where /etc/localtime points), `offset` (`date +%z`), one line each, when known.  Python
# (supervisor/hosts/tz.py) picks the best of them.
#
#   sh -c TIMEZONE sh
[ -z "${TZ:-}" ] || printf 'tz %s\n' "$TZ"
if [ -r /etc/timezone ] && IFS= read -r z </etc/timezone; then printf 'etc %s\n' "$z"; fi
if l=$(readlink /etc/localtime 2>/dev/null); then printf 'link %s\n' "$l"; fi
printf 'offset %s\n' "$(date +%z)"
