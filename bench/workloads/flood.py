"""Bench workload: print LINES lines of exactly 100 bytes to stdout as fast as possible.

    python3 -S flood.py LINES ID RECORD [HOLD [BLOCK]]

Line i is ``w<ID> l<i, 9 digits> `` padded with ``x`` to 99 bytes plus a newline (the format of
``fake-agent``'s ``flood:N``).  The lines are written BLOCK at a time, one ``os.write`` each:
BLOCK 1 (the default) is a program printing line by line to unbuffered or line-buffered output,
as agents streaming their progress do, and the workload of the issue's reference figures (about
1 s for 4 × 250,000 lines straight to files on 2 cores); BLOCK 655 (65,500 bytes) is a program
that buffers its output in pipe-sized blocks, the cheapest case for a raw byte copier.  It
appends ``start ID T PID`` before the first line and ``done ID T PID`` after the last to RECORD
(one O_APPEND write each, so concurrent processes never interleave).  With HOLD it then waits
until the file HOLD exists before exiting, so that no peer sees an early exit (honcho stops every
process as soon as one exits); the benchmark creates HOLD once it has timed the sink.
"""

import os
import sys
import time


def note(record: str, text: str) -> None:
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def main() -> int:
    started = time.time()
    lines, ident, record = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    hold = sys.argv[4] if len(sys.argv) > 4 else ""
    block = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    pid = os.getpid()
    note(record, f"start {ident} {started!r} {pid}\n")
    head = f"w{ident} l"
    pad = 99 - len(head) - 10
    tail = b"x" * pad + b"\n"
    write = os.write
    if block == 1:
        for i in range(lines):
            data = f"{head}{i:09d} ".encode() + tail
            while data:  # a pipe takes a 100-byte write whole; a full one blocks, never splits
                data = data[write(1, data) :]
    for base in range(0, lines if block > 1 else 0, block):
        chunk = b"".join(
            f"{head}{i:09d} ".encode() + tail for i in range(base, min(base + block, lines))
        )
        view = memoryview(chunk)
        while view:
            view = view[write(1, view) :]
    cpu = os.times()
    note(record, f"done {ident} {time.time()!r} {pid} {cpu.user + cpu.system!r}\n")
    if hold:
        while not os.path.exists(hold):
            time.sleep(0.01)
    return 0


if __name__ == "__main__":
    sys.exit(main())
