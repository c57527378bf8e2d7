"""Wake-ups when a run directory changes, from inotify(7), shared by all runs of a local host.

The local host reads each run's output files in-process.  Polling them costs CPU for every idle
agent, every poll; inotify costs nothing until a file changes.  The watches of all runs share
two inotify instances (the kernel allows only 128 per user by default, far fewer than a fleet's
runs), behind one epoll descriptor that the event loop waits on:

- one watches each run *directory* for files that appear or are closed (``pid``, ``exit``);
  its events carry file names and are few;
- one watches each run's *output files* for writes, one event at a time: a reader arms the
  watch (``IN_ONESHOT``) with :meth:`DirWatcher.arm` before it reads the files to their end,
  and the first write after that wakes it.  An agent printing line by line writes hundreds of
  thousands of times a second; a standing watch would queue an event for every write, and the
  writers, not the supervisor, would pay for it (the kernel allocates, locks and queues each
  one: 16 agents printing line by line spent ~20% more CPU per line with a standing watch).
  A watch on a file (not on its directory) yields bare 16-byte events without a name, so a
  whole read of them is decoded at once (``memoryview.cast``) into the set of files that
  changed.

An overflow of either queue (``IN_Q_OVERFLOW``: events were dropped) wakes every waiter, so a
dropped event never leaves a reader asleep while its file grows.

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
import errno
import os
import select
import struct
from collections.abc import Iterable

import anyio

IN_MODIFY = 0x00000002
IN_ONESHOT = 0x80000000
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_DIR_MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
_EVENT = struct.Struct("iIII")
_OVERFLOW_WD = -1  # the wd of an IN_Q_OVERFLOW event


class DirWatcher:
    """Watches run directories: :meth:`add` one, then :meth:`wait` for it to change."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add_watch = libc.inotify_add_watch
        self._add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm_watch = libc.inotify_rm_watch
        self._rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self._fds: list[int] = []
        self._poll = select.epoll()
        try:
            for _ in range(2):
                fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
                if fd < 0:
                    raise OSError(ctypes.get_errno(), "inotify_init1 failed")
                self._fds.append(fd)
                self._poll.register(fd, select.EPOLLIN)
        except OSError:
            self.close()
            raise
        self._dir_fd, self._file_fd = self._fds
        #: The descriptor the event loop waits on: readable when either instance has events.
        self.fd: int = self._poll.fileno()
        self._changed: dict[int, bool] = {}
        self._paths: dict[int, list[str]] = {}  # directory wd -> its output files
        self._files: dict[int, list[int]] = {}  # directory wd -> their current file watches
        self._dir_of_file: dict[int, int] = {}  # file wd -> directory wd
        self._waiting: dict[int, anyio.Event] = {}
        self._reading = False

    def _watch(self, fd: int, path: str, mask: int) -> int:
        wd = int(self._add_watch(fd, os.fsencode(path), mask))
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path} failed")
        return wd

    def add(self, directory: str, files: Iterable[str] = ()) -> int:
        """Watch ``directory`` (files that appear in it, or are closed after writing) and, once
        :meth:`arm` is called, the next write to one of its ``files``; returns the watch
        descriptor to :meth:`arm` and :meth:`wait` with."""
        wd = self._watch(self._dir_fd, directory, _DIR_MASK)
        self._changed[wd] = False
        self._paths[wd] = [os.path.join(directory, name) for name in files]
        self._files[wd] = []
        self.arm(wd)
        if len(self._files[wd]) < len(self._paths[wd]):
            self.remove(wd)
            raise FileNotFoundError(errno.ENOENT, "an output file to watch is missing", directory)
        return wd

    def arm(self, wd: int) -> None:
        """Wake the waiter of ``wd`` at the next write to one of its files.  Call it before
        reading them to their end: a write after that is never missed."""
        old = self._files.get(wd)
        if old is None:
            return
        watches = []
        for path in self._paths[wd]:
            # An armed watch is re-armed in place (same wd); a fired one comes back anew.
            try:
                file_wd = self._watch(self._file_fd, path, IN_MODIFY | IN_ONESHOT)
            except OSError:
                continue  # the file is gone (its run is being cleaned up)
            watches.append(file_wd)
            self._dir_of_file[file_wd] = wd
        for stale in set(old) - set(watches):
            self._dir_of_file.pop(stale, None)
        self._files[wd] = watches

    def remove(self, wd: int) -> None:
        if self._changed.pop(wd, None) is not None:
            self._rm_watch(self._dir_fd, wd)
        self._paths.pop(wd, None)
        for file_wd in self._files.pop(wd, []):
            if self._dir_of_file.pop(file_wd, None) is not None:
                self._rm_watch(self._file_fd, file_wd)  # EINVAL if it fired: no matter

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._poll.close()

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
            if not self._reading:
                # We may have been handed the reading and be leaving without it (a timeout or
                # a cancellation came first): pass it on, or nobody would read any more.
                self._hand_over(wd)
        if wd in self._changed:
            self._changed[wd] = False

    def _mark(self, wd: int) -> None:
        if self._changed.get(wd, True):
            return  # not watched, or already marked (and its waiter woken)
        self._changed[wd] = True
        woken = self._waiting.get(wd)
        if woken is not None:
            woken.set()

    def _mark_all(self) -> None:
        for wd in list(self._changed):
            self._mark(wd)

    def _drain(self) -> None:
        dir_of_file = self._dir_of_file
        while True:  # file watches: bare 16-byte events, the wd first
            try:
                data = os.read(self._file_fd, 65536)
            except BlockingIOError:
                break
            for file_wd in set(memoryview(data).cast("i")[0::4]):
                if file_wd == _OVERFLOW_WD:
                    self._mark_all()
                elif (wd := dir_of_file.get(file_wd)) is not None:
                    self._mark(wd)
        while True:  # directory watches: events with names
            try:
                data = os.read(self._dir_fd, 65536)
            except BlockingIOError:
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    self._mark_all()
                elif not mask & IN_IGNORED:
                    self._mark(wd)

    def _hand_over(self, me: int) -> None:
        """Wake one waiter that still waits (its directory unchanged) to read in our place."""
        for wd, woken in self._waiting.items():
            if wd != me and not woken.is_set() and not self._changed.get(wd, True):
                woken.set()
                return
