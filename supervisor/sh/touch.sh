# Renew a lease: touch FILE, making its (private) directory first.
#
#   sh -c TOUCH sh FILE
umask 077
mkdir -p -- "$(dirname -- "$1")" && touch -- "$1"
