"""Confirmed publishing: which confirm settles which publish, and the real broker."""

import collections

import kombu
import pytest

from glance_image_sync.broker.publisher import Confirmations, ConfirmingPublisher


def _recorder():
    outcomes = []
    return outcomes, lambda name: (lambda ok, why: outcomes.append((name, ok, why)))


def _run(settled):
    for on_done, ok, reason in settled:
        on_done(ok, reason)


def test_publishes_are_numbered_from_one_in_the_order_they_were_sent():
    confirmations = Confirmations()
    assert [confirmations.published("", f"q{n}", None) for n in range(3)] == [1, 2, 3]
    assert len(confirmations) == 3


def test_a_multiple_ack_settles_every_publish_up_to_its_tag_and_no_further():
    outcomes, done = _recorder()
    confirmations = Confirmations()
    for name in "abcd":
        confirmations.published("", name, done(name))
    _run(confirmations.settle(3, multiple=True, nacked=False))
    assert outcomes == [("a", True, ""), ("b", True, ""), ("c", True, "")]
    assert len(confirmations) == 1


def test_a_single_ack_settles_only_its_own_publish_even_out_of_order():
    outcomes, done = _recorder()
    confirmations = Confirmations()
    for name in "ab":
        confirmations.published("", name, done(name))
    _run(confirmations.settle(2, multiple=False, nacked=False))
    _run(confirmations.settle(2, multiple=False, nacked=False))  # a duplicate: nothing
    assert outcomes == [("b", True, "")]
    _run(confirmations.settle(1, multiple=False, nacked=False))
    assert outcomes == [("b", True, ""), ("a", True, "")]


def test_a_nack_fails_what_it_settles_with_the_reason():
    outcomes, done = _recorder()
    confirmations = Confirmations()
    confirmations.published("", "a", done("a"))
    confirmations.published("", "b", done("b"))
    _run(confirmations.settle(2, multiple=True, nacked=True))
    assert [(name, ok) for name, ok, _ in outcomes] == [("a", False), ("b", False)]
    assert all("nack" in why for _, _, why in outcomes)


def test_a_return_fails_the_oldest_unsettled_publish_to_that_destination_only():
    outcomes, done = _recorder()
    confirmations = Confirmations()
    confirmations.published("", "q1", done("first q1"))
    confirmations.published("", "q2", done("q2"))
    confirmations.published("", "q1", done("second q1"))
    confirmations.published("x", "q1", done("q1 on exchange x"))
    confirmations.returned("", "q1", "unroutable: no queue q1")
    _run(confirmations.settle(4, multiple=True, nacked=False))
    assert outcomes == [("first q1", False, "unroutable: no queue q1"), ("q2", True, ""),
                        ("second q1", True, ""), ("q1 on exchange x", True, "")]


def test_a_second_return_to_one_destination_fails_the_next_publish_there():
    outcomes, done = _recorder()
    confirmations = Confirmations()
    for name in ("one", "two", "three"):
        confirmations.published("", "q", done(name))
    confirmations.returned("", "q", "gone")
    confirmations.returned("", "q", "gone")
    _run(confirmations.settle(3, multiple=True, nacked=False))
    assert [(name, ok) for name, ok, _ in outcomes] == [("one", False), ("two", False),
                                                        ("three", True)]


def test_a_confirm_of_nothing_pending_settles_nothing():
    confirmations = Confirmations()
    assert confirmations.settle(7, multiple=True, nacked=False) == []
    confirmations.returned("", "q", "nobody published there")
    assert len(confirmations) == 0


@pytest.mark.broker
def test_confirmed_publishes_arrive_intact_and_are_settled_after_the_dispatch(vhost):
    body = bytes(range(256)) * 1024  # 256 KiB: more than one frame at any frame_max
    headers = {"x-gis-reason": "a reason", "x-gis-attempt": 2}
    outcomes = {}
    deferred = collections.deque()
    with kombu.Connection(f"amqp://guest:guest@127.0.0.1:5672/{vhost}") as connection:
        channel = connection.channel()
        channel.queue_declare("q", durable=True, auto_delete=False)
        publisher = ConfirmingPublisher(connection, defer=deferred.append)
        publisher.publish(body, "q", on_done=lambda ok, why: outcomes.update(q=(ok, why)),
                          headers=headers, expiration_ms=60000)
        publisher.publish(b"{}", "no-such-queue",
                          on_done=lambda ok, why: outcomes.update(none=(ok, why)))
        while publisher.pending:
            connection.drain_events(timeout=10)
            assert not outcomes, "an outcome was reported inside py-amqp's dispatch"
        while deferred:
            deferred.popleft()()
        message = channel.basic_get("q", no_ack=True)

    # Confirms may come out of order: the broker confirms the unroutable
    # copy at once, the persistent one once it is on disk.
    assert outcomes["q"] == (True, "")
    assert outcomes["none"][0] is False and "unroutable" in outcomes["none"][1]
    assert message.body == body
    assert message.headers == headers
    assert message.properties["delivery_mode"] == 2
    assert message.properties["expiration"] == "60000"


class _Channel:
    """py-amqp's channel as the publisher uses it: confirm mode, hooks, basic_publish."""

    def __init__(self):
        self.events = collections.defaultdict(set)
        self.published = []

    def confirm_select(self):
        pass

    def basic_publish(self, message, exchange, routing_key, mandatory):
        self.published.append((routing_key, message.body))


def _publisher(blocked):
    channel = _Channel()
    deferred = []
    connection = type("Connection", (), {"channel": lambda self: channel})()
    publisher = ConfirmingPublisher(connection, defer=deferred.append,
                                    blocked=lambda: blocked[0])
    return publisher, channel, deferred


def test_while_the_broker_blocks_publishes_are_held_in_order_then_sent_on_resume():
    blocked = [False]
    publisher, channel, _ = _publisher(blocked)
    publisher.publish(b"1", "q", on_done=lambda ok, why: None)
    blocked[0] = True
    for body in (b"2", b"3"):
        publisher.publish(body, "q", on_done=lambda ok, why: None)
    assert [body for _, body in channel.published] == [b"1"]
    assert publisher.pending == 3  # one unconfirmed, two held: not drained
    publisher.resume()  # still blocked: nothing goes
    assert len(channel.published) == 1
    blocked[0] = False
    publisher.resume()
    assert [body for _, body in channel.published] == [b"1", b"2", b"3"]
    publisher.publish(b"4", "q", on_done=lambda ok, why: None)
    publisher.discard()  # nothing held: nothing to forget
    assert len(channel.published) == 4


def test_unconfirmed_bytes_are_bounded_and_a_confirm_sends_on_after_the_dispatch():
    from glance_image_sync.broker.publisher import MAX_UNCONFIRMED_BYTES

    publisher, channel, deferred = _publisher([False])
    big = b"x" * (MAX_UNCONFIRMED_BYTES // 2)
    for _ in range(4):
        publisher.publish(big, "q", on_done=lambda ok, why: None)
    assert len(channel.published) == 2 and publisher.pending == 4
    publisher._on_ack(1, False)  # py-amqp's hook, inside its dispatch: sends nothing
    assert len(channel.published) == 2
    for fn in deferred:  # once the dispatch returned
        fn()
    assert len(channel.published) == 3
    publisher.discard()  # the connection is gone: the held one is forgotten
    assert publisher.pending == 2


def test_one_message_beyond_the_window_still_goes_when_nothing_else_is_in_flight():
    from glance_image_sync.broker.publisher import MAX_UNCONFIRMED_BYTES

    publisher, channel, _ = _publisher([False])
    publisher.publish(b"y" * (2 * MAX_UNCONFIRMED_BYTES), "q", on_done=lambda ok, why: None)
    assert len(channel.published) == 1
