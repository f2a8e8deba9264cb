"""This node's image store: Glance's file store directory, and nothing outside it.

Every operation goes through a descriptor of the directory (``dir_fd``) with
a name that is a validated image UUID, or one of our own temporary names, so
no path built from a message can leave the directory, and nothing is opened or
removed through a symlink (``O_NOFOLLOW``; unlink and rename act on the link
itself).

An image is installed like glance_store would want it: fetched into a
temporary file in the same directory (mode 0600, so no one reads a partial
image), verified against the event's size and md5, given its owner and mode,
fsynced, and only then renamed onto ``<id>``. A copy that fails verification is
removed, never renamed. The directory is fsynced after every rename and unlink.

Temporary names carry this process's owner token (``owner``): a process
removes only its own temporaries and those of processes that are gone, so the
daemon, a cron run and ``reconcile`` can write into one store at once.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from oslo_log import log as logging

from glance_image_sync import events
from glance_image_sync.exceptions import DiskFull, Rejected, StoreError, VerificationFailed
from glance_image_sync.store import checksum
from glance_image_sync.store.owner import OWNER_PREFIX, TEMP_PREFIX, Owner, token_of

LOG = logging.getLogger(__name__)

__all__ = ["TEMP_PREFIX", "ImageStore"]
_CACHE_LIMIT = 100_000


class ImageStore:
    def __init__(self, settings):
        self.datadir = settings.datadir
        self.file_mode = settings.file_mode
        try:
            self.dir_fd = os.open(self.datadir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(
                f"cannot open the image store {self.datadir}: {exc.strerror}"
            ) from None
        st = os.fstat(self.dir_fd)
        self.owner_ids = (st.st_uid, st.st_gid)
        # (dev, ino, size, mtime_ns, ctime_ns) -> md5 hex: Glance sends three
        # or more events per upload, and image.update on every property change.
        self._verified = {}
        self._lock = threading.Lock()
        self.owner = Owner(self.dir_fd)
        # Called with the bytes a copy needs when fewer are free: the trash's
        # keeper purges the oldest deleted images for it (sync.trashkeeper).
        self.make_room = None

    def close(self) -> None:
        """Give up this process's owner file (remove its temporaries first) and the store."""
        self.owner.release()
        os.close(self.dir_fd)

    # -- reading -----------------------------------------------------------

    def verify(self, image_id: str, size: int, md5: str) -> bool:
        """Whether ``<id>`` is a regular file with this size and md5."""
        name = events.image_id(image_id)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                LOG.warning("image %s is a symlink in %s; it will be replaced",
                            name, self.datadir)
                return False
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                return False
            return self._md5_of(fd, st) == md5
        finally:
            os.close(fd)

    def checksum(self, image_id: str):
        """(size, md5) of ``<id>`` as it is now; StoreError if it is no regular file."""
        name = events.image_id(image_id)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except OSError as exc:
            raise StoreError(f"cannot read {name} in {self.datadir}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{name} in {self.datadir} is not a regular file")
            return st.st_size, self._md5_of(fd, st)
        finally:
            os.close(fd)

    def _md5_of(self, fd: int, st) -> str:
        key = file_version(st)
        with self._lock:
            cached = self._verified.get(key)
        if cached is not None:
            return cached
        digest = checksum.md5_of_fd_yielding(fd)
        self._remember(key, digest)
        return digest

    def _remember(self, key, digest: str) -> None:
        with self._lock:
            if len(self._verified) >= _CACHE_LIMIT:
                self._verified.clear()
            self._verified[key] = digest

    def known_md5(self, version: tuple) -> str | None:
        """The md5 this process verified for that version of a file (``file_version``)."""
        with self._lock:
            return self._verified.get(version)

    def verification(self, image_id: str):
        """(file version, md5) of ``<id>`` as it is now, if this process verified that version."""
        try:
            st = os.stat(events.image_id(image_id), dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        key = file_version(st)
        with self._lock:
            md5 = self._verified.get(key)
        return (key, md5) if md5 else None

    def list_images(self) -> dict:
        """{image id: size} of every regular file named like an image."""
        found = {}
        for entry in os.scandir(self.dir_fd):
            try:
                image_id = events.image_id(entry.name)
            except Rejected:
                continue
            if entry.is_file(follow_symlinks=False):
                found[image_id] = entry.stat(follow_symlinks=False).st_size
        return found

    def free_bytes(self) -> int:
        st = os.fstatvfs(self.dir_fd)
        return st.f_bavail * st.f_frsize

    # -- writing -----------------------------------------------------------

    def install(self, image_id: str, size: int, md5: str, fetch) -> None:
        """Fetch, verify and atomically install ``<id>``.

        ``fetch(path)`` writes the copy into the (existing, empty) file at
        ``path`` and gives it the source's mode. The md5 is computed while it
        writes, reading right behind it (so verifying adds no second pass over
        the image); should the writer go back over bytes already read, the
        file is read again before anything is concluded. The installed file
        gets ``image_file_mode`` if set, else the source's mode (never set-id
        or sticky bits), and the datadir's owner and group.
        """
        name = events.image_id(image_id)
        free = self.free_bytes()
        if free < size and self.make_room is not None:
            self.make_room(size)
            free = self.free_bytes()
        if free < size:
            raise DiskFull(f"disk full: {name} needs {size} bytes, {free} free in {self.datadir}")
        self.owner.hold()
        try:
            self._install(name, size, md5, fetch)
        finally:
            self.owner.let_go()

    def _install(self, name: str, size: int, md5: str, fetch) -> None:
        temp = self.owner.temp_name(name)
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.dir_fd)
        try:
            follower = checksum.Md5Follower(fd)
            follower.start()
            try:
                fetch(os.path.join(self.datadir, temp))
            finally:
                digest, hashed = follower.finish()
            st = os.fstat(fd)
            try:
                in_place = os.stat(temp, dir_fd=self.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                in_place = None
            if in_place is None or in_place.st_ino != st.st_ino:
                raise StoreError(f"temporary file {temp} in {self.datadir} was removed or "
                                 "replaced during the transfer")
            if st.st_size != size:
                raise VerificationFailed(f"size {st.st_size}, expected {size}")
            if digest != md5 or hashed != st.st_size:
                # The follower may have read bytes rewritten since.
                digest = checksum.md5_of_fd(fd)
            if digest != md5:
                raise VerificationFailed(f"md5 {digest}, expected {md5}")
            if (st.st_uid, st.st_gid) != self.owner_ids:
                os.fchown(fd, *self.owner_ids)
            os.fchmod(fd, self.file_mode if self.file_mode is not None
                      else stat.S_IMODE(st.st_mode) & 0o777)
            os.fsync(fd)
            os.rename(temp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            temp = None
            os.fsync(self.dir_fd)
            self._remember(file_version(os.fstat(fd)), digest)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull(f"disk full while writing {name} in {self.datadir}") from None
            raise
        finally:
            os.close(fd)
            if temp is not None:
                self._unlink_quietly(temp)

    def remove(self, image_id: str) -> bool:
        """Remove ``<id>``; True if it was there. Only ever a regular file."""
        name = events.image_id(image_id)
        try:
            st = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{name} in {self.datadir} is not a regular file; left alone")
        try:
            os.unlink(name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return False
        os.fsync(self.dir_fd)
        return True

    def remove_temporaries(self, image_id: str | None = None) -> list:
        """Remove temporaries (of one image, or all) of this process and of gone ones.

        Another live process's are never touched (``owner``); with no
        ``image_id``, the owner files of gone processes go too. Returns the
        names removed.
        """
        prefix = TEMP_PREFIX + (events.image_id(image_id) + "." if image_id else "")
        removed = []
        verdicts = {}  # token -> may be removed
        for entry in os.scandir(self.dir_fd):
            if not entry.name.startswith(prefix) or entry.name.startswith(OWNER_PREFIX):
                continue
            token = token_of(entry.name)
            if token not in verdicts:
                verdicts[token] = self.owner.mine(token) or not self.owner.alive(token)
            if not verdicts[token]:
                continue
            if entry.is_file(follow_symlinks=False):
                if self._unlink_quietly(entry.name):
                    removed.append(entry.name)
            elif image_id is None and entry.is_dir(follow_symlinks=False):
                if self._remove_staging(entry.name):
                    removed.append(entry.name)
        if image_id is None:
            self.owner.remove_gone_owner_files()
        return removed

    def _remove_staging(self, name: str) -> bool:
        """A transfer's staging directory (transfer._make_staging): links, then itself."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self.dir_fd)
            try:
                for entry in os.scandir(fd):
                    os.unlink(entry.name, dir_fd=fd)
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=self.dir_fd)
            return True
        except OSError as exc:
            LOG.error("cannot remove staging directory %s in %s: %s", name, self.datadir,
                      exc.strerror)
            return False

    def _unlink_quietly(self, name: str) -> bool:
        try:
            os.unlink(name, dir_fd=self.dir_fd)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            reason = exc.strerror
        LOG.error("cannot remove temporary file %s in %s: %s", name, self.datadir, reason)
        return False


def file_version(st) -> tuple:
    """What identifies one version of a file: a write, chmod, chown or rename changes it."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
