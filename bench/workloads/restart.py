"""Bench workload: a process that records its start time and exits at once.

    python3 -S restart.py RECORD LIMIT MODE

Appends its start time (``time.time()``) as one line to RECORD, then ends: run k (k = the number
of lines now in RECORD) exits 1 while k <= LIMIT, so that the supervisor restarts it, and exits 0
once k > LIMIT, so that it is not restarted again: LIMIT restarts, LIMIT latencies.  The time
from one run's record to the next run's record is the restart latency (the exit follows the
record within the interpreter's teardown, which every peer pays alike).

MODE ``crash`` exits 1 (a crash); MODE ``milestone`` instead writes the checkpoint
``.tmp/milestones/issue-N-milestone-k.md`` in its working directory (N from
AGENTIZE_FLEET_ISSUE, default 1) and exits 0, which agentize-fleet resumes at once.
"""

import os
import sys
import time


def main() -> int:
    started = time.time()
    record, limit, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    fd = os.open(record, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        seen = b""
        while chunk := os.read(fd, 65536):
            seen += chunk
        os.write(fd, f"{started!r}\n".encode())
    finally:
        os.close(fd)
    run = seen.count(b"\n") + 1
    if run > limit:
        return 0
    if mode == "milestone":
        issue = os.environ.get("AGENTIZE_FLEET_ISSUE") or "1"
        os.makedirs(".tmp/milestones", exist_ok=True)
        with open(f".tmp/milestones/issue-{issue}-milestone-{run}.md", "w") as fh:
            fh.write(f"# Milestone {run}\n")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
