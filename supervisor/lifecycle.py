"""The states of one worker and the transitions allowed between them (pure, no I/O).

::

    pending → preparing → running ─exit 0, no new milestone──────→ done  (→ pending: --rerun)
                             │  ├─new milestone ──────────────────→ resuming → running
                             │  ├─crash ──→ backoff → running      (intensity exceeded → failed)
                             │  ├─usage limit ──→ paused → running
                             │  └─machine unreachable too long ──→ lost
                             └─stop requested → stopping → stopped

The worker driver (``worker.py``) asks :func:`advance` for every change, so an impossible
transition is a bug caught at once rather than a state file that lies.
"""

from __future__ import annotations

import enum


class WorkerState(enum.StrEnum):
    PENDING = "pending"
    PREPARING = "preparing"
    RUNNING = "running"
    RESUMING = "resuming"
    BACKOFF = "backoff"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DONE = "done"
    FAILED = "failed"
    LOST = "lost"

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({WorkerState.STOPPED, WorkerState.DONE, WorkerState.FAILED, WorkerState.LOST})

_S = WorkerState
_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    # pending → lost: its earlier run could not be checked (machine unreachable at start-up).
    _S.PENDING: frozenset({_S.PREPARING, _S.STOPPED, _S.FAILED, _S.LOST}),
    _S.PREPARING: frozenset({_S.RUNNING, _S.BACKOFF, _S.FAILED, _S.STOPPING, _S.STOPPED, _S.LOST}),
    _S.RUNNING: frozenset(
        {_S.DONE, _S.RESUMING, _S.BACKOFF, _S.PAUSED, _S.FAILED, _S.STOPPING, _S.LOST}
    ),
    _S.RESUMING: frozenset({_S.RUNNING, _S.STOPPED, _S.FAILED, _S.LOST}),
    _S.BACKOFF: frozenset({_S.PREPARING, _S.RUNNING, _S.STOPPED, _S.FAILED, _S.LOST}),
    _S.PAUSED: frozenset({_S.RUNNING, _S.STOPPED, _S.FAILED, _S.LOST}),
    _S.STOPPING: frozenset({_S.STOPPED}),
    _S.STOPPED: frozenset({_S.PENDING}),
    _S.DONE: frozenset({_S.PENDING}),  # run again on request (`add N --rerun`)
    _S.FAILED: frozenset({_S.PENDING}),
    _S.LOST: frozenset({_S.PENDING}),  # requeued on another machine
}


class InvalidTransition(RuntimeError):
    """A worker was asked to move between two states that are not connected."""


def advance(current: WorkerState, target: WorkerState) -> WorkerState:
    """Return ``target`` if the lifecycle allows ``current → target``, else raise."""
    if target not in _ALLOWED[current]:
        raise InvalidTransition(f"worker cannot go from {current} to {target}")
    return target
