"""Who may start a run now: the global cap, per-machine caps, the start stagger, pause and stop.

:func:`choose_machine` is the pure rule (least-loaded machine with room, under the global
cap); :class:`SlotPool` applies it to waiters in FIFO order with anyio events; and
:class:`StartGate` keeps a minimum gap between two agent starts across the fleet, because
agent CLIs started in a burst hit burst rate limits and race on their shared settings files.
:class:`StartsGate` holds new runs (``pause``, the soft deadline) and :class:`StopControl` is
the fleet's stop request, which every wait of a worker gives way to.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import anyio


def choose_machine(
    running: Mapping[str, int],
    capacity: Mapping[str, int],
    *,
    total_cap: int,
    preferred: str | None = None,
    closed: frozenset[str] = frozenset(),
) -> str | None:
    """The machine a new run should go to now, or None when none has room.

    ``preferred`` pins the run to one machine (its workspace lives there).  Otherwise the
    least-loaded machine (lowest share of its capacity in use; ties by order) wins.  Machines in
    ``closed`` (paused, unreachable) take no new runs.
    """
    if sum(running.values()) >= total_cap:
        return None
    if preferred is not None:
        ok = preferred not in closed and running.get(preferred, 0) < capacity.get(preferred, 0)
        return preferred if ok else None
    best: str | None = None
    best_load = math.inf
    for name, cap in capacity.items():
        if name in closed or cap <= 0 or running.get(name, 0) >= cap:
            continue
        load = running.get(name, 0) / cap
        if load < best_load:
            best, best_load = name, load
    return best


@dataclass
class _Waiter:
    preferred: str | None
    ready: anyio.Event = field(default_factory=anyio.Event)
    machine: str | None = None


class SlotPool:
    """Run slots under a global cap and per-machine caps, handed out first come, first served."""

    def __init__(self, total_cap: int, capacity: Mapping[str, int]) -> None:
        self.total_cap = total_cap
        self.capacity = dict(capacity)
        self.running = dict.fromkeys(capacity, 0)
        self.closed: set[str] = set()
        self.peak = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def total(self) -> int:
        return sum(self.running.values())

    async def acquire(self, preferred: str | None = None) -> str:
        """Wait for a slot (on ``preferred`` if given) and return the machine it is on."""
        waiter = _Waiter(preferred)
        self._waiters.append(waiter)
        self._dispatch()
        try:
            await waiter.ready.wait()
        except BaseException:
            if waiter.machine is not None:
                self.release(waiter.machine)
            else:
                self._waiters.remove(waiter)
            raise
        assert waiter.machine is not None
        return waiter.machine

    def take(self, machine: str) -> None:
        """Take a slot on ``machine`` now, without waiting and past the caps if need be.

        For a run that is already running (adopted from a dead supervisor): it counts against
        the caps from this instant, before any waiter is served, so no new run can start
        beside it past the cap.  (A cap lowered since it started may be exceeded by it, never
        by a new run.)
        """
        self.running[machine] = self.running.get(machine, 0) + 1
        self.capacity.setdefault(machine, 0)
        self.peak = max(self.peak, self.total)

    def would_wait(self, preferred: str | None = None) -> bool:
        """Whether :meth:`acquire` would wait now (no room, or others queued first)."""
        if self._waiters:
            return True
        closed = frozenset(self.closed)
        return (
            choose_machine(
                self.running,
                self.capacity,
                total_cap=self.total_cap,
                preferred=preferred,
                closed=closed,
            )
            is None
        )

    def release(self, machine: str) -> None:
        self.running[machine] -= 1
        self._dispatch()

    def close(self, machine: str) -> None:
        """Take no new runs on ``machine`` (paused or unreachable) until :meth:`reopen`."""
        self.closed.add(machine)

    def reopen(self, machine: str) -> None:
        self.closed.discard(machine)
        self._dispatch()

    def _dispatch(self) -> None:
        # FIFO, but a waiter pinned to a full machine does not block the others behind it.
        for waiter in list(self._waiters):
            machine = choose_machine(
                self.running,
                self.capacity,
                total_cap=self.total_cap,
                preferred=waiter.preferred,
                closed=frozenset(self.closed),
            )
            if machine is None:
                if self.total >= self.total_cap:
                    return
                continue
            self._waiters.remove(waiter)
            self.running[machine] += 1
            self.peak = max(self.peak, self.total)
            waiter.machine = machine
            waiter.ready.set()


class StartGate:
    """At least ``interval`` seconds between two starts, fleet-wide."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = anyio.Lock()
        self._last = -math.inf

    async def wait_turn(self) -> None:
        if self.interval <= 0:
            return
        async with self._lock:
            delay = self._last + self.interval - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
            self._last = anyio.current_time()


class StartsGate:
    """Whether new runs may start: open, paused (``pause``/``resume``), held, or closed for good.

    A *hold* is the fleet's own pause for as long as a fault lasts (the log or the ledger
    cannot be written: a run started then could not be recorded); each has a key, so that two
    faults overlapping release the gate only when both are over.  Closed for good is the soft
    deadline: no new run starts any more (milestone resumes included) and whoever waits is told
    so, so that the fleet can end.
    """

    def __init__(self) -> None:
        self._changed: anyio.Event | None = None
        self.paused = False
        self.closed_reason = ""
        #: Holds in force: key -> why, for ``status`` and the log.
        self.holds: dict[str, str] = {}

    @property
    def closed(self) -> bool:
        return bool(self.closed_reason)

    @property
    def open(self) -> bool:
        """Whether a new run may start now."""
        return not self.paused and not self.holds and not self.closed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def pause(self) -> None:
        self.paused = True
        self._notify()

    def resume(self) -> None:
        self.paused = False
        self._notify()

    def hold(self, key: str, why: str) -> bool:
        """Hold new runs for ``key``'s reason; True if that hold is new."""
        new = key not in self.holds
        self.holds[key] = why
        self._notify()
        return new

    def release(self, key: str) -> bool:
        """End ``key``'s hold; True if it was held."""
        held = self.holds.pop(key, None) is not None
        self._notify()
        return held

    def close(self, reason: str) -> None:
        self.closed_reason = reason
        self._notify()

    async def wait(self) -> bool:
        """Wait until starts are allowed (True) or closed for good (False)."""
        while True:
            if self.closed:
                return False
            if self.open:
                return True
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()


class StopControl:
    """The fleet's stop request: graceful first, forced on a second request."""

    def __init__(self) -> None:
        self.requested = anyio.Event()
        self.forced = anyio.Event()
        self.reason = ""
        self._callbacks: set[Callable[[], object]] = set()

    def request(self, reason: str) -> None:
        if self.requested.is_set():
            self.forced.set()
        else:
            self.reason = reason
            self.requested.set()
            for callback in list(self._callbacks):
                callback()

    @contextlib.contextmanager
    def on_request(self, callback: Callable[[], object]) -> Iterator[None]:
        """Call ``callback`` when a stop is requested inside the block (at once if one was).

        What a worker does while it waits or runs, it does in its own task; a stop reaches it
        through this callback instead of a watcher task per wait (a task, a task group and a
        cancellation for every run of a thousand-task fleet).
        """
        if self.requested.is_set():
            callback()
            yield
            return
        self._callbacks.add(callback)
        try:
            yield
        finally:
            self._callbacks.discard(callback)


class Slot:
    """The one run slot a worker holds, if any, and the one way it gets one."""

    def __init__(self, pool: SlotPool, starts: StartsGate) -> None:
        self._pool = pool
        self._starts = starts
        self.machine: str | None = None

    @property
    def held(self) -> bool:
        return self.machine is not None

    def take(self, machine: str) -> None:
        """Hold a slot on ``machine`` now, without waiting (a run adopted already running)."""
        self.release()
        self._pool.take(machine)
        self.machine = machine

    async def acquire(self, pin: str | None) -> None:
        """Wait for a slot (on ``pin`` if given) once new runs are allowed; none is held after
        this when new runs will never be allowed again (the soft deadline)."""
        while await self._starts.wait():
            machine = await self._pool.acquire(pin)
            if self._starts.open:
                self.machine = machine
                return
            self._pool.release(machine)  # paused, held or closed while we queued for it

    def release(self) -> None:
        if self.machine is not None:
            self._pool.release(self.machine)
            self.machine = None
