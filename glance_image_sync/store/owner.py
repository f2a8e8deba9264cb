"""Whose temporary file is this, and does that process still run?

Several processes write into one store: the daemon (or a cron run) and any
number of ``reconcile --fix`` beside it, as ``glance`` or as root. Each
removes only its own temporaries and those of processes that are gone, never
another live process's.

A writer holds an exclusive flock on a file of its own in the store,
``.glance-image-sync.owner.<token>``, for as long as it has temporaries there
(an idle process has none, and no owner file), and puts its token in the name
of every temporary it makes: ``.glance-image-sync.<id>.<token>.<random>`` (a copy) and
``.glance-image-sync.batch.<token>.<random>`` (a staging directory). The token
is the pid, for an operator reading ``ls``, and random hex, so a reused pid
never names a live process. The kernel drops a flock when its holder dies,
however it dies: an owner file whose lock can be taken belongs to no running
process. A temporary whose owner file is missing (left by a version without
owners) is a gone process's. This works across users and whatever ``/proc``
shows (the unit's ``ProtectProc=invisible`` hides other users' processes).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import threading

TEMP_PREFIX = ".glance-image-sync."
OWNER_PREFIX = TEMP_PREFIX + "owner."
BATCH_PREFIX = TEMP_PREFIX + "batch."
_OWNER_RE = r"[0-9]+-[0-9a-f]{8}"  # <pid>-<random>
_UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_TEMP_RE = re.compile(
    rf"{re.escape(TEMP_PREFIX)}(?:{_UUID_RE}|batch)\.(?P<token>{_OWNER_RE})\.[0-9a-f]+")


def token_of(name: str) -> str | None:
    """The owner token in a temporary's name, or None (an old name, or not ours)."""
    match = _TEMP_RE.fullmatch(name)
    return match.group("token") if match else None


def batch_name_beside(temp_name: str) -> str:
    """A staging directory's name with the owner token of the temporary ``temp_name``."""
    token = token_of(temp_name)
    if token is None:
        raise OSError(f"{temp_name} is not a temporary name with an owner")
    return f"{BATCH_PREFIX}{token}.{secrets.token_hex(4)}"


class Owner:
    """This process's owner file in a store directory (``dir_fd``), while it has temporaries.

    ``hold`` before making a temporary and ``let_go`` once it is gone (renamed
    or removed); the file exists while any is held. Safe from any thread.
    """

    def __init__(self, dir_fd: int):
        self.dir_fd = dir_fd
        self._token = None
        self._fd = None
        self._held = 0
        self._lock = threading.Lock()

    @property
    def file_name(self) -> str | None:
        """This process's owner file in the store, while it holds one."""
        token = self._token
        return None if token is None else OWNER_PREFIX + token

    def hold(self) -> str:
        """Claim the owner file (if not yet held); return the token to name temporaries with."""
        with self._lock:
            if self._held == 0:
                self._claim()
            self._held += 1
            return self._token

    def let_go(self) -> None:
        with self._lock:
            self._held -= 1
            if self._held == 0:
                self._give_up()

    def temp_name(self, image_id: str) -> str:
        """A temporary's name for ``image_id`` (or "batch"); call while holding."""
        return f"{TEMP_PREFIX}{image_id}.{self._token}.{secrets.token_hex(4)}"

    def _claim(self) -> None:
        while True:
            token = f"{os.getpid()}-{secrets.token_hex(4)}"
            name = OWNER_PREFIX + token
            fd = os.open(name, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=self.dir_fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                # Readable by every writer (root's reconcile beside the glance daemon),
                # whatever the umask: each must be able to test the lock.
                os.fchmod(fd, 0o644)
                # Between our create and our lock, another process may have taken
                # the free lock for a gone owner's and removed the file.
                if os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False).st_ino == \
                        os.fstat(fd).st_ino:
                    self._token, self._fd = token, fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)

    def mine(self, token: str | None) -> bool:
        return token is not None and token == self._token

    def alive(self, token: str | None) -> bool:
        """Whether a process other than this one holds ``token``'s owner file."""
        if token is None:
            return False
        try:
            fd = os.open(OWNER_PREFIX + token, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self.dir_fd)
        except FileNotFoundError:
            return False
        except OSError:
            return True  # cannot tell: a live process's is never removed
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True  # held (EWOULDBLOCK), or cannot tell
        finally:
            os.close(fd)
        return False

    def remove_gone_owner_files(self) -> None:
        """Owner files whose process is gone (their temporaries removed first)."""
        for entry in os.scandir(self.dir_fd):
            if not entry.name.startswith(OWNER_PREFIX):
                continue
            token = entry.name[len(OWNER_PREFIX):]
            if token == self._token or self.alive(token):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.name, dir_fd=self.dir_fd)

    def release(self) -> None:
        """Give up the owner file whatever is held (the store is closing)."""
        with self._lock:
            self._held = 0
            self._give_up()

    def _give_up(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(OWNER_PREFIX + self._token, dir_fd=self.dir_fd)
        os.close(self._fd)
        self._fd = self._token = None
