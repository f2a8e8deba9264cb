"""md5 of images: while a copy arrives, of a copy at rest, and at low priority.

Glance's checksum (md5) and size are the only integrity data a notification
carries; every copy is checked against them before it is installed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading

from oslo_log import log as logging

from glance_image_sync.store import libc

LOG = logging.getLogger(__name__)

_CHUNK = 1024 * 1024

_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = libc.function("sync_file_range", [ctypes.c_int, ctypes.c_int64,
                                                     ctypes.c_int64, ctypes.c_uint])


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting.

    Left alone, a copy's pages stay dirty until the final fsync, which then
    waits for all of them at disk speed.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class Md5Follower(threading.Thread):
    """The md5 of a file that is being written from start to end, read behind the writer.

    It runs beside the transfer, so the image is hashed while it arrives instead
    of read again afterwards, and starts the writeback of what it has read, so
    the final fsync has little left to wait for. ``finish()`` reads what remains
    once the writer is done and returns (md5, bytes hashed). hashlib releases
    the GIL.
    """

    POLL = 0.01  # seconds between looks at the file's size while nothing is new

    def __init__(self, fd: int):
        super().__init__(name="md5-follower", daemon=True)
        self.fd = fd
        self._done = threading.Event()
        self._digest = hashlib.md5(usedforsecurity=False)
        self._offset = 0
        self._error = None

    def run(self) -> None:
        try:
            while True:
                finished = self._done.is_set()
                end = os.fstat(self.fd).st_size
                start = self._offset
                while self._offset < end:
                    chunk = os.pread(self.fd, min(_CHUNK, end - self._offset), self._offset)
                    if not chunk:
                        break
                    self._digest.update(chunk)
                    self._offset += len(chunk)
                if self._offset > start:
                    start_writeback(self.fd, start, self._offset - start)
                if finished:
                    return
                self._done.wait(self.POLL)
        except OSError as exc:  # reported by finish(); install re-reads the file
            self._error = exc

    def finish(self):
        self._done.set()
        self.join()
        if self._error is not None:
            return None, -1
        return self._digest.hexdigest(), self._offset


def md5_of_fd(fd: int) -> str:
    """md5 of a whole file, streamed (never the image in memory)."""
    digest = hashlib.md5(usedforsecurity=False)
    offset = 0
    while True:
        chunk = os.pread(fd, _CHUNK, offset)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)
        offset += len(chunk)


# The nice value of a check of a copy already in place.
CHECK_NICENESS = 19
# Taken by the first check that cannot lower its priority, and never released:
# that is said once per process.
_not_niced = threading.Lock()


def _warn_once_not_niced(exc: OSError) -> None:
    if _not_niced.acquire(blocking=False):
        LOG.warning("checks of images already in place run at normal CPU priority: "
                    "setpriority(%d) failed (%s); under systemd, let the unit's "
                    "SystemCallFilter allow setpriority", CHECK_NICENESS, exc)


def md5_of_fd_yielding(fd: int) -> str:
    """md5_of_fd at the lowest CPU priority, on a thread of its own.

    A copy already in place is checked once, and nothing waits on that but its
    own event; on the node that published the image, the check would otherwise
    take CPU from the transfers its peers are pulling from it. A thread of its
    own because an unprivileged thread can raise its nice value, never lower it.
    """
    result = {}

    def check():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHECK_NICENESS)
        except OSError as exc:  # the check runs all the same, only without yielding
            _warn_once_not_niced(exc)
        try:
            result["md5"] = md5_of_fd(fd)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=check, name="md5-check", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["md5"]
