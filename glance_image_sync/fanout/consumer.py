"""The fan-out: Glance's notification queue -> one event per node queue.

Each notification is parsed once. An ensure-present or ensure-absent event is
published, as an ImageEvent, to the queue of every node in ``api_nodes``
(declared for all of them, so a node that is down still collects its events;
each name is remembered in ``state_dir``, ``knownnodes``).

Ack contract: a notification is acked only after the broker confirmed every
node's copy *and* routed it to that node's queue. If any copy is refused or
unroutable, the notification is not acked: the connection is reset, the
queues are declared again, and the broker delivers the notification anew (the
nodes that already got their copy get a duplicate, which they apply as a
no-op). An ignored notification is acked at once; a malformed or hostile one
once its copy in the dead-letter queue is confirmed.
"""

from __future__ import annotations

from oslo_log import log as logging

from glance_image_sync.broker import topology
from glance_image_sync.broker.consumer import QueueConsumer
from glance_image_sync.broker.loop import ConnectionLoop
from glance_image_sync.events import Ignored
from glance_image_sync.exceptions import Reconnect, Rejected
from glance_image_sync.fanout import notifications
from glance_image_sync.state import knownnodes

LOG = logging.getLogger(__name__)


class FanOut(QueueConsumer):
    name = "fan-out"
    # Deep enough that confirms of one batch overlap the next deliveries.
    prefetch = 256

    def declare(self, connection, channel):
        self.report(topology.declare_own_queues(connection, self.nodes.all,
                                                self.settings.topology))
        self._remember(self.nodes.all)
        queue, mismatches = topology.declare_notification_queue(connection,
                                                                self.settings.topology)
        self.report(mismatches)
        return queue

    def set_nodes(self, nodes) -> None:
        super().set_nodes(nodes)
        if self.channel is not None:  # a new node's queue collects events from now on
            self.report(topology.declare_own_queues(self.channel.connection, nodes.all,
                                                    self.settings.topology))
            self._remember(nodes.all)

    def _remember(self, names) -> None:
        """Every node queues were declared for: status finds them after a node is removed."""
        state_dir = self.settings.store.state_dir
        try:
            knownnodes.remember(state_dir, names)
        except OSError as exc:
            LOG.warning("fan-out: cannot record the nodes it declared queues for in %s: %s",
                        knownnodes.path_in(state_dir), exc.strerror)

    def on_delivery(self, delivery) -> None:
        try:
            result = notifications.parse(delivery.message.body, self.nodes)
        except Rejected as exc:
            self.dead_letter(delivery, f"notification: {exc.reason}")
            return
        if isinstance(result, Ignored):
            LOG.debug("fan-out: ignored %s", result.reason)
            self.finish(delivery)
            return
        # At debug: every node logs what it does with the event itself.
        LOG.debug("image %s: %s from %s; queued for %s", result.image_id, result.event_type,
                  result.source or "an unnamed publisher", ", ".join(self.nodes.all))
        self._publish_copies(delivery, result)

    def _publish_copies(self, delivery, event) -> None:
        body = event.to_wire()
        outstanding = set(self.nodes.all)
        failures = []
        generation = self.generation

        def copied(node, ok, reason):
            outstanding.discard(node)
            if not ok:
                failures.append(f"{node}: {reason}")
            if outstanding or generation != self.generation:
                return
            if failures:
                LOG.error("image %s: %s not queued for every node (%s); it will be "
                          "delivered again", event.image_id, event.event_type,
                          "; ".join(failures))
                raise Reconnect("; ".join(failures))
            self.finish(delivery)

        for node in self.nodes.all:
            self.publisher.publish(body, topology.node_queue_name(node),
                                   on_done=lambda ok, reason, node=node: copied(node, ok, reason))


def fanout_loop(settings, stop_event=None, once=False) -> ConnectionLoop:
    """The fan-out on a connection of its own (the daemon's thread, or a cron run)."""
    return ConnectionLoop("fan-out", FanOut(settings), settings.broker, stop_event, once)
