"""Transfers from peers, sharing rsync sessions under a backlog.

An image asked for while its peer is busy waits for the next session with the
others asked for meanwhile, so that a node catching up on many images pays an
rsync and ssh start-up per few GiB rather than per image. An image asked for
when its peer is idle starts at once.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading

from oslo_log import log as logging

from glance_image_sync import events
from glance_image_sync.exceptions import TransferCancelled, TransferFailed
from glance_image_sync.store.owner import batch_name_beside
from glance_image_sync.transfer import masters
from glance_image_sync.transfer.rsync import (
    first_line,
    kill_group,
    rsync_argv,
    run_rsync,
    usable,
)
from glance_image_sync.transfer.stream import stream_into

LOG = logging.getLogger(__name__)

# rsync sessions that run at once from one peer; images asked for while they
# run wait, together, for the next one.
SESSIONS_PER_PEER = 2
# A session carries at most this many images, and this many bytes unless it is
# one image: each image is installed only once its whole session has ended.
BATCH_IMAGES = 16
BATCH_BYTES = 1024 ** 3
# rsync's exit codes for "some files were not transferred": the others were.
_PARTIAL = (23, 24)


class _Batch:
    """Images to copy from one peer in one rsync session, and how each one went."""

    def __init__(self, node):
        self.node = node
        self.wanted = {}  # image id -> destination file
        self.size = 0
        self.failures = {}  # image id -> TransferFailed
        self.done = threading.Event()

    @classmethod
    def of(cls, node, wanted, parent):
        """A batch of some of ``parent``'s images, whose failures are ``parent``'s."""
        batch = cls(node)
        batch.wanted = wanted
        batch.failures = parent.failures
        return batch

    def takes(self, size: int) -> bool:
        return len(self.wanted) < BATCH_IMAGES and self.size + size <= BATCH_BYTES


class Rsync:
    """Runs transfers; ``cancel_all`` stops every running one at once.

    While a peer already serves SESSIONS_PER_PEER sessions, the images asked of
    it wait and then travel together, in one session: under a backlog, each
    rsync and ssh start-up is shared by many images; an image asked for alone
    starts at once.
    """

    def __init__(self, settings):
        self.settings = usable(settings)
        self._running = set()
        self._lock = threading.Condition()
        self._cancelled = False
        self._sessions = collections.Counter()  # node -> sessions running
        self._waiting = {}  # node -> the batch that has not started yet

    def fetch(self, node: str, image_id: str, dest: str, size: int = 0) -> None:
        """Copy the image from ``node`` into the existing file ``dest``."""
        events.image_id(image_id)  # here, so that a bad id fails alone, not its batch
        with self._lock:
            batch = self._waiting.get(node)
            leader = batch is None or not batch.takes(size)
            if leader:
                batch = self._waiting[node] = _Batch(node)
            batch.wanted[image_id] = dest
            batch.size += size
            if leader:  # wait for a session, while others join
                while self._sessions[node] >= SESSIONS_PER_PEER and not self._cancelled:
                    self._lock.wait()
                if self._waiting.get(node) is batch:
                    del self._waiting[node]
                self._sessions[node] += 1
        if leader:
            try:
                self._run(batch)
            finally:
                with self._lock:
                    self._sessions[node] -= 1
                    self._lock.notify_all()
                batch.done.set()
        else:
            batch.done.wait()
        if image_id in batch.failures:
            raise batch.failures[image_id]
        if self._cancelled:
            raise TransferCancelled("shutting down")

    def stream(self, node: str, image_id: str, dest: str, size: int, wait: int) -> None:
        """Stream the image from ``node``, which may still be receiving it (transfer.stream)."""
        stream_into(self.settings, node, image_id, dest, size, wait,
                    register=self._register, unregister=self._unregister)
        if self._cancelled:
            raise TransferCancelled("shutting down")

    def _run(self, batch) -> None:
        """One rsync session for the batch; its failures, per image, in ``batch.failures``."""
        ids = list(batch.wanted)
        what = f"rsync from {batch.node}"
        try:
            if len(ids) == 1:
                self._rsync(batch.node, ids[0], batch.wanted[ids[0]], len(ids))
                return
            try:
                staging = _make_staging(batch.wanted)
            except OSError as exc:  # no hard links here: one session per image
                LOG.warning("%s: cannot link the copies into a staging directory (%s); one "
                            "session per image", what, exc.strerror)
                for image_id in ids:
                    self._run(_Batch.of(batch.node, {image_id: batch.wanted[image_id]}, batch))
                return
            try:
                LOG.info("%s: %d images in one session", what, len(ids))
                self._rsync(batch.node, ids, staging + "/", len(ids))
            finally:
                _remove_staging(staging, batch.wanted)
        except TransferFailed as failure:
            for image_id in ids:
                failed = _failure_of(failure, image_id, len(ids))
                if failed is not None:
                    batch.failures[image_id] = failed
        except Exception as exc:  # noqa: BLE001 - each image's install reports it
            LOG.exception("%s: unexpected error", what)
            for image_id in ids:
                batch.failures[image_id] = TransferFailed(f"{what}: unexpected error: {exc}")

    def _rsync(self, node, image_ids, dest, images) -> None:
        run_rsync(rsync_argv(self.settings, node, image_ids, dest), f"rsync from {node}",
                  self.settings.total_timeout * images, register=self._register,
                  unregister=self._unregister)

    def _register(self, proc) -> None:
        with self._lock:
            if self._cancelled:
                raise TransferCancelled("shutting down")
            self._running.add(proc)

    def _unregister(self, proc) -> None:
        with self._lock:
            self._running.discard(proc)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def cancel_all(self) -> None:
        with self._lock:
            self._cancelled = True
            running = list(self._running)
            self._lock.notify_all()
        for proc in running:
            kill_group(proc)

    def close(self) -> None:
        """Stop every transfer, then close the ssh connections kept to peers."""
        self.cancel_all()
        masters.close_all(self.settings)


def _make_staging(wanted: dict) -> str:
    """A directory beside the destinations, in which each is linked under its image id.

    rsync puts several files into one directory under their own names; the
    links make those the destination files themselves (``--inplace`` writes
    into the file it finds). Named like the store's temporaries, with the same
    owner, so a directory left by a killed run is removed at the next start and
    never while its process runs.
    """
    first = next(iter(wanted.values()))
    staging = os.path.join(os.path.dirname(first), batch_name_beside(os.path.basename(first)))
    os.mkdir(staging, 0o700)
    try:
        for image_id, dest in wanted.items():
            os.link(dest, os.path.join(staging, image_id))
    except OSError:
        _remove_staging(staging, wanted)
        raise
    return staging


def _remove_staging(staging: str, wanted: dict) -> None:
    for image_id in wanted:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(staging, image_id))
    os.rmdir(staging)


def _failure_of(failure: TransferFailed, image_id: str, images: int) -> TransferFailed | None:
    """What a session's failure means for one of its images.

    rsync goes on with the other files when one cannot be read and ends with
    23 or 24: an image it names failed, the others came (and are verified like
    any copy). Any other failure, such as no connection, is every image's.
    """
    if images == 1 or failure.returncode not in _PARTIAL:  # a cancelled one has none
        return failure
    named = [line for line in failure.stderr.splitlines() if image_id in line]
    if named:
        return TransferFailed(f"{failure.what} exited {failure.returncode}: "
                              f"{first_line(named[0])}", disk_full=failure.disk_full)
    return None
