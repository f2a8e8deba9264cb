"""What the fan-out and the worker share, without a broker: acks, forwarding,
dead-lettering, and deliveries of a connection that is gone."""

import pytest

from glance_image_sync.broker import topology
from glance_image_sync.broker.consumer import (
    NODE_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    AckBatch,
    QueueConsumer,
)
from glance_image_sync.exceptions import Reconnect
from tests import fakes
from tests.helpers import settings_for


def test_consecutive_acks_go_as_one_multiple_ack():
    channel = fakes.Channel()
    acks = AckBatch(channel)
    for tag in (1, 2, 3):
        acks.delivered(tag)
    for tag in (2, 1, 3):
        acks.ack(tag)
    acks.flush()
    assert channel.acks == [(3, True)]


def test_a_tag_finished_ahead_of_a_long_one_is_acked_alone_and_never_waits():
    channel = fakes.Channel()
    acks = AckBatch(channel)
    for tag in (1, 2, 3, 4):
        acks.delivered(tag)
    acks.ack(3)
    acks.ack(4)
    acks.flush()
    assert channel.acks == [(3, False), (4, False)]  # 1 and 2 still run
    acks.ack(1)
    acks.flush()
    assert channel.acks[-1] == (1, True)
    acks.ack(2)
    acks.flush()
    assert channel.acks[-1] == (2, True)


def test_a_turn_with_nothing_finished_sends_nothing():
    channel = fakes.Channel()
    acks = AckBatch(channel)
    acks.delivered(1)
    acks.flush()
    assert channel.acks == []


class Recording(QueueConsumer):
    name = "test"

    def __init__(self, settings, behaviour):
        super().__init__(settings)
        self.behaviour = behaviour
        self.seen = []

    def on_delivery(self, delivery):
        self.seen.append(delivery)
        self.behaviour(self, delivery)


@pytest.fixture
def settings(tmp_path):
    return settings_for(tmp_path)


def test_a_delivery_is_handled_after_the_dispatch_and_acked_at_the_end_of_the_turn(settings):
    consumer = Recording(settings, lambda self, d: self.finish(d))
    parts = fakes.attach(consumer)
    consumer._on_message(fakes.message(tag=7))
    assert consumer.seen == [] and consumer.in_flight == 1  # not inside the dispatch
    parts.loop.run_calls()
    assert parts.channel.acks == []  # decided, sent with the turn's other acks
    consumer.flush()
    assert parts.channel.acks == [(7, True)]
    assert (consumer.in_flight, consumer.handled) == (0, 1)


def test_a_delivery_of_a_lost_connection_is_never_acked(settings):
    consumer = Recording(settings, lambda self, d: None)
    parts = fakes.attach(consumer)
    consumer._on_message(fakes.message(tag=1))
    parts.loop.run_calls()
    delivery = consumer.seen[0]
    consumer.connection_lost()
    fakes.attach(consumer)  # a new connection: the broker delivers it again
    assert not consumer.current(delivery)
    consumer.finish(delivery)
    consumer.flush()
    assert consumer.channel.acks == [] and consumer.handled == 0


def test_a_forwarded_message_is_acked_only_once_its_copy_is_confirmed(settings):
    consumer = Recording(settings, lambda self, d: self.forward(
        d, "elsewhere", {"x-h": 1}, "another queue", expiration_ms=500))
    parts = fakes.attach(consumer)
    fakes.deliver(consumer, fakes.message(body=b'{"a": 1}', tag=3))
    copy = parts.publisher.sent[0]
    assert (copy.body, copy.routing_key, copy.headers, copy.expiration_ms) == \
        (b'{"a": 1}', "elsewhere", {"x-h": 1}, 500)
    consumer.flush()
    assert parts.channel.acks == []
    parts.publisher.settle(0)
    consumer.flush()
    assert parts.channel.acks == [(3, True)]


def test_a_copy_the_broker_refused_means_reconnecting_and_the_original_stays(settings):
    consumer = Recording(settings, lambda self, d: self.forward(d, "gone", {}, "a queue"))
    parts = fakes.attach(consumer)
    fakes.deliver(consumer, fakes.message(tag=4))
    with pytest.raises(Reconnect, match="a queue: unroutable"):
        parts.publisher.settle(0, ok=False, reason="unroutable")
    consumer.flush()
    assert parts.channel.acks == []


def test_a_confirm_that_comes_after_a_reconnect_changes_nothing(settings):
    consumer = Recording(settings, lambda self, d: self.forward(d, "q", {}, "a queue"))
    parts = fakes.attach(consumer)
    fakes.deliver(consumer, fakes.message(tag=5))
    consumer.connection_lost()
    fakes.attach(consumer)
    parts.publisher.settle(0, ok=False, reason="nack")  # no Reconnect for an old generation
    parts.publisher.sent[0].on_done(True, "")
    consumer.flush()
    assert consumer.channel.acks == []


def test_a_dead_letter_keeps_the_body_and_says_why_where_and_on_which_node(settings):
    consumer = Recording(settings, lambda self, d: self.dead_letter(d, "bad " * 400))
    parts = fakes.attach(consumer, queue_name="glance_notifications.info")
    fakes.deliver(consumer, fakes.message(body=b"\xff not json", tag=6))
    copy = parts.publisher.sent[0]
    assert copy.routing_key == topology.DEAD_LETTER_QUEUE
    assert copy.body == b"\xff not json"
    assert copy.headers[REASON_HEADER] == ("bad " * 400)[:1000]
    assert copy.headers[QUEUE_HEADER] == "glance_notifications.info"
    assert copy.headers[NODE_HEADER] == "node1"
    assert consumer.rejected == 1
    parts.publisher.settle(0)
    consumer.flush()
    assert parts.channel.acks == [(6, True)]


def test_a_bug_met_by_one_message_dead_letters_it_and_the_next_goes_on(settings):
    def behaviour(self, delivery):
        if delivery.message.body == b"boom":
            raise KeyError("surprise")
        self.finish(delivery)

    consumer = Recording(settings, behaviour)
    parts = fakes.attach(consumer)
    fakes.deliver(consumer, fakes.message(body=b"boom", tag=1))
    fakes.deliver(consumer, fakes.message(body=b"fine", tag=2))
    assert "internal error: KeyError" in parts.publisher.sent[0].headers[REASON_HEADER]
    parts.publisher.settle(0)
    consumer.flush()
    assert parts.channel.acks == [(2, True)]


def test_broker_errors_and_reconnect_are_not_taken_for_bugs(settings):
    def behaviour(self, delivery):
        raise Reconnect("queue deleted")

    consumer = Recording(settings, behaviour)
    fakes.attach(consumer)
    consumer._on_message(fakes.message(tag=1))
    with pytest.raises(Reconnect):
        consumer.loop.run_calls()


def test_settling_twice_acks_once(settings):
    consumer = Recording(settings, lambda self, d: (self.settle(d), self.finish(d)))
    parts = fakes.attach(consumer)
    fakes.deliver(consumer, fakes.message(tag=9))
    consumer.flush()
    assert parts.channel.acks == [(9, True)]
