"""The stall watchdog: a run that prints nothing for ``agent.stall_timeout`` is stopped and its
session resumed, logged as a stall (issue 13).

Why: an agent can hang without ending -- a wedged API stream, a tool waiting on input that never
comes -- and a fleet left overnight would hold that slot until morning.  The agent's own output
is the sign of life the fleet has: the log's writer notes when each worker last logged a line
(``LogMux.last_output``), so watching costs nothing per line.

One task for the whole fleet looks at every running worker every ``stall_timeout / 10``
seconds (at most a minute, at least a tenth of a second) rather than a sleeping task per run:
a thousand-task fleet gets one timer, not a thousand.  While the log cannot be written (a full
disk) output waits in the runs' own files and nothing is logged: that is no stall, and the
quiet time counts from when the log can be written again.

Which runs: every run of a stream kind (``claude``, ``codex``, ``gemini``) with the default
of 30 minutes; kind ``command`` only when the config sets ``stall_timeout`` itself -- a plain
``claude -p`` prints its whole answer at the end, and today's rules for plain commands stay.
A long quiet tool call is a stall too (Claude Code prints nothing while a command runs:
anthropics/claude-code#17248): raise ``stall_timeout`` above the longest test suite.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import anyio

from supervisor.config import FleetConfig
from supervisor.hosts.base import RunHandle
from supervisor.logwriter import LogMux
from supervisor.outcome import WorkerStatus

__all__ = ["effective_timeout", "watch"]

MAX_INTERVAL = 60.0
MIN_INTERVAL = 0.1


def effective_timeout(config: FleetConfig) -> float:
    """The stall timeout in force (0: off); see the module docstring for kind ``command``."""
    agent = config.agent
    if agent.kind == "command" and "stall_timeout" not in agent.model_fields_set:
        return 0.0
    return agent.stall_timeout


class Stallable(Protocol):
    name: str
    status: WorkerStatus

    @property
    def current(self) -> RunHandle | None: ...

    def stall(self, quiet: float) -> RunHandle | None: ...


class Watched(Protocol):
    config: FleetConfig
    mux: LogMux

    @property
    def stallable(self) -> Sequence[Stallable]: ...

    def stop_stalled(self, handle: RunHandle) -> None: ...


async def watch(fleet: Watched) -> None:
    """Stop every run that stays silent for the stall timeout; runs until cancelled."""
    timeout = effective_timeout(fleet.config)
    if timeout <= 0:
        return
    interval = min(MAX_INTERVAL, max(MIN_INTERVAL, timeout / 10))
    floor = 0.0  # no quiet time counts before this (the log could not be written until then)
    while True:
        await anyio.sleep(interval)
        now = time.time()
        if fleet.mux.fault is not None:
            floor = now
            continue
        for worker in list(fleet.stallable):
            started = worker.status.run_started_at
            if worker.current is None or started is None:
                continue
            last = max(started, floor, fleet.mux.last_output.get(worker.name, 0.0))
            if now - last >= timeout:
                handle = worker.stall(now - last)
                if handle is not None:
                    fleet.stop_stalled(handle)
