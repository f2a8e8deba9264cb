"""Node names, and the event format of the per-node queues."""

import datetime
import hashlib
import json

import pytest

from glance_image_sync import events
from glance_image_sync.events import Action, ImageEvent
from glance_image_sync.exceptions import Rejected
from glance_image_sync.nodes import Nodes, normalize_hostname, same_host
from glance_image_sync.settings import StoreSettings
from glance_image_sync.state.tombstones import Tombstones
from glance_image_sync.store.images import ImageStore
from glance_image_sync.sync.apply import ImageSync, relay_wait_left
from glance_image_sync.sync.sources import Source, sources

NODES = Nodes(["node1.example.com", "node2", "node3"], "node2.example.com")
IMAGE = "b90e9b0f-36ce-43c1-b08c-9b4201f6571f"


def test_host_names_are_matched_by_fqdn_and_by_short_name():
    assert NODES.this == "node2"
    assert NODES.resolve("node1") == "node1.example.com"
    assert NODES.resolve("NODE1.example.com.") == "node1.example.com"
    assert NODES.resolve("node1.elsewhere.org") is None
    assert NODES.resolve("node4") is None
    assert same_host("a.b.c", "a") and not same_host("a.b.c", "a.d.c")


@pytest.mark.parametrize("name", ["", "-x", "a b", "x;y", "a/../b", "ñode", "a" * 64, None, 3,
                                  "node1\x00", "-oProxyCommand=x",
                                  "\u212aube2", "nod\u04351", "node\uff11"])
def test_only_plain_host_names_pass(name):
    assert normalize_hostname(name) is None


def test_sources_put_the_publisher_first_and_never_this_node():
    assert NODES.sources_for("node3") == ("node3", "node1.example.com")
    assert NODES.sources_for(None) == ("node1.example.com", "node3")
    assert NODES.sources_for("node2") == ("node1.example.com", "node3")


@pytest.mark.parametrize("names, host, message", [
    ([], "node1", "api_nodes is empty"),
    (["node1", "node1.example.com"], "node1", "name the same node"),
    (["node1", "bad name"], "node1", "is not a host name"),
    (["node1", "node2"], "node9", "host 'node9' is not one of api_nodes"),
])
def test_bad_node_lists_are_refused_with_a_reason(names, host, message):
    with pytest.raises(ValueError, match=message):
        Nodes(names, host)


def test_events_round_trip_through_the_wire_format():
    for event in [
        ImageEvent(Action.PRESENT, IMAGE, source="node3",
                   checksum="9b8f6225e89197b8d67aafd6f91ce7bf",
                   size=4194304, event_type="image.upload", message_id="m", timestamp="t"),
        ImageEvent(Action.ABSENT, IMAGE, source=None, event_type="image.delete"),
    ]:
        assert events.from_wire(event.to_wire(), NODES) == event


def _wire(**changes):
    doc = json.loads(ImageEvent(Action.PRESENT, IMAGE, source="node3",
                                checksum="9b8f6225e89197b8d67aafd6f91ce7bf", size=1).to_wire())
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("body, reason", [
    (_wire(version=2), "unknown event version"),
    (_wire(action="chmod"), "unknown action"),
    (_wire(image_id="*"), "is not a UUID"),
    (_wire(source="node1;id"), "source 'node1;id' is not a host name"),
    (_wire(source="n\u043ede1"), "is not a host name"),
    (_wire(checksum=None), "not 32 hex digits"),
    (_wire(size=None), "not a non-negative integer"),
    (_wire(event_type="x" * 300), "not a short printable string"),
    (b"null", "not a JSON object"),
])
def test_forged_events_on_a_node_queue_are_rejected(body, reason):
    with pytest.raises(Rejected, match=reason):
        events.from_wire(body, NODES)


def test_an_event_whose_source_this_node_does_not_know_is_fetched_from_the_peers():
    # Put in this node's queue by a fan-out whose api_nodes already names node9.
    event = events.from_wire(_wire(source="node9.example.org"), NODES)
    assert event.source is None
    assert NODES.sources_for(event.source) == NODES.peers()


def test_an_image_event_cannot_be_built_invalid():
    with pytest.raises(Rejected):
        ImageEvent(Action.PRESENT, IMAGE, checksum=None, size=1)
    with pytest.raises(Rejected):
        ImageEvent(Action.ABSENT, "../x")


def test_the_relay_waits_for_the_node_before_only_while_the_event_is_fresh():
    sent = "2026-11-26 04:54:15.560352"
    at = datetime.datetime(2026, 11, 26, 4, 54, 15, 560352)
    assert relay_wait_left(sent, 10, now=at) == 10
    assert relay_wait_left(sent, 10, now=at + datetime.timedelta(seconds=3.5)) == 7
    assert relay_wait_left(sent, 10, now=at + datetime.timedelta(minutes=5)) == 0
    # A clock ahead of ours, or no time at all: never more than relay_wait.
    assert relay_wait_left(sent, 10, now=at - datetime.timedelta(minutes=5)) == 10
    assert relay_wait_left(None, 10) == 10
    assert relay_wait_left("yesterday", 10) == 10


def test_an_image_travels_the_chain_from_its_publisher_through_api_nodes_wrapped():
    names = ["node1", "node2", "node3", "node4"]
    assert Nodes(names, "node1").chain("node3") == ("node3", "node4", "node1", "node2")
    assert [Nodes(names, me).upstream("node3") for me in ("node4", "node1", "node2")] == \
        ["node3", "node4", "node1"]


def test_sources_stream_from_the_node_before_then_fall_back_to_the_publisher_and_peers():
    names = ["node1", "node2", "node3", "node4"]
    # node4 streams from node3, then copies from the publisher, then any installed copy.
    assert sources(Nodes(names, "node4"), "node2", relay=True) == (
        Source("node3", relay=True), Source("node2"), Source("node1"), Source("node3"))
    # The publisher's next node copies from it; without the relay everyone does.
    assert sources(Nodes(names, "node3"), "node2", relay=True) == (
        Source("node2"), Source("node1"), Source("node4"))
    assert sources(Nodes(names, "node4"), "node2", relay=False)[0] == Source("node2")
    # No known publisher: no chain; the publisher itself fetches from nobody first.
    assert sources(Nodes(names, "node4"), None, relay=True) == tuple(
        Source(node) for node in ("node1", "node2", "node3"))
    assert all(not source.relay for source in sources(Nodes(names, "node2"), "node2", True))


class RecordingPeers:
    """A transfer that records which node each image came from, and how."""

    def __init__(self, data):
        self.data = data
        self.calls = []

    def fetch(self, node, image_id, dest, size=0):
        self.calls.append(("fetch", node))
        self._copy(dest)

    def stream(self, node, image_id, dest, size, wait):
        self.calls.append(("stream", node, wait))
        self._copy(dest)

    def _copy(self, dest):
        with open(dest, "r+b") as out:
            out.write(self.data)


@pytest.mark.parametrize(("age", "first"), [
    (datetime.timedelta(seconds=2), ("stream", "node2", 8)),
    (datetime.timedelta(minutes=3), ("fetch", "node1")),  # a node catching up
])
def test_only_a_fresh_event_is_streamed_from_the_node_before(tmp_path, age, first):
    data = b"an image" * 1000
    nodes = Nodes(["node1", "node2", "node3"], "node3")
    store = ImageStore(StoreSettings(datadir=str(tmp_path), file_mode=None,
                                     state_dir=str(tmp_path / "state"), deleted_memory=3600))
    peers = RecordingPeers(data)
    sync = ImageSync(nodes, store, peers, Tombstones(str(tmp_path / "state"), 3600),
                     relay=True, relay_wait=10)
    sent = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - age
    try:
        outcome = sync.apply(ImageEvent(
            Action.PRESENT, IMAGE, source="node1", size=len(data),
            checksum=hashlib.md5(data).hexdigest(), event_type="image.upload",
            timestamp=sent.strftime("%Y-%m-%d %H:%M:%S.%f")))
    finally:
        store.close()
    assert outcome.ok, outcome
    assert peers.calls == [first]
