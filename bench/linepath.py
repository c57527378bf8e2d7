"""The supervisor's CPU per output line, measured in-process as CPU time (not wall time).

    .venv/bin/python bench/linepath.py [--lines N] [--repeat R] [--chunk BYTES ...]
    .venv/bin/python bench/linepath.py --live 4 [--lines N] [--repeat R]

The machine this runs on is shared, so wall time says little; ``os.times()`` of this process
(user + system) does not count other work, only what this process did (a busy machine still
perturbs caches and frequency: compare runs made back to back, and take the minimum of R).

* Writer (default): N lines in the ``fake-agent flood`` format (100 bytes each) cut into reads
  of CHUNK bytes as ``os.read`` returns them (not aligned to lines) go through ``LineSplitter``
  and ``LogMux.output`` and are flushed into a real file, as ``Worker._pump`` drives them.
* Live (``--live P``): P real writer processes (``bench/workloads/flood.py``, line by line)
  run through ``LocalHost`` (the run wrapper, output files, inotify), and their output is pumped
  as ``Worker._pump`` does it (splitter, ``LogMux.output``, ``OutputTail``) into a real JSONL
  file; this process's CPU from the first start to the last line, per line.  That is the whole
  line path of the supervisor without its start-up, the workers' state machines and the rest of
  the fleet; the writers' own CPU is theirs, not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import anyio

from supervisor.allocator import keep_buffers
from supervisor.hosts.base import STREAMS, RunHandle, RunSpec, Stream
from supervisor.hosts.local import LocalHost
from supervisor.limits import OutputTail
from supervisor.lines import LineSplitter
from supervisor.logwriter import LogMux, Tag

FLEET_ID = "20261128-070712-345-c8"
WORKLOAD = Path(__file__).resolve().parent / "workloads" / "flood.py"


def cpu() -> float:
    times = os.times()
    return times.user + times.system


def kernel() -> float:
    return os.times().system


def flood(lines: int, ident: int = 1) -> bytes:
    """``lines`` lines of exactly 100 bytes: ``w<ident> l<index, 9 digits> xxx...``."""
    head = f"w{ident} l".encode()
    pad = b"x" * (99 - len(head) - 10) + b"\n"
    return b"".join(head + b"%09d " % i + pad for i in range(lines))


def writer_once(data: bytes, chunk: int, directory: Path) -> tuple[float, float]:
    """CPU seconds (all, and the kernel's) to turn ``data`` into records in
    ``directory``/fleet.jsonl."""
    path = directory / "fleet.jsonl"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    mux = LogMux(FLEET_ID, path, None)
    tag = Tag("w1", 1, "local", 1)
    splitter = LineSplitter(65536)
    view = memoryview(data)
    output = mux.output
    feed = splitter.feed
    began, began_kernel = cpu(), kernel()
    for at in range(0, len(data), chunk):
        block = feed(bytes(view[at : at + chunk]))
        if block is not None:
            output(tag, "stdout", block, splitter.offset)
    rest = splitter.finish()
    if rest is not None:
        output(tag, "stdout", rest, splitter.offset)
    mux.close()
    spent, spent_kernel = cpu() - began, kernel() - began_kernel
    assert path.stat().st_size > len(data)
    return spent, spent_kernel


async def pump(mux: LogMux, tag: Tag, handle: RunHandle, tails: dict[Stream, OutputTail]) -> None:
    """What ``Worker._pump`` does, without the limit scan at its end."""
    from supervisor.lines import pump_output  # only here: the writer mode runs on older code too

    await pump_output(
        mux,
        tag,
        handle.output({}),
        {},
        65536,
        on_block=lambda stream, block: tails[stream].add(block),
    )


async def live_once(processes: int, lines: int, directory: Path) -> float:
    """CPU seconds of this process while ``processes`` writers print ``lines`` lines each."""
    host = LocalHost("local")
    mux = LogMux(FLEET_ID, directory / "fleet.jsonl", None)
    record = directory / "record"
    began = cpu()
    with anyio.fail_after(300):
        async with anyio.create_task_group() as tg:
            tg.start_soon(mux.flush_periodically)
            async with anyio.create_task_group() as pumps:
                for number in range(1, processes + 1):
                    run_dir = directory / f"run{number}"
                    spec = RunSpec(
                        argv=[
                            sys.executable,
                            "-S",
                            str(WORKLOAD),
                            str(lines),
                            str(number),
                            str(record),
                        ],
                        cwd=str(directory),
                        run_dir=str(run_dir),
                        lease_path=str(directory / "lease"),
                        lease_timeout=0,
                    )
                    handle = await host.start(spec)
                    tails = {s: OutputTail() for s in STREAMS}
                    tag = Tag(f"w{number}", number, "local", 1)
                    pumps.start_soon(pump, mux, tag, handle, tails)
            tg.cancel_scope.cancel()
    mux.close()
    spent = cpu() - began
    await host.aclose()
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--lines", type=int, help="lines per run (default 1,000,000 / P)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chunk", type=int, action="append", help="read size (writer mode)")
    parser.add_argument("--live", type=int, metavar="P", help="P real writer processes")
    args = parser.parse_args()
    keep_buffers()
    with tempfile.TemporaryDirectory(dir=os.environ.get("LINEPATH_DIR")) as name:
        tmp = Path(name)
        if args.live:
            lines = args.lines or 1_000_000 // args.live
            total = lines * args.live
            runs = []
            for number in range(args.repeat):
                (tmp / str(number)).mkdir()
                runs.append(anyio.run(live_once, args.live, lines, tmp / str(number)))
                shutil.rmtree(tmp / str(number))
            print(
                f"live {args.live} × {lines:,}: {min(runs) / total * 1e9:6.1f} ns CPU per line "
                f"(min of {args.repeat}; all: "
                + ", ".join(f"{r / total * 1e9:.0f}" for r in runs)
                + ")"
            )
            return
        lines = args.lines or 1_000_000
        data = flood(lines)
        for chunk in args.chunk or [256 * 1024, 64 * 1024, 8 * 1024]:
            timed = [writer_once(data, chunk, tmp) for _ in range(args.repeat)]
            best, best_kernel = min(timed)
            print(
                f"writer, reads of {chunk:>7} B: {best / lines * 1e9:6.1f} ns CPU per line, "
                f"{best_kernel / lines * 1e9:.0f} of it in the kernel "
                f"(min of {args.repeat} × {lines:,} lines)"
            )


if __name__ == "__main__":
    main()
