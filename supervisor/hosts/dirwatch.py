"""Wake-ups when a run directory changes, from one inotify(7) instance per local host.

The local host reads each run's output files in-process.  Polling them costs CPU for every idle
agent, every poll; inotify costs nothing until a file changes.  One inotify instance serves all
runs (the kernel allows only 128 instances per user by default, far fewer than a fleet's runs),
with one watch per run directory.

No background task is needed: whichever waiter finds nobody reading becomes the reader, drains
the events and wakes the waiters whose directories changed.  When it steps down it hands the
reading on to exactly one other waiter, so an idle fleet of hundreds of runs costs a wake-up now
and then, not hundreds.  Each local host owns one watcher (its events belong to one event loop);
where inotify is unavailable, the host polls instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import struct

import anyio

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_IGNORED = 0x00008000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
_EVENT = struct.Struct("iIII")


class DirWatcher:
    """One inotify instance; :meth:`add` a directory, then :meth:`wait` for it to change."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add_watch = libc.inotify_add_watch
        self._add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm_watch = libc.inotify_rm_watch
        self._rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd: int = fd
        self._changed: dict[int, bool] = {}
        self._waiting: dict[int, anyio.Event] = {}
        self._reading = False

    def add(self, directory: str) -> int:
        """Watch ``directory``; returns the watch descriptor to :meth:`wait` on."""
        wd = int(self._add_watch(self.fd, os.fsencode(directory), _MASK))
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory} failed")
        self._changed[wd] = False
        return wd

    def remove(self, wd: int) -> None:
        if self._changed.pop(wd, None) is not None:
            self._rm_watch(self.fd, wd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    async def wait(self, wd: int, timeout: float) -> None:
        """Return when the directory of ``wd`` changed since the last wait, or after ``timeout``."""
        try:
            with anyio.move_on_after(timeout):
                while not self._changed.get(wd, True):
                    if self._reading:
                        woken = self._waiting[wd] = anyio.Event()
                        await woken.wait()
                        continue
                    self._reading = True
                    try:
                        await anyio.wait_readable(self.fd)
                        self._drain()
                    finally:
                        self._reading = False
                        self._hand_over(wd)
        finally:
            self._waiting.pop(wd, None)
        if wd in self._changed:
            self._changed[wd] = False

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if wd in self._changed and not mask & IN_IGNORED:
                    self._changed[wd] = True
                    woken = self._waiting.get(wd)
                    if woken is not None:
                        woken.set()

    def _hand_over(self, me: int) -> None:
        """Wake one waiter that still waits (its directory unchanged) to read in our place."""
        for wd, woken in self._waiting.items():
            if wd != me and not woken.is_set() and not self._changed.get(wd, True):
                woken.set()
                return
