"""What the sync worker reports as it goes: metrics, and this node's state file.

The worker and ``ImageSync`` call three hooks and nothing else:
``received(action)`` when an event is read, ``applied(event, outcome)`` when an
attempt to apply it ends (on the transfer thread, so the fsync of the state
file never delays the connection thread; only installs, deletes and failures
are written there), and ``transfer(peer, size)`` around
each fetch. A hook never raises into its caller: a state file that cannot be
written is logged, and syncing goes on.
"""

from __future__ import annotations

from oslo_log import log as logging

from glance_image_sync.metrics import Metrics

LOG = logging.getLogger(__name__)


class Telemetry:
    def __init__(self, metrics: Metrics | None = None, node_state=None):
        self.metrics = metrics if metrics is not None else Metrics()
        self.node_state = node_state  # a nodestate.NodeState, or None to keep nothing

    def received(self, action: str) -> None:
        self.metrics.events_received.labels(action).inc()

    def applied(self, event, outcome) -> None:
        if outcome.cancelled:
            return  # a shutdown: the event is delivered again
        self.metrics.events_applied.labels("ok" if outcome.ok else "failed").inc()
        # A no-op (already in place, already gone) is no news for status, and
        # Glance sends image.update on every property change: recording each
        # would cost two fsyncs per event.
        if self.node_state is None or (outcome.ok and not outcome.changed):
            return
        record = self.node_state.record_success if outcome.ok else self.node_state.record_error
        try:
            record(event.image_id, outcome.detail)
        except OSError as exc:
            failure = exc
        else:
            return
        LOG.warning("cannot record the outcome for image %s in %s: %s", event.image_id,
                    self.node_state.state_dir, failure)

    def set_nodes(self, nodes) -> None:
        self.metrics.set_nodes(nodes)

    def transfer(self, peer: str, size: int):
        """A context manager around one fetch from ``peer``."""
        return self.metrics.transfer(peer, size)
