"""Applying one ImageEvent to this node's store: the decision, not the plumbing.

Ensure present: skip an image this node already deleted (a late or replayed
upload must not resurrect it); do nothing when the local copy already has the
right size and md5; otherwise fetch it from the publisher, then from any other
peer, until one copy verifies. Ensure absent: remember the deletion, then
remove the file. Both are idempotent: replaying any sequence of events leaves
the same store.
"""

from __future__ import annotations

from dataclasses import dataclass

from oslo_log import log as logging

from glance_image_sync.events import Action
from glance_image_sync.exceptions import DiskFull, StoreError, TransferCancelled, TransferFailed
from glance_image_sync.metrics import Metrics

LOG = logging.getLogger(__name__)


def _about(image_id: str) -> dict:
    """A log record's extra fields: the image id as a field of its own (the
    journal's IMAGE_ID with ``use_journal``)."""
    return {"image_id": image_id}


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str
    cancelled: bool = False
    changed: bool = False  # the store changed (an install or a delete)


class ImageSync:
    def __init__(self, nodes, store, rsync, tombstones, metrics=None):
        self.nodes = nodes
        self.store = store
        self.rsync = rsync
        self.tombstones = tombstones
        self.metrics = metrics or Metrics()

    def apply(self, event) -> Outcome:
        if event.action is Action.ABSENT:
            return self._ensure_absent(event)
        return self._ensure_present(event)

    def _ensure_absent(self, event) -> Outcome:
        self.tombstones.add(event.image_id)
        try:
            removed = self.store.remove(event.image_id)
        except StoreError as exc:
            refused = exc
        else:
            refused = None
        if refused is not None:
            LOG.error("image %s: not deleted on %s: %s", event.image_id, self.nodes.this, refused,
                      extra=_about(event.image_id))
            return Outcome(True, str(refused))
        self.store.remove_temporaries(event.image_id)
        if removed:
            LOG.info("image %s: deleted on %s", event.image_id, self.nodes.this,
                     extra=_about(event.image_id))
            return Outcome(True, "deleted", changed=True)
        return Outcome(True, "was not here")

    def _ensure_present(self, event) -> Outcome:
        image_id = event.image_id
        if image_id in self.tombstones:
            LOG.info("image %s: was deleted on %s; %s ignored", image_id, self.nodes.this,
                     event.event_type or "ensure-present", extra=_about(image_id))
            return Outcome(True, "deleted earlier")
        if self.store.verify(image_id, event.size, event.checksum):
            LOG.debug("image %s: already in place and verified on %s", image_id, self.nodes.this,
                      extra=_about(image_id))
            return Outcome(True, "already in place")
        errors = []
        for node in self.nodes.sources_for(event.source):
            LOG.info("image %s: fetching from %s to %s (%d bytes)", image_id, node,
                     self.nodes.this, event.size, extra=_about(image_id))
            failure = self._fetch(node, event)
            if failure is None:
                LOG.info("image %s: installed and verified on %s (from %s)", image_id,
                         self.nodes.this, node, extra=_about(image_id))
                return Outcome(True, f"installed from {node}", changed=True)
            if isinstance(failure, TransferCancelled):
                return Outcome(False, "cancelled", cancelled=True)
            if isinstance(failure, DiskFull) or getattr(failure, "disk_full", False):
                LOG.error("image %s: disk full on %s: %s", image_id, self.nodes.this, failure,
                          extra=_about(image_id))
                return Outcome(False, f"disk full: {failure}")
            LOG.warning("image %s: copy from %s failed: %s", image_id, node, failure,
                        extra=_about(image_id))
            errors.append(f"{node}: {failure}")
        if not errors:
            errors.append("no peer to fetch from")
        return Outcome(False, "; ".join(errors))

    def _fetch(self, node, event):
        """Install the image from ``node``; the exception that stopped it, or None."""
        def fetch(path):
            self.rsync.fetch(node, event.image_id, path, event.size)

        try:
            with self.metrics.transfer(node, event.size):
                self.store.install(event.image_id, event.size, event.checksum, fetch)
        except (TransferFailed, StoreError) as exc:
            return exc
        return None
