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
from glance_image_sync.store import DiskFull, StoreError
from glance_image_sync.transfer import TransferCancelled, TransferFailed

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str
    cancelled: bool = False


class ImageSync:
    def __init__(self, nodes, store, rsync, tombstones):
        self.nodes = nodes
        self.store = store
        self.rsync = rsync
        self.tombstones = tombstones

    def apply(self, event) -> Outcome:
        if event.action is Action.ABSENT:
            return self._ensure_absent(event)
        return self._ensure_present(event)

    def _ensure_absent(self, event) -> Outcome:
        self.tombstones.add(event.image_id)
        try:
            removed = self.store.remove(event.image_id)
        except StoreError as exc:
            LOG.error("image %s: not deleted on %s: %s", event.image_id, self.nodes.this, exc)
            return Outcome(True, str(exc))
        self.store.remove_temporaries(event.image_id)
        if removed:
            LOG.info("image %s: deleted on %s", event.image_id, self.nodes.this)
            return Outcome(True, "deleted")
        return Outcome(True, "was not here")

    def _ensure_present(self, event) -> Outcome:
        image_id = event.image_id
        if image_id in self.tombstones:
            LOG.info("image %s: was deleted on %s; %s ignored", image_id, self.nodes.this,
                     event.event_type or "ensure-present")
            return Outcome(True, "deleted earlier")
        if self.store.verify(image_id, event.size, event.checksum):
            LOG.debug("image %s: already in place and verified on %s", image_id, self.nodes.this)
            return Outcome(True, "already in place")
        errors = []
        for node in self.nodes.sources_for(event.source):
            LOG.info("image %s: fetching from %s to %s (%d bytes)", image_id, node,
                     self.nodes.this, event.size)
            try:
                self.store.install(image_id, event.size, event.checksum,
                                   lambda path, node=node: self.rsync.fetch(node, image_id, path))
            except TransferCancelled:
                return Outcome(False, "cancelled", cancelled=True)
            except (TransferFailed, StoreError) as exc:
                if isinstance(exc, DiskFull) or getattr(exc, "disk_full", False):
                    LOG.error("image %s: disk full on %s: %s", image_id, self.nodes.this, exc)
                    return Outcome(False, f"disk full: {exc}")
                LOG.warning("image %s: copy from %s failed: %s", image_id, node, exc)
                errors.append(f"{node}: {exc}")
                continue
            LOG.info("image %s: installed and verified on %s (from %s)", image_id,
                     self.nodes.this, node)
            return Outcome(True, f"installed from {node}")
        if not errors:
            errors.append("no peer to fetch from")
        return Outcome(False, "; ".join(errors))
