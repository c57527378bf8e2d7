"""Whether a machine can be reached now: its reachability states and their transitions.

A machine that stops answering is not a crashed agent: its runs go on there, each found again
by its run directory when the machine is back.  The host side only observes and reports; the
fleet decides what a machine's absence means for its tasks.  The states:

``connecting``  no connection yet, or the link was lost and reconnecting has not worked yet
``up``          connections open and commands answered
``slow``        connections live, but a new command (or login) did not answer within its
                timeout: an overloaded machine, a hung login shell.  Nothing is given up.
``unreachable`` no connection for longer than ``unreachable_after``
``back``        a connection again after ``unreachable``: the runs followed there are being
                found again (``up`` once the host has looked at each of them)

The SSH host feeds :class:`Reachability` with what its connections see (a connection opened
or refused, a command answered or timed out) and the machine's watcher says when every run is
followed again; every transition is reported, in order, to the callbacks registered with
:meth:`Host.on_reachability`.  A machine that never changes (this one) stays ``up``.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import structlog

log = structlog.get_logger(__name__)


class Reach(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    SLOW = "slow"
    UNREACHABLE = "unreachable"
    BACK = "back"


@dataclass(frozen=True)
class ReachChange:
    """One transition: ``machine`` went from ``previous`` to ``state`` at ``at`` (epoch
    seconds); ``detail`` says why (the error that made it ``slow`` or ``unreachable``)."""

    machine: str
    state: Reach
    previous: Reach
    at: float
    detail: str = ""


Callback = Callable[[ReachChange], None]


class Reachability:
    """One machine's reachability (see the module docstring)."""

    def __init__(self, machine: str, unreachable_after: float, state: Reach = Reach.CONNECTING):
        self.machine = machine
        self.unreachable_after = unreachable_after
        self.state = state
        self.since = time.time()
        self.detail = ""
        self._callbacks: list[Callback] = []
        self._changed: anyio.Event | None = None
        self._down_since: float | None = None  # monotonic: the first failure of this outage
        self._timer: asyncio.TimerHandle | None = None
        #: Whether a return needs the runs found again first (``back`` until it is done).
        self.resync_needed: Callable[[], bool] = lambda: False

    def subscribe(self, callback: Callback) -> None:
        self._callbacks.append(callback)

    async def changed(self) -> Reach:
        """Wait for the next transition; the new state."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()
        return self.state

    def _go(self, state: Reach, detail: str = "") -> None:
        if state is self.state:
            return
        change = ReachChange(self.machine, state, self.state, time.time(), detail)
        self.state, self.since, self.detail = state, change.at, detail
        level = log.warning if state in (Reach.SLOW, Reach.UNREACHABLE) else log.info
        level("reachability " + state.value, machine=self.machine, detail=detail or None)
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        for callback in list(self._callbacks):
            try:
                callback(change)
            except Exception:  # a listener's bug must not break the host
                log.exception("reachability callback failed", machine=self.machine)

    # ---- what the connections see -------------------------------------------------------------

    def connected(self) -> None:
        """A connection was opened."""
        self._down_since = None
        self._cancel_timer()
        if self.state is Reach.UNREACHABLE:
            self._go(Reach.BACK)
            self.settled()
        elif self.state is Reach.CONNECTING:
            self._go(Reach.UP)

    def answered(self) -> None:
        """A command ran to its end: the machine answers."""
        self._down_since = None
        self._cancel_timer()
        if self.state in (Reach.SLOW, Reach.CONNECTING):
            self._go(Reach.UP)
        elif self.state is Reach.UNREACHABLE:
            self._go(Reach.BACK)
        self.settled()

    def slow(self, detail: str) -> None:
        """A command (or login) did not answer in time while its connection lived."""
        if self.state in (Reach.UP, Reach.CONNECTING, Reach.BACK):
            self._go(Reach.SLOW, detail)

    def failed(self, detail: str) -> None:
        """A connection could not be opened (refused, timed out, the link died)."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            if self.state in (Reach.UP, Reach.SLOW, Reach.BACK):
                self._go(Reach.CONNECTING, detail)
            self._arm_timer(detail)
        self.detail = detail
        if now - self._down_since > self.unreachable_after:
            self._go(Reach.UNREACHABLE, detail)

    def settled(self) -> None:
        """The runs followed on the machine are followed again (or there are none)."""
        if self.state is Reach.BACK and not self.resync_needed():
            self._go(Reach.UP)

    # ---- the unreachable_after timer ----------------------------------------------------------

    def _arm_timer(self, detail: str) -> None:
        """Declare the machine unreachable on time, even if nothing tries it meanwhile."""
        self._cancel_timer()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self.unreachable_after + 0.01, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._down_since is not None:
            self._go(Reach.UNREACHABLE, self.detail)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self._cancel_timer()
