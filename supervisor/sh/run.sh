# A helper command (git, mkdir, ...) in directory DIR (empty: the login's directory).
#
#   sh -c RUN sh DIR COMMAND...
[ -z "$1" ] || cd -- "$1" || exit 1
shift
exec "$@"
