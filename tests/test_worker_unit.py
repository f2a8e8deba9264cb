"""The sync worker's decisions, without a broker: ack, retry, park, dead-letter,
and the re-queue of an event that outlives consumer_timeout."""

from types import SimpleNamespace

import pytest

from glance_image_sync.broker import topology
from glance_image_sync.events import Action, ImageEvent
from glance_image_sync.exceptions import Reconnect
from glance_image_sync.sync.apply import Outcome
from glance_image_sync.sync.worker import (
    ATTEMPT_HEADER,
    ERROR_HEADER,
    SyncWorker,
    attempts_of,
    retry_delay,
)
from tests import fakes
from tests.helpers import settings_for

IMAGE = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"
EVENT = ImageEvent(Action.PRESENT, IMAGE, "node2", "0" * 32, 1000, "image.upload")


class Inline:
    """A dispatcher that runs each job at once, on the caller's thread."""

    def submit(self, key, job):
        job()


class Applies:
    """ImageSync's stand-in: each apply() returns the next outcome given."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.nodes = None
        self.applied = []

    def apply(self, event):
        self.applied.append(event)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def worker_with(tmp_path, *outcomes, **options):
    settings = settings_for(tmp_path, retry_delays="10,60", max_attempts=3, **options)
    worker = SyncWorker(settings, Applies(*outcomes), Inline())
    parts = fakes.attach(worker, queue_name=topology.node_queue_name("node1"))
    return worker, parts


def deliver(worker, headers=None, tag=1, body=None):
    fakes.deliver(worker, fakes.message(body=body or EVENT.to_wire(), headers=headers,
                                        tag=tag))
    worker.loop.run_calls()  # the result handed back from the transfer thread


def test_attempts_are_read_from_the_header_and_anything_odd_counts_as_none():
    for headers, attempts in [(None, 0), ({}, 0), ({ATTEMPT_HEADER: 4}, 4),
                              ({ATTEMPT_HEADER: -1}, 0), ({ATTEMPT_HEADER: "3"}, 0),
                              ({ATTEMPT_HEADER: True}, 0)]:
        assert attempts_of(SimpleNamespace(headers=headers)) == attempts


def test_the_last_retry_delay_repeats():
    assert [retry_delay([10, 60, 300], n) for n in (1, 2, 3, 4, 9)] == [10, 60, 300, 300, 300]


def test_an_applied_event_is_acked_and_remembered_as_the_last_success(tmp_path):
    worker, parts = worker_with(tmp_path, Outcome(True, "installed from node2", changed=True))
    deliver(worker, tag=3)
    worker.flush()
    assert parts.channel.acks == [(3, True)]
    assert worker.last_success[1:] == (IMAGE, "installed from node2")
    assert worker.failed_attempts == 0


def test_a_failed_attempt_waits_in_the_retry_queue_of_its_delay_then_is_acked(tmp_path):
    worker, parts = worker_with(tmp_path, Outcome(False, "node2: Connection refused"))
    deliver(worker, tag=4)
    copy = parts.publisher.sent[0]
    assert copy.routing_key == topology.retry_queue_name("node1", 10)
    assert copy.headers == {ATTEMPT_HEADER: 1, ERROR_HEADER: "node2: Connection refused"}
    assert 8000 <= copy.expiration_ms <= 10000  # jitter only ever shortens the wait
    worker.flush()
    assert parts.channel.acks == []  # not before the broker has the copy
    parts.publisher.settle(0)
    worker.flush()
    assert parts.channel.acks == [(4, True)]
    assert worker.last_error[1:] == (IMAGE, "node2: Connection refused")
    assert worker.failed_attempts == 1


def test_the_second_failure_waits_longer(tmp_path):
    worker, parts = worker_with(tmp_path, Outcome(False, "timeout"))
    deliver(worker, headers={ATTEMPT_HEADER: 1})
    assert parts.publisher.sent[0].routing_key == topology.retry_queue_name("node1", 60)
    assert parts.publisher.sent[0].headers[ATTEMPT_HEADER] == 2


def test_out_of_attempts_the_event_is_parked_in_the_failed_queue(tmp_path):
    worker, parts = worker_with(tmp_path, Outcome(False, "md5 mismatch"))
    deliver(worker, headers={ATTEMPT_HEADER: 2}, tag=5)
    copy = parts.publisher.sent[0]
    assert copy.routing_key == topology.failed_queue_name("node1")
    assert copy.headers[ATTEMPT_HEADER] == 3 and copy.expiration_ms is None
    parts.publisher.settle(0)
    worker.flush()
    assert parts.channel.acks == [(5, True)]


def test_a_transfer_stopped_by_a_shutdown_is_left_for_a_redelivery(tmp_path):
    worker, parts = worker_with(tmp_path, Outcome(False, "cancelled", cancelled=True))
    deliver(worker)
    worker.flush()
    assert parts.channel.acks == [] and parts.publisher.sent == []
    assert worker.in_flight == 0 and worker.failed_attempts == 0


def test_an_unexpected_error_while_applying_is_a_failed_attempt(tmp_path):
    worker, parts = worker_with(tmp_path, ZeroDivisionError("oops"))
    deliver(worker)
    assert parts.publisher.sent[0].headers[ERROR_HEADER] == "unexpected error: oops"


def test_a_forged_event_is_dead_lettered_and_never_applied(tmp_path):
    worker, parts = worker_with(tmp_path)
    deliver(worker, body=b'{"version": 1, "action": "present", "image_id": "../../etc"}')
    assert parts.publisher.sent[0].routing_key == topology.DEAD_LETTER_QUEUE
    assert worker.image_sync.applied == [] and worker.rejected == 1


def test_an_event_that_outlives_consumer_timeout_is_requeued_then_its_delivery_acked(
        tmp_path, monkeypatch):
    worker, parts = worker_with(tmp_path, consumer_timeout=600)

    class Later:  # the transfer is still running: its result comes later
        def submit(self, key, job):
            self.job = job

    worker.dispatcher = Later()
    fakes.deliver(worker, fakes.message(body=EVENT.to_wire(), headers={ATTEMPT_HEADER: 1},
                                        tag=8))
    held = next(iter(worker._held.values()))
    assert worker.next_deadline() == pytest.approx(held.received + 300)
    worker.on_timer()
    assert parts.publisher.sent == []  # not due yet
    held.received -= 301
    worker.on_timer()
    copy = parts.publisher.sent[0]
    assert (copy.routing_key, copy.headers) == ("glance_image_sync.node1", {ATTEMPT_HEADER: 1})
    assert worker.next_deadline() is None  # nothing else waits
    parts.publisher.settle(0)
    worker.flush()
    assert parts.channel.acks == [(8, True)]
    # The transfer ends: it failed, but the copy in the queue gets the next attempt.
    worker.image_sync.outcomes.append(Outcome(False, "timeout"))
    worker.dispatcher.job()
    worker.loop.run_calls()
    worker.flush()
    assert parts.channel.acks == [(8, True)] and len(parts.publisher.sent) == 1


def test_a_requeue_the_broker_refuses_means_reconnecting(tmp_path):
    worker, parts = worker_with(tmp_path)
    worker.dispatcher = SimpleNamespace(submit=lambda key, job: None)
    fakes.deliver(worker, fakes.message(body=EVENT.to_wire()))
    next(iter(worker._held.values())).received -= 10_000
    worker.on_timer()
    with pytest.raises(Reconnect, match="re-queueing"):
        parts.publisher.settle(0, ok=False, reason="nack")


def test_a_lost_connection_forgets_what_it_held(tmp_path):
    worker, _ = worker_with(tmp_path)
    worker.dispatcher = SimpleNamespace(submit=lambda key, job: None)
    fakes.deliver(worker, fakes.message(body=EVENT.to_wire()))
    assert worker.next_deadline() is not None
    worker.connection_lost()
    assert worker.next_deadline() is None
