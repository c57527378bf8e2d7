"""Run ``agentize-fleet ARGS...`` under cProfile and write the stats to OUT.

    python bench/profile_up.py OUT up -c FLEET.toml -q

With BENCH_PROFILE_WINDOW=1 the profiler is off until SIGUSR1 and off again after SIGUSR2, so
that ``scripts/bench --profile`` can profile just the measured window of a workload (the idle
one) rather than start-up and shutdown.  Only the main thread (the event loop) is profiled, in
CPU time (time.process_time), so that waiting for children or I/O does not count.
"""

import cProfile
import os
import signal
import sys
import time


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    # CPU time, not wall time: a supervisor waiting on its children is not busy.
    profiler = cProfile.Profile(time.process_time)
    if os.environ.get("BENCH_PROFILE_WINDOW") == "1":
        signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
        signal.signal(signal.SIGUSR2, lambda *_: profiler.disable())
    else:
        profiler.enable()
    try:
        from supervisor.cli import main as cli_main

        return cli_main(argv)
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    sys.exit(main())
