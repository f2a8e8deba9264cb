"""Random event sequences against a model of what the store must end up as.

An image must end up present exactly when it was uploaded and never deleted,
whatever the order its events arrive in, however often each is redelivered.
Generated sequences mix uploads, activations, property updates and deletes,
duplicate some and shuffle everything (redeliveries and reorderings).
"""

import hashlib
import itertools
import os
import uuid

import kombu
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glance_image_sync import events
from glance_image_sync.broker import topology
from glance_image_sync.events import Action, ImageEvent
from glance_image_sync.exceptions import TransferFailed
from glance_image_sync.nodes import Nodes
from glance_image_sync.settings import StoreSettings, TopologySettings
from glance_image_sync.state.tombstones import Tombstones
from glance_image_sync.store.images import ImageStore
from glance_image_sync.sync.apply import ImageSync

IMAGES = 4
# As the cluster's nodes declare them (tools/localcluster.py: retry_delays = 1,2).
TOPOLOGY = TopologySettings(exchange="glance", topic="glance_notifications", durable=False,
                            quorum=False, retry_delays=(1, 2))
PRESENT_TYPES = ["image.upload", "image.activate", "image.update"]


@st.composite
def histories(draw):
    """(per-image fate, deliveries): a base history, duplicated and shuffled."""
    fates = draw(st.lists(st.sampled_from(["untouched", "uploaded", "deleted", "delete-only"]),
                          min_size=IMAGES, max_size=IMAGES))
    base = []
    for index, fate in enumerate(fates):
        if fate in ("uploaded", "deleted"):
            base += [(index, event_type) for event_type in
                     draw(st.lists(st.sampled_from(PRESENT_TYPES), min_size=1, max_size=3))]
        if fate in ("deleted", "delete-only"):
            base.append((index, "image.delete"))
    duplicates = draw(st.lists(st.sampled_from(base), max_size=6)) if base else []
    deliveries = draw(st.permutations(base + duplicates))
    return fates, deliveries


def expected_present(fates):
    return {index for index, fate in enumerate(fates) if fate == "uploaded"}


def event_for(image, event_type):
    image_id, md5, size = image
    if event_type == "image.delete":
        return ImageEvent(Action.ABSENT, image_id, source="node1", event_type=event_type)
    return ImageEvent(Action.PRESENT, image_id, source="node1", checksum=md5, size=size,
                      event_type=event_type)


class LocalPeer:
    """A transfer that copies from a directory standing for node1's store."""

    def __init__(self, path):
        self.path = path
        self.fetches = 0

    def fetch(self, node, image_id, dest, size=0):
        self.fetches += 1
        source = os.path.join(self.path, image_id)
        if not os.path.exists(source):
            raise TransferFailed(f"no {image_id} on {node}")
        with open(source, "rb") as src, open(dest, "r+b") as out:
            out.write(src.read())
        os.chmod(dest, 0o640)
        return None


_counter = itertools.count()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_any_order_of_events_and_redeliveries_ends_as_the_model(tmp_path_factory, history):
    fates, deliveries = history
    root = tmp_path_factory.mktemp(f"model{next(_counter)}")
    peer, datadir, state = root / "peer", root / "images", root / "state"
    for path in (peer, datadir, state):
        path.mkdir()
    images = []
    for index in range(IMAGES):
        data = f"image {index} ".encode() * (100 + index)
        image_id = str(uuid.uuid4())
        (peer / image_id).write_bytes(data)
        images.append((image_id, hashlib.md5(data).hexdigest(), len(data)))
    nodes = Nodes(["node1", "node2"], "node2")
    store = ImageStore(StoreSettings(datadir=str(datadir), file_mode=None,
                                     state_dir=str(state), deleted_memory=3600))
    sync = ImageSync(nodes, store, LocalPeer(str(peer)), Tombstones(str(state), 3600))
    try:
        for index, event_type in deliveries:
            wire = event_for(images[index], event_type).to_wire()
            outcome = sync.apply(events.from_wire(wire, nodes))
            assert outcome.ok, outcome
        present = {index for index, (image_id, md5, _) in enumerate(images)
                   if store.verify(image_id, images[index][2], md5)}
        assert present == expected_present(fates)
        assert sorted(os.listdir(datadir)) == sorted(images[i][0] for i in present)
    finally:
        store.close()


@pytest.mark.cluster
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(history=histories())
def test_random_histories_on_the_real_cluster_end_as_the_model(cluster, history):
    """The same, through node2's real queue, a real sync-images run and rsync."""
    fates, deliveries = history
    images = [cluster.new_image("node1", size=64 * 1024 + index) for index in range(IMAGES)]
    with kombu.Connection(cluster.kombu_url) as connection:
        producer = connection.Producer()
        topology.declare_own_queues(connection, ["node2"], TOPOLOGY)
        for index, event_type in deliveries:
            producer.publish(event_for(images[index], event_type).to_wire(), exchange="",
                             routing_key=topology.node_queue_name("node2"),
                             content_type="application/json", serializer=None)
    node2 = cluster["node2"]
    result = node2.run("sync-images")
    assert result.returncode == 0, node2.log.read_text()[-2000:]
    present = {index for index, (image_id, md5, _) in enumerate(images)
               if node2.contents().get(image_id) == md5}
    assert present == expected_present(fates)
    assert {name for name in node2.files()} >= {images[i][0] for i in present}
    assert not any(images[i][0] in node2.files() for i in set(range(IMAGES)) - present)
    assert node2.temporaries() == []

