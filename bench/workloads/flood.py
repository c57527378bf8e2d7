"""Bench workload: print LINES lines of exactly 100 bytes to stdout as fast as possible.

    python3 -S flood.py LINES ID RECORD [HOLD]

Line i is ``w<ID> l<i, 9 digits> `` padded with ``x`` to 99 bytes plus a newline (the format of
``fake-agent``'s ``flood:N``), written in blocks of 655 whole lines, one ``os.write`` each.  It
appends ``start ID T PID`` before the first line and ``done ID T PID`` after the last to RECORD
(one O_APPEND write each, so concurrent processes never interleave).  With HOLD it then waits
until the file HOLD exists before exiting, so that no peer sees an early exit (honcho stops every
process as soon as one exits); the benchmark creates HOLD once it has timed the sink.
"""

import os
import sys
import time

BLOCK = 655  # 65,500 bytes: blocks end on line boundaries


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
    pid = os.getpid()
    note(record, f"start {ident} {started!r} {pid}\n")
    head = f"w{ident} l"
    pad = 99 - len(head) - 10
    tail = b"x" * pad + b"\n"
    for base in range(0, lines, BLOCK):
        block = b"".join(
            f"{head}{i:09d} ".encode() + tail for i in range(base, min(base + BLOCK, lines))
        )
        view = memoryview(block)
        while view:
            view = view[os.write(1, view) :]
    note(record, f"done {ident} {time.time()!r} {pid}\n")
    if hold:
        while not os.path.exists(hold):
            time.sleep(0.01)
    return 0


if __name__ == "__main__":
    sys.exit(main())
