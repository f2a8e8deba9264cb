"""The store's trash: deleted images kept for a grace period, and put back on demand.

A delete (the sync worker's ensure absent, ``reconcile --prune``) moves the
image's file into ``<datadir>/.glance-image-sync-trash/<id>`` by a rename: the
same file system, no copy, no extra space (a trash on another file system is
refused, never copied to). Nothing finds it there under the image's name:
Glance opens ``<datadir>/<id>`` only, a peer is only ever asked for
``<datadir>/<uuid>``, the listings of a store (``ImageStore.list_images``, a
peer's ``rsync --list-only``) take only names that are UUIDs, and the sweeps
of temporaries match ``.glance-image-sync.``, which this name does not. The
directory is mode 0700, with the store's owner.

Beside each trashed file, ``<id>.json`` records what it was and why it went
(``trashrecord``). The record is written before the rename: a crash between
leaves a record without a file, which is purged with age. A file without a
record it matches counts as trashed when its inode last changed, md5 unknown.

``purge`` removes what is past the grace period and, while the store's file
system has less than ``min_free_percent`` free, the oldest first. ``take_back``
claims a trashed file by renaming it to a temporary name of this process
(so no purge, of this or another process, can remove it meanwhile), checks its
size and md5, and links it in under its image id, never over an existing file.
Within a process a lock orders puts, purges and restores.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass

from glance_image_sync import events
from glance_image_sync.exceptions import Rejected, StoreError, VerificationFailed
from glance_image_sync.store import checksum
from glance_image_sync.store.images import file_version
from glance_image_sync.store.trashrecord import (
    RECORD_SUFFIX,
    Cause,
    Trashed,
    load_record,
    md5_source,
    trashed_version,
)

__all__ = ["TRASH_DIR", "Cause", "NotInTrash", "Restored", "Trash", "Trashed"]

TRASH_DIR = ".glance-image-sync-trash"
# A record half written by a process that died is removed after this long.
STALE_TEMP_SECONDS = 3600


class NotInTrash(StoreError):
    """The image is not in this store's trash (never trashed, restored or purged)."""


@dataclass(frozen=True)
class Restored:
    entry: Trashed
    md5: str  # of the file put back, computed now
    checked: str  # what it was checked against, in words


class Trash:
    """The trash of one open ``ImageStore``; safe from any thread."""

    def __init__(self, store):
        self.store = store
        self.path = os.path.join(store.datadir, TRASH_DIR)
        self._lock = threading.Lock()

    # -- putting in ---------------------------------------------------------

    def put(self, image_id: str, cause: Cause, known_md5=None, now=None) -> Trashed | None:
        """Move ``<id>`` into the trash; its entry, or None if it was not there.

        ``known_md5(version)`` gives the md5 this node verified for that
        version of the file (``file_version``), or None. Only a regular file is
        ever moved (StoreError otherwise, and it stays where it is).
        """
        name = events.image_id(image_id)
        with self._lock:
            try:
                st = os.stat(name, dir_fd=self.store.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{name} in {self.store.datadir} is not a regular file; "
                                 "left alone")
            md5, md5_from = (known_md5 or self.store.known_md5)(file_version(st)), "verified"
            if md5 is None and cause.md5 and cause.size in (None, st.st_size):
                md5, md5_from = cause.md5, "notification"
            entry = Trashed(name, time.time() if now is None else now, st.st_size, md5,
                            md5_from if md5 else None, trashed_version(st), cause.event_type,
                            cause.message_id, cause.publisher, cause.source, cause.by)
            with self._opened(create=True) as trash_fd:
                self._write_record(trash_fd, entry)
                try:
                    os.rename(name, name, src_dir_fd=self.store.dir_fd, dst_dir_fd=trash_fd)
                except FileNotFoundError:  # removed meanwhile by someone else
                    _unlink(trash_fd, name + RECORD_SUFFIX)
                    return None
                except OSError as exc:
                    _unlink(trash_fd, name + RECORD_SUFFIX)
                    if exc.errno == errno.EXDEV:
                        raise StoreError(f"{self.path} is on another file system than "
                                         f"{self.store.datadir}: {name} not moved there "
                                         "(a trash is never copied to)") from None
                    raise
                os.fsync(trash_fd)
            os.fsync(self.store.dir_fd)
            return entry

    def _write_record(self, trash_fd: int, entry: Trashed) -> None:
        data = json.dumps(entry.to_doc(), sort_keys=True).encode()
        temp = f".{entry.image_id}{RECORD_SUFFIX}.{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o640, dir_fd=trash_fd)
        try:
            os.write(fd, data)
            self._give_owner(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, entry.image_id + RECORD_SUFFIX, src_dir_fd=trash_fd, dst_dir_fd=trash_fd)

    def _give_owner(self, fd: int) -> None:
        """As root (a reconcile), what we create gets the store's owner, as installs do."""
        if os.geteuid() == 0 and tuple(os.fstat(fd)[4:6]) != self.store.owner_ids:
            os.fchown(fd, *self.store.owner_ids)

    @contextlib.contextmanager
    def _opened(self, create=False):
        """A descriptor of the trash directory (None when there is none and not ``create``)."""
        fd = self._open(create)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def _open(self, create: bool) -> int | None:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                return os.open(TRASH_DIR, flags, dir_fd=self.store.dir_fd)
            except FileNotFoundError:
                if not create:
                    return None
            with contextlib.suppress(FileExistsError):
                os.mkdir(TRASH_DIR, 0o700, dir_fd=self.store.dir_fd)
            fd = os.open(TRASH_DIR, flags, dir_fd=self.store.dir_fd)
        except OSError as exc:
            # A symlink or a file of that name: never followed, never written to.
            raise StoreError(f"{self.path} is not a directory of ours: {exc.strerror}") from None
        self._give_owner(fd)
        return fd

    # -- looking -------------------------------------------------------------

    def entries(self) -> list:
        """Every image in the trash, oldest first."""
        with self._opened() as trash_fd:
            if trash_fd is None:
                return []
            found = [self._entry(trash_fd, entry.name) for entry in os.scandir(trash_fd)
                     if _is_image_name(entry.name)]
        return sorted((e for e in found if e is not None), key=lambda e: e.trashed_at)

    def get(self, image_id: str) -> Trashed | None:
        name = events.image_id(image_id)
        with self._opened() as trash_fd:
            return None if trash_fd is None else self._entry(trash_fd, name)

    def _entry(self, trash_fd: int, name: str) -> Trashed | None:
        try:
            st = os.stat(name, dir_fd=trash_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None  # not ours: left alone
        record = load_record(trash_fd, name)
        if record is not None and record.file == trashed_version(st):
            return record
        # No record of this file (lost in a crash, or an older one's): what the file says.
        return Trashed(name, st.st_ctime, st.st_size, file=trashed_version(st))

    def stats(self) -> tuple:
        """(images, bytes) in the trash: a listing and a stat each, no record read."""
        count = total = 0
        with self._opened() as trash_fd:
            if trash_fd is None:
                return 0, 0
            for item in os.scandir(trash_fd):
                if _is_image_name(item.name) and item.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        total += item.stat(follow_symlinks=False).st_size
                        count += 1
        return count, total

    # -- purging -------------------------------------------------------------

    def purge(self, grace: int, min_free_percent: int, now=None, min_free_bytes=0) -> tuple:
        """Purge what is due; (purged [(Trashed, "expired" or "space")], next expiry or None).

        Past ``grace`` seconds an image goes; while less than
        ``min_free_percent`` of the file system, or ``min_free_bytes``, is
        free, the oldest go first.
        """
        now = time.time() if now is None else now
        purged = []
        with self._lock, self._opened() as trash_fd:
            if trash_fd is None:
                return purged, None
            kept = []
            for entry in self.entries():
                if entry.trashed_at + grace <= now:
                    if self._remove(trash_fd, entry):
                        purged.append((entry, "expired"))
                else:
                    kept.append(entry)
            while kept and (self.free_percent() < min_free_percent
                            or self.store.free_bytes() < min_free_bytes):
                entry = kept.pop(0)
                if self._remove(trash_fd, entry):
                    purged.append((entry, "space"))
            self._remove_stale_records(trash_fd, grace, now)
        return purged, (kept[0].trashed_at + grace if kept else None)

    def free_percent(self) -> float:
        st = os.fstatvfs(self.store.dir_fd)
        return 100.0 * st.f_bavail / st.f_blocks if st.f_blocks else 100.0

    def _remove(self, trash_fd: int, entry: Trashed) -> bool:
        try:
            st = os.stat(entry.image_id, dir_fd=trash_fd, follow_symlinks=False)
            if entry.file is not None and trashed_version(st) != entry.file:
                return False  # replaced since it was listed: judged again next time
            os.unlink(entry.image_id, dir_fd=trash_fd)
        except FileNotFoundError:
            return False  # restored or purged by another process meanwhile
        _unlink(trash_fd, entry.image_id + RECORD_SUFFIX)
        return True

    def _remove_stale_records(self, trash_fd: int, grace: int, now: float) -> None:
        """Records whose file is gone, once past the grace period; half-written ones."""
        for item in os.scandir(trash_fd):
            name = item.name
            if name.endswith(RECORD_SUFFIX) and _is_image_name(name[:-len(RECORD_SUFFIX)]):
                if _exists(trash_fd, name[:-len(RECORD_SUFFIX)]):
                    continue
                record = load_record(trash_fd, name[:-len(RECORD_SUFFIX)])
                since = record.trashed_at if record else item.stat().st_mtime
                if since + grace <= now:
                    _unlink(trash_fd, name)
            elif name.startswith(".") and RECORD_SUFFIX + "." in name:
                with contextlib.suppress(FileNotFoundError):
                    if item.stat(follow_symlinks=False).st_mtime + STALE_TEMP_SECONDS <= now:
                        _unlink(trash_fd, name)

    # -- taking back -----------------------------------------------------------

    def take_back(self, image_id: str, expect_size=None, expect_md5=None) -> Restored:
        """Put ``<id>`` back in the store, once its size and md5 check out.

        Checked against the record (size always; md5 when known) and against
        ``expect_size`` and ``expect_md5`` when given (a peer's). NotInTrash if
        it is not there; VerificationFailed if a check fails, and StoreError if
        ``<id>`` exists in the store: the file then stays in the trash.
        """
        name = events.image_id(image_id)
        with self._lock:
            entry = self.get(name)
            if entry is None:
                raise NotInTrash(f"{name} is not in the trash of {self.store.datadir}")
            self._not_in_place(name)
            self.store.owner.hold()
            try:
                temp = self.store.owner.temp_name(name)
                with self._opened() as trash_fd:
                    try:
                        os.rename(name, temp, src_dir_fd=trash_fd, dst_dir_fd=self.store.dir_fd)
                    except FileNotFoundError:
                        raise NotInTrash(f"{name} left the trash of {self.store.datadir} "
                                         "meanwhile (purged or restored)") from None
                    try:
                        md5, checked = self._check(temp, entry, expect_size, expect_md5)
                        os.link(temp, name, src_dir_fd=self.store.dir_fd,
                                dst_dir_fd=self.store.dir_fd, follow_symlinks=False)
                    except BaseException as exc:
                        os.rename(temp, name, src_dir_fd=self.store.dir_fd, dst_dir_fd=trash_fd)
                        if isinstance(exc, FileExistsError):
                            raise StoreError(f"{name} is in place in {self.store.datadir} "
                                             "already; the trashed copy stays") from None
                        raise
                    os.unlink(temp, dir_fd=self.store.dir_fd)
                    os.fsync(self.store.dir_fd)
                    _unlink(trash_fd, name + RECORD_SUFFIX)
            finally:
                self.store.owner.let_go()
        return Restored(entry, md5, checked)

    def _not_in_place(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.stat(name, dir_fd=self.store.dir_fd, follow_symlinks=False)
            raise StoreError(f"{name} is in place in {self.store.datadir} already; the "
                             "trashed copy stays")

    def _check(self, temp: str, entry: Trashed, expect_size, expect_md5) -> tuple:
        fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.store.dir_fd)
        try:
            size = os.fstat(fd).st_size
            for expected, whose in ((entry.size, "recorded when it was trashed"),
                                    (expect_size, "expected")):
                if expected is not None and size != expected:
                    raise VerificationFailed(f"size {size}, {whose} {expected}")
            md5 = checksum.md5_of_fd(fd)
        finally:
            os.close(fd)
        known = [(entry.md5, f"recorded when it was trashed ({md5_source(entry)})"),
                 (expect_md5, "expected")]
        for expected, whose in known:
            if expected is not None and md5 != expected:
                raise VerificationFailed(f"md5 {md5}, {whose} {expected}")
        if entry.md5 or expect_md5:
            return md5, "size and md5 checked"
        return md5, ("size checked only: no md5 was known when it was trashed (this node "
                     "had not verified it, and the delete carried none)")


def _is_image_name(name: str) -> bool:
    try:
        events.image_id(name)
    except Rejected:
        return False
    return True


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _unlink(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
