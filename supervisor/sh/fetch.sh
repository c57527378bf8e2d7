# Pieces of many files in one command (the SSH host's output reads, for every run that grew):
#
#   sh -c FETCH sh FILE FROM LIMIT [FILE FROM LIMIT...]
#
# For each FILE, in order, a header line `SIZE LEN` and then exactly LEN bytes of FILE from
# byte FROM (0 = the first): SIZE is FILE's size when looked at, LEN = min(SIZE - FROM, LIMIT),
# 0 when negative; a missing FILE is `-1 0`.  Then `end`.  Files are only ever appended to, so
# the LEN bytes a header promises are there (a file cut short under the fetch breaks the count,
# which the host sees and fetches again).  One `stat` for all files, one `dd` per piece.
# shellcheck disable=SC2034,SC2154 # variables named by eval: sh has no arrays
set -u
n=0
while [ "$#" -ge 3 ]; do
    n=$((n + 1))
    eval "f$n=\$1 o$n=\$2 l$n=\$3"
    shift 3
done
set --
i=1
while [ "$i" -le "$n" ]; do
    eval "f=\$f$i"
    if [ -e "$f" ]; then
        set -- "$@" "$f"
        eval "e$i=1"
    else
        eval "e$i=0"
    fi
    i=$((i + 1))
done
sizes=""
if [ "$#" -gt 0 ]; then
    sizes=$(stat -c %s -- "$@" 2>/dev/null)
fi

# emit SIZE...: the pieces, from the sizes `stat` gave for the files that exist.
emit() {
    j=1
    while [ "$j" -le "$n" ]; do
        eval "f=\$f$j from=\$o$j limit=\$l$j there=\$e$j"
        if [ "$there" = 0 ] || [ "$#" -eq 0 ]; then
            echo "-1 0"
        else
            size=$1
            shift
            len=$((size - from))
            [ "$len" -le "$limit" ] || len=$limit
            [ "$len" -ge 0 ] || len=0
            echo "$size $len"
            if [ "$len" -gt 0 ]; then
                dd if="$f" bs=1048576 skip="$from" count="$len" \
                    iflag=skip_bytes,count_bytes 2>/dev/null
            fi
        fi
        j=$((j + 1))
    done
}
set -f
# shellcheck disable=SC2086 # split on purpose: one size per word
emit $sizes
echo end
