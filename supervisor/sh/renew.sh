# Renew leases: touch each FILE that exists (a run's RUN_DIR/lease, a workdir's claim); a file
# gone (a run directory removed, a claim released) is not made again.
#
#   sh -c RENEW sh FILE...
touch -c -- "$@"
