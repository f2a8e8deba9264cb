"""One run at a time per node: an flock on ``<state_dir>/lock``.

The kernel drops an flock when its holder dies, however it dies, so a crashed
run never blocks the next one. The daemon holds the same lock for its whole
life, which keeps a forgotten crontab line from running beside it.
"""

from __future__ import annotations

import fcntl
import os


class AlreadyRunning(Exception):
    """Another run holds the lock; the message names its pid."""


class RunLock:
    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, "lock")
        self._fd = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another glance-image-sync (pid {holder}) holds {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
