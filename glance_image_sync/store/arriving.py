"""An image as a peer may read it: installed, or still arriving.

A node that relays an image serves the temporary file it is receiving it
into, as it grows (``transfer.serve``). Which copy to read: the installed
``<id>`` if there is one, else the largest temporary of that image whose
writer still runs (``owner``: its owner file is locked). A temporary whose
writer is gone, or that was removed (its copy failed verification, or it
was abandoned for another source), is never read from again; the bytes read
from it so far are verified by the reader's own md5 like any others.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass

from glance_image_sync import events
from glance_image_sync.store.owner import OWNER_PREFIX, TEMP_PREFIX, Owner, token_of


@dataclass
class Copy:
    """One open copy of an image: ``fd``; ``token`` names its writer (None: installed)."""

    fd: int
    token: str | None

    @property
    def installed(self) -> bool:
        return self.token is None


class ArrivingImages:
    """Opens the copies of images in a store directory, read-only."""

    def __init__(self, datadir: str):
        self.datadir = datadir
        self.dir_fd = os.open(datadir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._owners = Owner(self.dir_fd)  # only asked whose temporaries are alive

    def close(self) -> None:
        os.close(self.dir_fd)

    def open(self, image_id: str, skip: tuple = ()) -> Copy | None:
        """The best copy of ``image_id`` to read now (not one of the inodes in ``skip``)."""
        name = events.image_id(image_id)
        fd = self._open_regular(name)
        if fd is not None:
            if os.fstat(fd).st_ino not in skip:
                return Copy(fd, None)
            os.close(fd)
        best = None
        prefix = f"{TEMP_PREFIX}{name}."
        for entry in os.scandir(self.dir_fd):
            if not entry.name.startswith(prefix) or entry.name.startswith(OWNER_PREFIX):
                continue
            token = token_of(entry.name)
            if token is None or not self._owners.alive(token):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_ino not in skip and (
                        best is None or st.st_size > best[1]):
                    best = (entry.name, st.st_size, token)
        if best is None:
            return None
        fd = self._open_regular(best[0])
        return None if fd is None else Copy(fd, best[2])

    def _open_regular(self, name: str) -> int | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except OSError:  # missing, a symlink (ELOOP), unreadable: not a copy to serve
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd

    def abandoned(self, copy: Copy) -> bool:
        """Whether ``copy`` will never be complete: removed, or its writer is gone."""
        if os.fstat(copy.fd).st_nlink == 0:
            return True
        return not copy.installed and not self._owners.alive(copy.token)

    def now_installed(self, copy: Copy, image_id: str) -> bool:
        """Whether ``copy`` is the image's installed file (its writer verified it)."""
        st = os.fstat(copy.fd)
        try:
            there = os.stat(events.image_id(image_id), dir_fd=self.dir_fd,
                            follow_symlinks=False)
        except FileNotFoundError:
            return False
        return st.st_nlink > 0 and there.st_ino == st.st_ino and there.st_dev == st.st_dev
