"""The shift's watches: the fleet-level tasks that decide when it stops starting runs, or stops.

Each runs for the whole shift in :meth:`supervisor.fleet.Fleet.run`'s task group (as
:mod:`supervisor.stall`'s watchdog does): the deadlines, the signals, ``--watch``'s task source,
and the check that gives up tasks that can only wait for machines that are gone.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

import anyio

from supervisor.lifecycle import WorkerState
from supervisor.machines import clock

if TYPE_CHECKING:
    from supervisor.fleet import Fleet

#: How long a fleet must look stuck, checked twice, before its stuck tasks are given up.
STUCK_CHECK = 1.0


async def give_up_when_stuck(fleet: Fleet) -> None:
    """When every task left waits for a machine that cannot be reached (its run there, or
    a slot there), and has for long enough (:meth:`Machines.hopeless`), nothing more
    happens until the machine is back: rather than wait for ever, the shift gives those
    tasks up (``lost``; their runs there stay open in the ledger, for the next ``up`` to
    look at).  Checked twice, a second apart, so that a worker between two steps is not
    taken for a blocked one."""
    stuck_before: set[str] = set()
    while True:
        await fleet.machines.until_one_is_out()
        await anyio.sleep(STUCK_CHECK)
        waits = {w.waiting_for for w in fleet.workers if not w.status.state.final}
        stuck = bool(waits) and all(m is not None and fleet.machines.hopeless(m) for m in waits)
        names = {str(m) for m in waits} if stuck else set()
        if "*" in names:
            names = {v.name for v in fleet.machines if fleet.machines.hopeless(v.name)}
        if names and names == stuck_before:
            fleet.machines.give_up(sorted(names))
            return
        stuck_before = names


async def keep_deadlines(fleet: Fleet) -> None:
    """The soft deadline closes new starts (and wakes workers waiting to start); the hard one
    stops every run."""
    soft, hard = fleet.deadline.soft, fleet.deadline.hard
    if soft is None:
        return
    await anyio.sleep(max(0.0, soft - time.time()))
    fleet.deadline_hit = True
    fleet.starts.close(f"soft deadline {clock(soft)} reached")
    fleet.wake_workers()
    fleet.log.info(
        "deadline-soft",
        msg=f"⏰ soft deadline {clock(soft)}: no new runs; running ones may finish until "
        f"{clock(hard) if hard else 'they end'}",
    )
    if hard is None:
        return
    await anyio.sleep(max(0.0, hard - time.time()))
    fleet.log.info("deadline-hard", msg=f"⏰ hard deadline {clock(hard)}: stopping all runs")
    fleet.stop.request("hard deadline")


async def handle_signals(fleet: Fleet) -> None:
    """SIGINT and SIGTERM stop every run (gracefully; the second one kills now)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if fleet.stop.requested.is_set():
                fleet.log.info("stop-forced", msg=f"{name} again: killing runs now")
            else:
                fleet.log.info(
                    "stopping",
                    msg=f"{name}: stopping all runs (SIGTERM, then SIGKILL after "
                    f"{fleet.config.stop_timeout:g}s; {name} again to kill now)",
                )
            fleet.stop.request(name)


async def watch_source(fleet: Fleet) -> None:
    """``--watch``: re-read the task source every poll interval and queue new tasks."""
    assert fleet.watch is not None
    interval = fleet.config.tasks.poll_interval
    while not fleet.stop.requested.is_set() and not fleet.starts.closed:
        with anyio.move_on_after(interval):
            await fleet.stop.requested.wait()
        if fleet.stop.requested.is_set() or fleet.starts.closed:
            return
        try:
            tasks = await fleet.watch()
        except Exception as exc:  # a failing source is logged and polled again
            fleet.log.warning("source-failed", msg=f"task source failed: {exc}")
            continue
        for task in tasks:
            if fleet.worker_for(task.issue) is not None:
                continue
            record = fleet.ledger.task(task.issue)
            if record is not None and record.state == WorkerState.DONE:
                continue
            fleet.add_task(task, record=record, again=record is not None, origin="github")
            fleet.log.info(
                "task-added", msg=f"task #{task.issue} found by --watch", task=task.issue
            )
