"""The sync worker: this node's queue -> its image store.

Each event is validated again (anyone on the broker can write to a queue) and
applied by ``ImageSync`` on a transfer thread, in order per image and a few
images at a time; the connection thread keeps serving heartbeats and does the
acks.

Ack contract: an event is acked only when it has been applied (the image is in
place and verified, or gone), or when the broker confirmed its copy in the
place it moves to: a retry queue (the attempt failed; it comes back after the
delay), the node's failed queue (out of attempts), or the dead-letter queue
(malformed, or refused: a delete of an image Glance's API says is still
active, with the reason "image still active in Glance"). A transfer that is
stopped by a shutdown is not acked: the broker delivers the event again.

RabbitMQ closes a channel that holds a message unacked longer than its
``consumer_timeout``. Before that, an event whose transfer is still running is
put back in the node queue (confirmed) and the old delivery is acked; the copy
waits behind the running transfer and finds the image in place.
"""

from __future__ import annotations

import random
import time

from oslo_log import log as logging

from glance_image_sync import events
from glance_image_sync.broker import topology
from glance_image_sync.broker.consumer import QueueConsumer
from glance_image_sync.exceptions import Reconnect, Rejected
from glance_image_sync.metrics import Metrics
from glance_image_sync.sync.apply import Outcome

LOG = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-gis-attempt"
ERROR_HEADER = "x-gis-last-error"


def attempts_of(message) -> int:
    """How many attempts this event has had; 0 for a new one."""
    value = (message.headers or {}).get(ATTEMPT_HEADER, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def retry_delay(delays, attempts: int) -> int:
    """Seconds to wait after the ``attempts``-th failure; the last one repeats."""
    return delays[min(attempts, len(delays)) - 1]


class SyncWorker(QueueConsumer):
    name = "sync"

    def __init__(self, settings, image_sync, dispatcher, metrics=None, node_state=None,
                 records=None):
        super().__init__(settings)
        self.image_sync = image_sync
        self.dispatcher = dispatcher
        self.metrics = metrics or Metrics()
        self.node_state = node_state  # a NodeState, or None to keep no record
        self.records = records  # an ImageRecords, or None to keep none per image
        self.prefetch = max(16, 4 * settings.max_parallel)
        self.refresh_after = settings.broker.consumer_timeout / 2
        self.delays = sorted(set(settings.topology.retry_delays))
        self._held = {}
        self.last_success = None
        self.last_error = None
        self.failed_attempts = 0

    def declare(self, connection, channel):
        self.report(topology.declare_own_queues(connection, [self.nodes.this],
                                                self.settings.topology))
        return topology.node_queues(self.nodes.this, self.settings.topology)[0]

    def set_nodes(self, nodes) -> None:
        super().set_nodes(nodes)
        self.image_sync.nodes = nodes
        self.metrics.set_nodes(nodes)

    def connection_lost(self) -> None:
        super().connection_lost()
        self._held.clear()

    def on_delivery(self, delivery) -> None:
        try:
            event = events.from_wire(delivery.message.body, self.nodes)
        except Rejected as exc:
            self.metrics.received("rejected")
            self.dead_letter(delivery, f"event: {exc.reason}")
            return
        self.metrics.received(event.action.value)
        attempts = attempts_of(delivery.message)
        self._held[id(delivery)] = delivery
        self.dispatcher.submit(event.image_id,
                               lambda: self._apply(delivery, event, attempts))

    def _apply(self, delivery, event, attempts) -> None:
        """On a transfer thread."""
        try:
            outcome = self.image_sync.apply(event)
        except Exception as exc:  # noqa: BLE001 - reported as a failed attempt
            LOG.exception("image %s: unexpected error on %s", event.image_id, self.nodes.this)
            outcome = Outcome(False, f"unexpected error: {exc}")
        self.metrics.applied(outcome)
        self._record(event, outcome)
        self._record_image(event, outcome, attempts + 1)
        self.loop.call_soon(lambda: self._applied(delivery, event, attempts, outcome))

    def _record(self, event, outcome) -> None:
        """This node's last success or last error, for ``status`` (on the transfer thread,
        so the state file's fsync never delays the connection's)."""
        # A no-op (already in place, already gone) is no news for status, and
        # Glance sends image.update on every property change: recording each
        # would cost two fsyncs per event.
        if self.node_state is None or outcome.cancelled or (outcome.ok and not outcome.changed):
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

    def _record_image(self, event, outcome, attempt) -> None:
        """The image's own record, for ``show`` (on the transfer thread).

        Written when the store changed, when the attempt failed, and the first
        time an image already in place is seen (its md5 was just computed); a
        later no-op changes nothing worth a write.
        """
        if self.records is None or outcome.cancelled:
            return
        try:
            if outcome.ok and not outcome.changed and self.records.has(event.image_id):
                return
            verified = (self.image_sync.store.verification(event.image_id)
                        if outcome.ok and event.action is events.Action.PRESENT else None)
            self.records.write(event, outcome.ok, outcome.detail, attempt, verified)
        except OSError as exc:
            failure = exc
        else:
            return
        LOG.warning("cannot record image %s in %s: %s", event.image_id, self.records.path,
                    failure)

    def _applied(self, delivery, event, attempts, outcome) -> None:
        """Back on the connection thread."""
        self._held.pop(id(delivery), None)
        if outcome.cancelled:
            self.finish(delivery, ack=False)
            return
        if outcome.refused:
            self.last_error = (time.time(), event.image_id, outcome.detail)
            if delivery.refreshing or not self.current(delivery):
                self.finish(delivery, ack=False)  # as below: its copy, or a redelivery
            else:
                self.dead_letter(delivery, outcome.detail)
            return
        if outcome.ok:
            self.last_success = (time.time(), event.image_id, outcome.detail)
            self.finish(delivery)
            return
        self.last_error = (time.time(), event.image_id, outcome.detail)
        self.failed_attempts += 1
        if delivery.refreshing or not self.current(delivery):
            # Re-queued for consumer_timeout (the copy gets the next attempt,
            # and acks this delivery once the broker has it), or from a lost
            # connection (the broker delivers it again).
            self.finish(delivery, ack=False)
            return
        self._retry_or_park(delivery, event, attempts + 1, outcome.detail)

    def _retry_or_park(self, delivery, event, attempts, error) -> None:
        headers = {ATTEMPT_HEADER: attempts, ERROR_HEADER: error[:500]}
        if attempts >= self.settings.max_attempts:
            LOG.error("image %s: giving up on %s after %d attempts (%s); parked in %s",
                      event.image_id, self.nodes.this, attempts, error,
                      topology.failed_queue_name(self.nodes.this))
            self.forward(delivery, topology.failed_queue_name(self.nodes.this), headers,
                         "the failed queue")
            return
        delay = retry_delay(self.delays, attempts)
        # Jitter only shortens: a message must never outlive its queue's TTL.
        expiration_ms = int(delay * 1000 * random.uniform(0.8, 1.0))  # noqa: S311
        LOG.warning("image %s: attempt %d of %d failed on %s (%s); retrying in about %d s",
                    event.image_id, attempts, self.settings.max_attempts, self.nodes.this,
                    error, delay)
        self.forward(delivery, topology.retry_queue_name(self.nodes.this, delay), headers,
                     "a retry queue", expiration_ms=expiration_ms)

    # -- consumer_timeout ---------------------------------------------------

    def next_deadline(self):
        waiting = [d.received for d in self._held.values()
                   if not d.settled and not d.refreshing]
        return min(waiting) + self.refresh_after if waiting else None

    def on_timer(self) -> None:
        now = time.monotonic()
        for delivery in list(self._held.values()):
            if (delivery.settled or delivery.refreshing
                    or now - delivery.received < self.refresh_after):
                continue
            delivery.refreshing = True
            self._requeue_held(delivery)

    def _requeue_held(self, delivery) -> None:
        message = delivery.message
        generation = self.generation

        def done(ok, reason):
            if generation != self.generation:
                return
            if not ok:
                raise Reconnect(f"re-queueing a long transfer's event: {reason}")
            if not delivery.settled:  # its job may have finished meanwhile
                self.settle(delivery)

        LOG.info("%s: an event has waited %.0f s (consumer_timeout %d s); re-queued so "
                 "the broker keeps it", self.name, time.monotonic() - delivery.received,
                 self.settings.broker.consumer_timeout)
        self.publisher.publish(message.body, self.queue.name, on_done=done,
                               headers=dict(message.headers or {}),
                               content_type=message.content_type or "application/json")
