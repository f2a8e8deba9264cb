"""Prometheus metrics of one glance-image-sync process, and how they leave it.

The metrics live in a registry of the process's own (never prometheus_client's
global one, so tests and tools can build several). What the sync worker counts
as it goes:

``glance_image_sync_events_received_total{action}``
    events read from this node's queue: ``present``, ``absent``, ``rejected``;
``glance_image_sync_events_applied_total{result}``
    attempts to apply one: ``ok`` or ``failed`` (a failed one is retried);
``glance_image_sync_transfers_total{peer,result}``
    copies fetched from a peer (rsync, then size and md5 verified);
``glance_image_sync_transferred_bytes_total{peer}``
    bytes of the copies that were installed;
``glance_image_sync_transfer_seconds``
    histogram of the time each installed copy took;
``..._deletes_total{result}``, ``..._trash_purged_total{reason}``, ``..._deletes_last_minute``,
``..._delete_burst``
    deletes ``applied``, ``refused`` or ``unconfirmed``; purges ``expired`` or
    for ``space``; deletes in the last 60 s, and 1 while more than the threshold.

What is read when the metrics are collected (a scrape, or a textfile write):

``glance_image_sync_queue_messages{queue}``, ``glance_image_sync_queue_consumers{queue}``
    every queue of the cluster (passive declarations; see ``queuestats``);
    a queue that does not exist has no sample;
``glance_image_sync_broker_up``
    1 if the broker answered, else 0;
``glance_image_sync_last_success_timestamp_seconds{node}``,
``glance_image_sync_last_error_timestamp_seconds{node}``
    from this node's state file, so a cron run that applied nothing still
    reports when the last one did; no sample before the first. ``node`` is
    this node's name in api_nodes, as in its queue's name, so an alert can
    join the two (etc/prometheus/glance-image-sync-rules.yml);
``..._trash_images``, ``..._trash_bytes``, ``..._restores_total``
    the trash now; images put back from it (by ``restore`` or ``reconcile``,
    processes of their own: counted from their log, ``state.restores``).

How they leave the process (HTTP, a node_exporter textfile): ``metrics.export``.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from contextlib import contextmanager

from oslo_log import log as logging
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from glance_image_sync.broker import queues as queuestats
from glance_image_sync.exceptions import (
    BrokerRefused,
    BrokerUnavailable,
    NodeStateError,
    StoreError,
    TransferCancelled,
)
from glance_image_sync.settings import DeleteSettings
from glance_image_sync.state import nodestate, restores

LOG = logging.getLogger(__name__)

PREFIX = "glance_image_sync"
# From a small image on a LAN to a large one over a bandwidth limit.
TRANSFER_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)


class DeleteRate:
    """Deletes within the last minute, and whether that is more than ``threshold``."""

    WINDOW = 60.0

    def __init__(self, threshold: int, clock=time.monotonic):
        self.threshold = threshold
        self.clock = clock
        self._times = collections.deque()
        self._lock = threading.RLock()  # count() runs on the scrape's thread too

    def add(self) -> int | None:
        """Count one delete; the count when it starts a burst (crosses the threshold)."""
        with self._lock:
            self._times.append(self.clock())
            count = self.count()
        return count if count == self.threshold + 1 else None

    def count(self) -> int:
        with self._lock:
            cutoff = self.clock() - self.WINDOW
            while self._times and self._times[0] <= cutoff:
                self._times.popleft()
            return len(self._times)

    def burst(self) -> int:
        return int(self.count() > self.threshold)  # a gauge: 1 or 0


class Metrics:
    """The metrics of one process; ``settings`` None counts only (no broker, no state file).

    The sync worker's hooks: ``received(action)`` when it reads an event,
    ``applied(outcome)`` when an attempt to apply one ends, ``transfer(peer,
    size)`` around each fetch, ``deleted(result)`` and ``purged(reason)``.
    """

    def __init__(self, settings=None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.events_received = Counter(
            f"{PREFIX}_events_received", "Events read from this node's queue, by action.",
            ["action"], registry=self.registry)
        self.events_applied = Counter(
            f"{PREFIX}_events_applied", "Attempts to apply an event, by result.",
            ["result"], registry=self.registry)
        self.transfers = Counter(
            f"{PREFIX}_transfers", "Copies fetched from a peer and verified (ok) or not (failed).",
            ["peer", "result"], registry=self.registry)
        self.transferred_bytes = Counter(
            f"{PREFIX}_transferred_bytes", "Bytes of the copies installed, by peer.",
            ["peer"], registry=self.registry)
        self.transfer_seconds = Histogram(
            f"{PREFIX}_transfer_seconds", "Seconds each installed copy took to fetch and verify.",
            buckets=TRANSFER_BUCKETS, registry=self.registry)
        self.deletes = Counter(
            f"{PREFIX}_deletes", "Deletes: applied (moved to the trash, or removed), refused "
            "(still active in Glance), unconfirmed (Glance's API could not tell; retried).",
            ["result"], registry=self.registry)
        self.trash_purged = Counter(
            f"{PREFIX}_trash_purged", "Images purged from the trash, by reason (expired, space).",
            ["reason"], registry=self.registry)
        deletes = settings.deletes if settings is not None else DeleteSettings()
        self.delete_rate = DeleteRate(deletes.alarm_threshold)
        Gauge(f"{PREFIX}_deletes_last_minute", "Deletes applied or refused in the last 60 s.",
              registry=self.registry).set_function(self.delete_rate.count)
        Gauge(f"{PREFIX}_delete_burst", "1 while more deletes than delete_alarm_threshold "
              "were applied or refused in the last 60 s, else 0.",
              registry=self.registry).set_function(self.delete_rate.burst)
        for counter, labels in ((self.events_received, ("present", "absent", "rejected")),
                                (self.events_applied, ("ok", "failed", "refused")),
                                (self.deletes, ("applied", "refused", "unconfirmed")),
                                (self.trash_purged, ("expired", "space"))):
            for label in labels:  # every series from the start, at 0
                counter.labels(label)
        self._broker = None
        if settings is not None:
            self._broker = _BrokerCollector(settings)
            self.registry.register(self._broker)
            self.registry.register(_NodeStateCollector(settings.nodes.this,
                                                       settings.store.state_dir))

    def received(self, action: str) -> None:
        self.events_received.labels(action).inc()

    def applied(self, outcome) -> None:
        if outcome.cancelled:  # a shutdown: the event is delivered again
            return
        result = "refused" if outcome.refused else "ok" if outcome.ok else "failed"
        self.events_applied.labels(result).inc()

    def deleted(self, result: str) -> int | None:
        """Count a delete by result; the count of the last minute when a burst starts."""
        self.deletes.labels(result).inc()
        return self.delete_rate.add() if result in ("applied", "refused") else None

    def purged(self, reason: str) -> None:
        self.trash_purged.labels(reason).inc()

    def watch_trash(self, trash) -> None:
        """Report what ``trash`` (a ``store.trash.Trash``) holds at each collection."""
        state_dir = self._broker.settings.store.state_dir if self._broker else None
        self.registry.register(_TrashCollector(trash, state_dir))

    def set_nodes(self, nodes) -> None:
        """Report the queues of ``nodes`` from the next collection on (SIGHUP)."""
        if self._broker is not None:
            # One assignment: a scrape on the HTTP thread sees the old or the new.
            self._broker.settings = dataclasses.replace(self._broker.settings, nodes=nodes)

    @contextmanager
    def transfer(self, peer: str, size: int):
        """Count the fetch in the ``with`` body: ok if it returns, failed if it raises."""
        started = time.monotonic()
        try:
            yield
        except TransferCancelled:
            raise  # a shutdown, not a failure of the peer
        except BaseException:
            self.transfers.labels(peer, "failed").inc()
            raise
        self.transfers.labels(peer, "ok").inc()
        self.transferred_bytes.labels(peer).inc(size)
        self.transfer_seconds.observe(time.monotonic() - started)


class _BrokerCollector:
    """Queue depths and consumers, read from the broker at collection time."""

    def __init__(self, settings):
        self.settings = settings

    def describe(self):
        return []  # values depend on the broker: no fixed description at registration

    def collect(self):
        up = GaugeMetricFamily(f"{PREFIX}_broker_up", "1 if the broker answered, else 0.")
        messages = GaugeMetricFamily(f"{PREFIX}_queue_messages",
                                     "Messages ready in each queue of the cluster.",
                                     labels=["queue"])
        consumers = GaugeMetricFamily(f"{PREFIX}_queue_consumers",
                                      "Consumers of each queue of the cluster.",
                                      labels=["queue"])
        try:
            overview = queuestats.overview(self.settings)
        except (BrokerUnavailable, BrokerRefused) as exc:  # broker_up 0 says it
            failure = exc
        else:
            failure = None
            for queue in overview.all_queues():
                if queue.exists:
                    messages.add_metric([queue.name], queue.messages)
                    consumers.add_metric([queue.name], queue.consumers)
        if failure is not None:
            # broker_up says it at every scrape; the consumers already log the outage.
            LOG.debug("metrics: no queue depths: %s", failure)
        up.add_metric([], 0 if failure else 1)
        yield from (up, messages, consumers)


class _NodeStateCollector:
    """This node's last success and last error, from its state file."""

    def __init__(self, node, state_dir):
        self.node = node
        self.state_dir = state_dir

    def describe(self):
        return []

    def collect(self):
        success = GaugeMetricFamily(f"{PREFIX}_last_success_timestamp_seconds",
                                    "When this node last applied an event (Unix time).",
                                    labels=["node"])
        error = GaugeMetricFamily(f"{PREFIX}_last_error_timestamp_seconds",
                                  "When an event last failed on this node (Unix time).",
                                  labels=["node"])
        try:
            snapshot = nodestate.load(self.state_dir)
        except NodeStateError as exc:
            failure = exc
        else:
            failure = None
            if snapshot.last_success:
                success.add_metric([self.node], snapshot.last_success.time)
            if snapshot.last_error:
                error.add_metric([self.node], snapshot.last_error.time)
        if failure is not None:
            LOG.warning("metrics: %s", failure)
        yield from (success, error)


class _TrashCollector:
    """What the trash holds, and the restores logged in ``state_dir`` (if given)."""

    def __init__(self, trash, state_dir):
        self.trash = trash
        self.state_dir = state_dir

    def describe(self):
        return []

    def collect(self):
        images = GaugeMetricFamily(f"{PREFIX}_trash_images", "Images in the store's trash.")
        size = GaugeMetricFamily(f"{PREFIX}_trash_bytes", "Bytes of the images in the trash.")
        restored = CounterMetricFamily(f"{PREFIX}_restores", "Images put back from the trash "
                                       "on this node (restore, reconcile).")
        try:
            count, total = self.trash.stats()
            if self.state_dir is not None:
                restored.add_metric([], restores.count(self.state_dir))
        except (OSError, StoreError) as exc:
            LOG.warning("metrics: cannot read the trash or the restores: %s", exc)
            return
        images.add_metric([], count)
        size.add_metric([], total)
        yield from (images, size, restored)


# The ways out (HTTP, a textfile), in a module of their own.
from glance_image_sync.metrics.export import Exporter, serve_http  # noqa: E402

__all__ = ["PREFIX", "DeleteRate", "Exporter", "Metrics", "serve_http"]
