"""Applying one ImageEvent to this node's store: the decision, not the plumbing.

Ensure present: skip an image this node already deleted (a late or replayed
upload must not resurrect it); do nothing when the local copy already has the
right size and md5; otherwise fetch it from its sources (``sync.sources``: the
node before this one in the relay's chain, the publisher, any other peer) until
one copy verifies. Ensure absent: when Glance's API can be asked,
only once it says the image is gone (an image it still has stays, and the
event is refused: dead-lettered; an API that cannot tell makes it a failed
attempt, retried, the file still in place); then remember the deletion, and
move the file into the store's trash (removed at once with
``deleted_image_grace = 0``). Both are idempotent: replaying any sequence of
events leaves the same store.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

from oslo_log import log as logging

from glance_image_sync.events import Action
from glance_image_sync.exceptions import DiskFull, StoreError, TransferCancelled, TransferFailed
from glance_image_sync.glanceapi import ImageState
from glance_image_sync.metrics import Metrics
from glance_image_sync.store.trash import Cause
from glance_image_sync.sync.sources import sources

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
    refused: bool = False  # never to be applied (a delete of an image Glance has): dead-letter


REFUSED = "image still active in Glance"


class ImageSync:
    def __init__(self, nodes, store, rsync, tombstones, metrics=None, trash=None, api=None,
                 records=None, relay=False, relay_wait=0):
        self.nodes = nodes
        self.store = store
        self.rsync = rsync
        self.tombstones = tombstones
        self.metrics = metrics or Metrics()
        self.trash = trash  # a store.trash.Trash; None: a delete removes the file at once
        self.api = api  # a GlanceApi with credentials, asked before each delete; or None
        self.records = records  # ImageRecords: an md5 verified before a restart
        self.relay = relay  # stream from the node before this one (sync.sources)
        self.relay_wait = relay_wait  # seconds that node may take to start receiving

    def apply(self, event) -> Outcome:
        if event.action is Action.ABSENT:
            return self._ensure_absent(event)
        return self._ensure_present(event)

    def _ensure_absent(self, event) -> Outcome:
        image_id = event.image_id
        # A delete applied once was confirmed then; a replay needs no second answer.
        if self.api is not None and image_id not in self.tombstones:
            refusal = self._ask_glance(event)
            if refusal is not None:
                return refusal
        self.tombstones.add(image_id)
        try:
            if self.trash is not None:
                removed = self.trash.put(image_id, _cause(event),
                                         lambda version: self._known_md5(image_id, version))
            else:
                removed = self.store.remove(image_id)
        except StoreError as exc:
            refused = exc
        else:
            refused = None
        if refused is not None:
            LOG.error("image %s: not deleted on %s: %s", image_id, self.nodes.this, refused,
                      extra=_about(image_id))
            return Outcome(True, str(refused))
        self.store.remove_temporaries(image_id)
        if not removed:
            return Outcome(True, "was not here")
        self._count_delete("applied")
        detail = "moved to the trash" if self.trash is not None else "deleted"
        LOG.info("image %s: %s on %s (%s, message %s, published by %s)", image_id, detail,
                 self.nodes.this, event.event_type or "ensure-absent", event.message_id,
                 event.publisher or event.source, extra=_about(image_id))
        return Outcome(True, detail, changed=True)

    def _ask_glance(self, event) -> Outcome | None:
        """None once Glance's API says the image is gone; else why not to delete it now."""
        answer = self.api.image_state(event.image_id)
        if answer.state is ImageState.GONE:
            return None
        if answer.state is ImageState.ACTIVE:
            self._count_delete("refused")
            LOG.error("image %s: delete refused on %s: %s (%s); %s, message %s, published by "
                      "%s, dead-lettered", event.image_id, self.nodes.this, REFUSED,
                      answer.detail, event.event_type, event.message_id,
                      event.publisher or event.source, extra=_about(event.image_id))
            return Outcome(False, f"{REFUSED} ({answer.detail})", refused=True)
        self._count_delete("unconfirmed")
        # Neither lost nor applied blindly: retried as a failed attempt, the file in place.
        return Outcome(False, f"not deleted until Glance's API confirms it: {answer.detail}")

    def _count_delete(self, result: str) -> None:
        count = self.metrics.deleted(result)
        if count is None:
            return
        undo = ("'glance-image-sync restore <image id>' puts a trashed image back"
                if self.trash is not None else
                "with deleted_image_grace = 0 they are gone for good")
        LOG.error("%d image deletes within a minute on %s, more than delete_alarm_threshold "
                  "(%d): a mass delete? Check who sent them ('glance-image-sync show <image "
                  "id>'); %s", count, self.nodes.this, self.metrics.delete_rate.threshold, undo)

    def _known_md5(self, image_id: str, version: tuple) -> str | None:
        """The md5 verified for this version of the file: by this process, or before a
        restart (the image's record), without reading it."""
        md5 = self.store.known_md5(version)
        if md5 is None and self.records is not None:
            verified = self.records.verified(image_id)
            if verified is not None and verified[0] == tuple(version):
                md5 = verified[1]
        return md5

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
        # Past relay_wait the node before this one has its copy, or will not soon: an
        # old event (a node catching up) is fetched the plain way, in shared sessions.
        wait = relay_wait_left(event.timestamp, self.relay_wait)
        for source in sources(self.nodes, event.source, self.relay and wait > 0):
            node = source.node
            LOG.info("image %s: %s from %s to %s (%d bytes)", image_id,
                     "streaming" if source.relay else "fetching", node, self.nodes.this,
                     event.size, extra=_about(image_id))
            failure = self._fetch(source, event, wait)
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
            # The node before this one may simply not have it (yet): not worth a warning.
            LOG.log(logging.INFO if source.relay else logging.WARNING,
                    "image %s: copy from %s failed: %s", image_id, node, failure,
                    extra=_about(image_id))
            errors.append(f"{node}: {failure}")
        if not errors:
            errors.append("no peer to fetch from")
        return Outcome(False, "; ".join(errors))

    def _fetch(self, source, event, wait):
        """Install the image from ``source``; the exception that stopped it, or None."""
        def fetch(path):
            if source.relay:
                self.rsync.stream(source.node, event.image_id, path, event.size, wait)
            else:
                self.rsync.fetch(source.node, event.image_id, path, event.size)

        try:
            with self.metrics.transfer(source.node, event.size):
                self.store.install(event.image_id, event.size, event.checksum, fetch)
        except (TransferFailed, StoreError) as exc:
            return exc
        return None


def relay_wait_left(timestamp: str | None, relay_wait: int, now=None) -> int:
    """What is left of ``relay_wait`` since Glance sent the event (all of it if unknown).

    Every node receives an upload's event within moments, so the node before
    this one starts receiving within ``relay_wait`` of that or not soon: a
    node that catches up on old events does not wait for it per image, nor
    stream from it (0: the plain sources, whose rsync sessions carry a
    backlog many images at a time, not one stream per image). The
    clocks of the nodes may differ a little; the wait stays within 0 and
    ``relay_wait`` whatever they say.
    """
    try:
        sent = datetime.datetime.strptime(timestamp or "", "%Y-%m-%d %H:%M:%S.%f")
    except ValueError:
        return relay_wait
    now = now or datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    age = (now - sent).total_seconds()
    return max(0, min(relay_wait, math.ceil(relay_wait - age)))


def _cause(event) -> Cause:
    return Cause(event_type=event.event_type, message_id=event.message_id,
                 publisher=event.publisher, source=event.source, size=event.size,
                 md5=event.checksum)
