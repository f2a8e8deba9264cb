"""``reconcile``: an image only this node has is removed on evidence, else copied out.

"Here only" is what a lost upload notification leaves behind: the image sits
on the node Glance wrote it to, and nowhere else. It is also what a delete
that reached only the other nodes leaves. Only evidence tells the two apart,
and a file is removed (``--prune``) only on evidence that the image is gone:

* a delete this node applied (its tombstone in ``state_dir``; Glance never
  reuses an id), or
* Glance's API saying the image is deleted or unknown, when credentials are
  configured (``glanceapi``) and the API can see the images the stores agree
  on (it answers 404 for an image the credentials may not see, too).

A removal goes into the store's trash (``deleted_image_grace``), as a delete
does: evidence can be wrong. Without evidence (``--fix`` or ``--prune``) the
image is copied to the peers.
Reconcile can only pull, so it does what the fan-out does for an upload: an
ensure-present event with this node as the source and the md5 computed here
goes into every peer's queue through the confirmed publisher, and each peer's
own worker fetches it from here and verifies it. The event waits in the
durable queue of a peer that is down, like any other.
"""

from __future__ import annotations

from oslo_log import log as logging

from glance_image_sync.broker import confirmed, topology
from glance_image_sync.broker import connection as brokers
from glance_image_sync.events import Action, ImageEvent
from glance_image_sync.exceptions import BrokerUnavailable, StoreError
from glance_image_sync.store.trash import Cause

LOG = logging.getLogger(__name__)

EVENT_TYPE = "reconcile"


class HereOnly:
    def __init__(self, settings, store, tombstones, api, connect=brokers.connected,
                 trash=None):
        self.settings = settings
        self.nodes = settings.nodes
        self.store = store
        self.tombstones = tombstones
        self.api = api
        self.connect = connect
        # Where --prune moves a file (deleted_image_grace > 0); None: removed at once.
        self.trash = trash if settings.deletes.grace else None
        self.api_distrusted = None  # why the API's "gone" is not evidence, once known

    def check_api(self, agreed_ids) -> None:
        """Ask the API about one image every store has: if it calls that one gone, its
        "gone" proves nothing (the credentials cannot see every project's images)."""
        if not self.api.configured or not agreed_ids:
            return
        probe = sorted(agreed_ids)[0]
        answer = self.api.image_state(probe)
        if answer.gone:
            self.api_distrusted = (
                f"Glance's API calls {probe}, which every node has, gone ({answer.detail}): "
                "its credentials may not see every project's images; not used as evidence")
            LOG.warning("reconcile: %s", self.api_distrusted)

    def evidence(self, image_id: str) -> tuple:
        """(evidence that the image is gone or None, what the API said)."""
        if image_id in self.tombstones:
            return "deleted on this node earlier", ""
        answer = self.api.image_state(image_id)
        if answer.gone and self.api_distrusted is None:
            return answer.detail, answer.detail
        return None, self.api_distrusted or answer.detail

    def handle(self, finding, prune: bool) -> None:
        """Remove (``prune``, on evidence), or copy to the peers; record it in ``finding``."""
        gone, said = self.evidence(finding.image_id)
        if gone and prune:
            self._remove(finding, gone)
        elif gone:
            finding.action = f"not copied: {gone}; --prune removes it"
        else:
            self._copy_to_peers(finding, said)

    def _remove(self, finding, gone: str) -> None:
        try:
            if self.trash is not None:
                removed = self.trash.put(finding.image_id, Cause(
                    event_type="reconcile --prune", source=self.nodes.this,
                    by=f"reconcile --prune ({gone})"))
            else:
                removed = self.store.remove(finding.image_id)
        except StoreError as exc:
            finding.action = f"not pruned: {exc}"
            return
        verb = "moved to the trash" if self.trash is not None else "removed"
        finding.action = f"{verb}: {gone}" if removed else "was already gone"
        finding.resolved = True
        LOG.info("image %s: reconcile removed it from %s (%s)", finding.image_id,
                 self.nodes.this, gone)

    def _copy_to_peers(self, finding, said: str) -> None:
        image_id = finding.image_id
        peers = self.nodes.peers()
        try:
            size, md5 = self.store.checksum(image_id)
        except StoreError as exc:
            finding.action = f"not copied: {exc}"
            return
        if size != finding.here.size:
            finding.action = "not copied: changed here during the check"
            return
        body = ImageEvent(Action.PRESENT, image_id, source=self.nodes.this, checksum=md5,
                          size=size, event_type=EVENT_TYPE).to_wire()
        try:
            results = self._publish([(topology.node_queue_name(peer), body) for peer in peers],
                                    peers)
        except (BrokerUnavailable, *brokers.ERRORS) as exc:
            finding.action = f"not copied: the broker: {brokers_reason(exc)}"
            return
        queued = [peer for peer in peers if results.get(topology.node_queue_name(peer),
                                                        "no answer") is None]
        failed = [f"{peer}: {results.get(topology.node_queue_name(peer), 'no answer')}"
                  for peer in peers if peer not in queued]
        why = f"no evidence that Glance deleted it ({said})" if said else \
            "no evidence that Glance deleted it"
        if queued:
            finding.action = (f"copied to the peers: queued for {', '.join(queued)} to fetch "
                              f"from {self.nodes.this} and verify (md5 {md5}); {why}")
        if failed:
            finding.action = (finding.action + "; " if queued else "not copied: ") + \
                "could not queue for " + "; ".join(failed)
        finding.resolved = not failed
        LOG.info("image %s: reconcile on %s: %s", image_id, self.nodes.this, finding.action)

    def _publish(self, messages, peers) -> dict:
        with self.connect(self.settings.broker) as connection:
            # As the fan-out does: a peer whose queue was never declared still
            # gets its copy (one that exists otherwise is used as it is).
            topology.declare_own_queues(connection, peers, self.settings.topology)
            return confirmed.publish_all(connection, messages)


def brokers_reason(exc) -> str:
    return str(exc) or type(exc).__name__
