"""Purging the store's trash: past the grace period, or early when space runs short.

The daemon runs a ``TrashKeeper`` on a thread of its own, never on a
connection thread (unlinking a large file takes a while): every
``CHECK_EVERY`` seconds it looks at the store's free space (one statvfs), and
it lists the trash when something there is due, or when space is short. A cron
run purges once, at its start (``tend``).

A copy about to be installed that finds fewer bytes free than it needs asks
for room (``make_room``, the store's hook): the oldest trashed images go
until it fits. Each image purged is logged, at info when its grace period is
over, as a warning when it goes early for space, with what was recorded when
it was trashed.
"""

from __future__ import annotations

import threading
import time

from oslo_log import log as logging

from glance_image_sync.exceptions import StoreError
from glance_image_sync.store.trashrecord import describe_cause

LOG = logging.getLogger(__name__)

CHECK_EVERY = 10.0  # seconds between two looks at the free space
RESCAN_EVERY = 3600.0  # the trash is listed at least this often (other processes trash too)


class TrashKeeper:
    def __init__(self, trash, deletes, metrics, node: str, clock=time.time):
        """``deletes``: the ``DeleteSettings``; ``metrics``: counts ``purged(reason)``."""
        self.trash = trash
        self.deletes = deletes
        self.metrics = metrics
        self.node = node
        self.clock = clock
        self.next_scan = 0.0  # when the trash is next listed, whatever the space
        self._stop = threading.Event()
        self._thread = None

    def tend(self) -> list:
        """Purge what is due now; the [(Trashed, reason)] purged."""
        now = self.clock()
        free = self.trash.free_percent()
        short = free < self.deletes.min_free_percent
        if not short and now < self.next_scan:
            return []
        purged, next_expiry = self.trash.purge(self.deletes.grace,
                                               self.deletes.min_free_percent, now)
        self.next_scan = min(next_expiry or now + RESCAN_EVERY,
                             now + max(self.deletes.grace, CHECK_EVERY), now + RESCAN_EVERY)
        self._report(purged, f"{free:.1f} % of the store's file system was free, below "
                     f"trash_min_free_percent ({self.deletes.min_free_percent} %)")
        return purged

    def make_room(self, size: int) -> list:
        """Purge the oldest trashed images until ``size`` bytes are free (or none is left)."""
        try:
            purged, _ = self.trash.purge(self.deletes.grace, self.deletes.min_free_percent,
                                         self.clock(), min_free_bytes=size)
        except (OSError, StoreError) as exc:
            LOG.error("cannot purge the trash of %s on %s: %s", self.trash.path, self.node,
                      exc)
            return []
        self._report(purged, f"a copy of {size} bytes needed the room")
        return purged

    def _report(self, purged, short: str) -> None:
        for entry, reason in purged:
            self.metrics.purged(reason)
            if reason == "expired":
                LOG.info("image %s: purged from the trash on %s, its grace period over "
                         "(deleted_image_grace %d s; %s)", entry.image_id, self.node,
                         self.deletes.grace, describe_cause(entry))
            else:
                LOG.warning("image %s: purged from the trash on %s before its grace period "
                            "ended: %s; oldest first (%s)", entry.image_id, self.node, short,
                            describe_cause(entry))

    def tend_quietly(self) -> None:
        """``tend``, with a failure logged rather than raised (the outer edge of a run)."""
        try:
            self.tend()
        except (OSError, StoreError) as exc:
            failure = exc
        else:
            return
        LOG.error("cannot purge the trash of %s on %s: %s", self.trash.path, self.node, failure)

    # -- the daemon's thread ---------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trash", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tend_quietly()
            except Exception:  # noqa: BLE001 - the thread's outer edge: keep tending
                LOG.exception("unexpected error while purging the trash on %s", self.node)
            wait = min(CHECK_EVERY, self.next_scan - self.clock())
            self._stop.wait(max(0.1, wait))
