"""One process at a time per node: an flock on a file that names its holder.

The kernel drops an flock when its holder dies, however it dies, so a crashed
run never blocks the next one. Cron runs and the daemon take the same lock
(``<state_dir>/lock``), which keeps a forgotten crontab line from running
beside the daemon. ``--daemonize``'s pidfile is the same kind of lock, removed
on a clean exit.
"""

from __future__ import annotations

import fcntl
import os

from glance_image_sync.exceptions import AlreadyRunning, ConfigError


class RunLock:
    def __init__(self, path: str, remove_on_release: bool = False):
        self.path = path
        self.remove_on_release = remove_on_release
        self._fd = None

    @classmethod
    def in_dir(cls, state_dir: str) -> RunLock:
        """The node's run lock, ``<state_dir>/lock``; state_dir is created if missing."""
        try:
            os.makedirs(state_dir, mode=0o750, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create state_dir {state_dir}: {exc.strerror}") from None
        return cls(os.path.join(state_dir, "lock"))

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
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
        if self._fd is None:
            return
        if self.remove_on_release:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
