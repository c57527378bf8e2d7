"""Run ``agentize-fleet ARGS...`` under pyinstrument and write its call tree to OUT.

    python bench/profile_up.py OUT HEADER up -c FLEET.toml -q

pyinstrument (installed into .venv by ``scripts/bench --profile`` only) samples the call stack
every millisecond and follows ``await``s, so the tree shows which coroutine spent the time:
what cProfile's flat per-function table could not tell apart in an event loop.  It counts wall
time: a supervisor waiting for its children shows as time in the event loop's ``select``.

With BENCH_PROFILE_WINDOW=1 the profiler runs only between SIGUSR1 and SIGUSR2, so that
``scripts/bench --profile`` profiles just the measured window of a workload (the idle one)
rather than start-up and shutdown.
"""

import os
import signal
import sys
from types import FrameType

from pyinstrument import Profiler


def main() -> int:
    out, header, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    profiler = Profiler(interval=0.001, async_mode="enabled")
    if os.environ.get("BENCH_PROFILE_WINDOW") == "1":

        def start(_signum: int, frame: FrameType | None) -> None:
            profiler.start(caller_frame=frame)

        def stop(_signum: int, _frame: FrameType | None) -> None:
            if profiler.is_running:
                profiler.stop()

        signal.signal(signal.SIGUSR1, start)
        signal.signal(signal.SIGUSR2, stop)
    else:
        profiler.start()
    try:
        from supervisor.cli import main as cli_main

        return cli_main(argv)
    finally:
        if profiler.is_running:
            profiler.stop()
        with open(out, "w") as fh:
            fh.write(header + "\n\n")
            if profiler.last_session is not None:
                fh.write(profiler.output_text(unicode=True, color=False, show_all=False))


if __name__ == "__main__":
    sys.exit(main())
