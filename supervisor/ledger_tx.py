"""How a transition reaches the ledger, and what it means when the disk refuses it.

One transaction per transition (:meth:`Committer._tx`): all of it is committed, or none.  A
ledger that cannot be written (a full disk, a file system gone read-only, an I/O error:
SQLite's ``OperationalError``) is a state, not a crash, and what a failed write means depends
on where it stands (:meth:`Committer._commit`):

* a transition committed *before* an act (a run's intent, an adoption) is the act's licence:
  when it cannot be committed the act does not happen -- :class:`LedgerUnwritable` is raised
  and the caller waits (:meth:`Committer.writable`) and tries again;
* a transition that records an act *already done* (a pid, an exit, a task's new state) cannot
  be undone, so it waits in memory, in order after any that wait already, and is written again
  by :meth:`Committer.retry` (every :data:`RETRY_INTERVAL`: :meth:`Committer.keep_writing`).

``on_fault`` tells the fleet when writing starts failing (it holds new starts) and when it
works again.  Reads meanwhile see the ledger without what waits; a supervisor killed meanwhile
loses what waits, which the next ``up`` reads back from the run directories (as after a power
cut).  The transitions themselves are :class:`supervisor.ledger.Ledger`'s.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio

#: While the ledger cannot be written, a write is tried again this often.
RETRY_INTERVAL: Final = 1.0
_R = TypeVar("_R")
Transition = Callable[["Tx"], object]


class LedgerError(Exception):
    """The ledger cannot be used; the message names the file and the fix."""


class LedgerUnwritable(LedgerError):
    """A transaction could not be committed: the disk is full, the file system read-only, an
    I/O error (SQLite's ``OperationalError``).  A state that passes: the write is tried again."""

    def __init__(self, path: Path, error: sqlite3.Error) -> None:
        self.path = path
        self.error = error
        self.detail = f"{error} ({getattr(error, 'sqlite_errorname', None) or 'SQLITE_ERROR'})"
        super().__init__(cannot_use(path, error))


class Committer:
    """A connection to the ledger and the discipline of its writes (see the module text)."""

    def __init__(self, path: Path, connection: sqlite3.Connection, *, writable: bool) -> None:
        self.path = path
        self._db = connection
        self.read_only = not writable
        #: Called with the error when writing starts failing, with None when it works again.
        self.on_fault: Callable[[LedgerUnwritable | None], None] | None = None
        self.fault: LedgerUnwritable | None = None
        self.fault_since = 0.0
        #: Transitions that record acts already done, not yet committed (oldest first).
        self._waiting: list[Transition] = []
        self._next_try = 0.0
        self._waiters: list[anyio.Event] = []
        self._wanted: anyio.Event | None = None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Tx]:
        """One transaction: all of it is committed, or none of it.  A write the disk or the
        file system refuses raises :class:`LedgerUnwritable`."""
        if self.read_only:
            raise LedgerError(f"{self.path} is open read-only")
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise LedgerUnwritable(self.path, exc) from None
        except sqlite3.Error as exc:
            raise LedgerError(cannot_use(self.path, exc)) from None
        try:
            yield Tx(self._db)
            self._db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise LedgerUnwritable(self.path, exc) from None
            raise

    def _commit(self, transition: Callable[[Tx], _R], *, done: bool) -> _R | None:
        """Commit one transition.

        ``done``: it records an act already done; when it cannot be committed it waits, in
        order after any that wait already, and None is returned.  Otherwise the act it
        announces must not happen unless it is committed: :class:`LedgerUnwritable` is raised
        (after what waits, in order: a transition never overtakes an earlier one).
        """
        if self._waiting:
            if done:
                self._waiting.append(transition)
                if time.monotonic() >= self._next_try:
                    self.retry()
                return None
            if not self.retry():
                assert self.fault is not None
                raise self.fault
        try:
            with self._tx() as db:
                result = transition(db)
        except LedgerUnwritable as exc:
            self._failing(exc)
            if not done:
                raise
            self._waiting.append(transition)
            return None
        if self.fault is not None:
            self._recovered()  # nothing waited: this write was the probe
        return result

    def _failing(self, error: LedgerUnwritable) -> None:
        self._next_try = time.monotonic() + RETRY_INTERVAL
        first = self.fault is None
        self.fault = error
        if not first:
            return
        self.fault_since = time.time()
        if self._wanted is not None:
            self._wanted.set()
        if self.on_fault is not None:
            self.on_fault(error)

    @property
    def waiting(self) -> int:
        """How many transitions wait to be written."""
        return len(self._waiting)

    def retry(self) -> bool:
        """Write the transitions that wait, oldest first, one transaction each (or, when none
        waits, a probe); True once the ledger can be written again."""
        if self.fault is None:
            return True
        self._next_try = time.monotonic() + RETRY_INTERVAL
        try:
            if not self._waiting:
                with self._tx() as db:
                    db.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES ('probe', ?)",
                        (str(time.time()),),
                    )
            while self._waiting:
                with self._tx() as db:
                    self._waiting[0](db)
                del self._waiting[0]
        except LedgerUnwritable as exc:
            self.fault = exc
            return False
        self._recovered()
        return True

    def _recovered(self) -> None:
        self.fault = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.set()
        if self.on_fault is not None:
            self.on_fault(None)

    async def writable(self) -> None:
        """Return once the ledger can be written (at once when it can)."""
        while self.fault is not None:
            waiter = anyio.Event()
            self._waiters.append(waiter)
            await waiter.wait()

    async def keep_writing(self) -> None:
        """While the ledger cannot be written, try again every :data:`RETRY_INTERVAL`; an
        idle ledger costs no wake-ups.  Runs until cancelled."""
        while True:
            self._wanted = anyio.Event()
            if self.fault is None:
                await self._wanted.wait()
            await anyio.sleep(RETRY_INTERVAL)
            if self.fault is not None and time.monotonic() >= self._next_try - 0.01:
                self.retry()


class Tx:
    """The connection inside one transaction (``executescript`` would commit it: not here)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, args)

    def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return self._db.executemany(sql, args)

    def executescript_in_tx(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)


def cannot_use(path: Path, exc: BaseException) -> str:
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (
        f"cannot use the ledger {path}: {detail}; fix: make its state directory writable by "
        f"you (and the disk not full), or point state_dir at another directory"
    )
