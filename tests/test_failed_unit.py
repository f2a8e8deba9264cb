"""Replaying failed events, with a stand-in channel whose confirms arrive while
the next basic_get waits (as py-amqp dispatches them)."""

import collections
from types import SimpleNamespace

from glance_image_sync.admin import failed
from glance_image_sync.broker import topology
from glance_image_sync.events import Action, ImageEvent
from glance_image_sync.nodes import Nodes

IMAGE = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"
NODES = Nodes(["node1", "node2"], "node1")


class Channel:
    """One channel stands in for both: the failed queue's and the publisher's."""

    def __init__(self, queue):
        self.queue = collections.deque(queue)
        self.events = collections.defaultdict(set)
        self.published, self.acked, self.unconfirmed = [], [], 0

    def confirm_select(self):
        pass

    def basic_get(self, queue, no_ack=False):
        # The broker's confirms of everything published so far come in while
        # py-amqp waits for this get's answer: its hooks run here.
        if self.unconfirmed:
            for callback in list(self.events["basic_ack"]):
                callback(len(self.published), True)
            self.unconfirmed = 0
        return self.queue.popleft() if self.queue else None

    def basic_publish(self, message, exchange, routing_key, mandatory):
        self.published.append(routing_key)
        self.unconfirmed += 1

    def basic_ack(self, tag):
        self.acked.append(tag)

    def close(self):
        pass


def test_confirms_that_came_during_the_gets_still_move_their_events():
    body = ImageEvent(Action.PRESENT, IMAGE, "node2", "0" * 32, 10).to_wire()
    messages = [SimpleNamespace(body=body, headers={}, delivery_tag=tag,
                                content_type="application/json", content_encoding=None)
                for tag in (1, 2, 3)]
    channel = Channel(messages)
    connection = SimpleNamespace(channel=lambda: channel,
                                 drain_events=lambda timeout: None)
    queue = topology.failed_queue_name("node1")
    result = failed.move(connection, queue, NODES, lambda item: True,
                         lambda m: failed.replay_target(m, queue, "node1", NODES, None))
    assert (result.moved, result.refused, result.error) == (3, [], None)
    assert channel.published == [topology.node_queue_name("node1")] * 3
    assert channel.acked == [1, 2, 3]
