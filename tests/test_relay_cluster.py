"""The relay on a real cluster: images pass along the chain of nodes, a source that dies
mid-stream costs one retry, and corrupt bytes are installed nowhere.

Transfers are slowed (rsync_bwlimit, which the stream honours too) so that each test
acts while images are on their way.
"""

import os
import signal
import threading

import pytest

from glance_image_sync.store.owner import Owner
from tools.localcluster import SERVE_COMMAND, LocalCluster, wait_for

pytestmark = pytest.mark.cluster

MiB = 1024 * 1024
SLOW = {"rsync_bwlimit": 2048, "relay_wait": 20}  # KiB/s: 8 MiB take four seconds a hop


@pytest.fixture
def chain4():
    if os.geteuid() != 0:
        pytest.skip("the local cluster needs root")
    with LocalCluster(size=4, restricted_key=SERVE_COMMAND, extra_config=SLOW) as cluster:
        for node in cluster.nodes:
            node.start_daemon()
        yield cluster


def lines_about(node, image_id, needle):
    return [line for line in node.log_since().splitlines()
            if image_id in line and needle in line]


class NeverWrong:
    """Watches the nodes' stores: no image file may ever have other bytes than ``md5``."""

    def __init__(self, cluster, image_id, md5):
        self.cluster, self.image_id, self.md5 = cluster, image_id, md5
        self.seen_wrong = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch)
        self._thread.start()

    def _watch(self):
        while not self._stop.wait(0.05):
            for node in self.cluster.nodes[2:]:
                if node.path(self.image_id).exists() and not node.has(self.image_id,
                                                                      self.md5):
                    self.seen_wrong.append(node.name)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.seen_wrong


def test_an_image_passes_along_the_chain_each_node_streaming_from_the_one_before(chain4):
    image_id, md5, size = chain4.new_image("node2", size=8 * MiB)
    chain4.upload(image_id, md5, size, publisher="node2")
    wait_for(lambda: all(node.has(image_id) for node in chain4.nodes), 120,
             what="the image on every node")
    assert all(node.has(image_id, md5) for node in chain4.nodes)
    # The chain for node2's upload: node2, node3, node4, node1 (api_nodes, wrapped).
    node1, node2, node3, node4 = chain4.nodes
    assert lines_about(node3, image_id, "installed and verified on node3 (from node2)")
    assert lines_about(node4, image_id, "streaming from node3 to node4")
    assert lines_about(node4, image_id, "installed and verified on node4 (from node3)")
    assert lines_about(node1, image_id, "installed and verified on node1 (from node4)")
    assert not any(node.temporaries() for node in chain4.nodes)


def test_a_relay_killed_mid_stream_costs_its_followers_one_retry(chain4):
    node1, node2, node3, node4 = chain4.nodes
    image_id, md5, size = chain4.new_image("node1", size=8 * MiB)
    chain4.upload(image_id, md5, size)
    # node3 streams from node2 and node4 from node3; node2 dies half-way.
    wait_for(lambda: any(os.path.getsize(node3.images / name) > 2 * MiB
                         for name in node3.temporaries()), 60, interval=0.02,
             what="node3 to have received some of the stream")
    node2.daemon.send_signal(signal.SIGKILL)
    node2.daemon.wait(30)
    node2.daemon = None
    wait_for(lambda: node3.has(image_id) and node4.has(image_id), 120,
             what="node3 and node4 to have the image after all")
    assert node3.has(image_id, md5) and node4.has(image_id, md5)
    assert lines_about(node3, image_id, "copy from node2 failed")
    assert lines_about(node3, image_id, "installed and verified on node3 (from node1)")
    # node4 was not sent back to the publisher: it went on from node3's new copy.
    assert lines_about(node4, image_id, "installed and verified on node4 (from node3)")
    node2.start_daemon()  # removes what it left, and gets the image (it is redelivered)
    wait_for(lambda: node2.has(image_id, md5), 120, what="node2 to have the image")
    wait_for(lambda: not any(node.temporaries() for node in chain4.nodes), 30,
             what="no temporaries left")


def test_corrupt_bytes_from_a_relay_are_installed_nowhere(chain4):
    node1, node2, node3, node4 = chain4.nodes
    node2.stop_daemon()  # node2's copy is the test's: a corrupt one
    image_id, md5, size = chain4.new_image("node1", size=8 * MiB)
    dir_fd = os.open(node2.images, os.O_RDONLY | os.O_DIRECTORY)
    owner = Owner(dir_fd)
    owner.hold()
    corrupt = node2.images / owner.temp_name(image_id)
    good = chain4["node1"].path(image_id).read_bytes()
    corrupt.write_bytes(good[:MiB] + bytes(MiB) + good[2 * MiB:4 * MiB])
    watch = NeverWrong(chain4, image_id, md5)
    try:
        chain4.upload(image_id, md5, size)
        # node3 streams the corrupt copy (and node4 from node3) while it "arrives".
        wait_for(lambda: lines_about(node4, image_id, "streaming from node3"), 60,
                 what="node4 to stream from node3")
        with open(corrupt, "ab") as more:
            more.write(good[4 * MiB:])
        os.rename(corrupt, node2.path(image_id))  # node2 "installed" it: the worst case
        wait_for(lambda: node3.has(image_id, md5) and node4.has(image_id, md5), 120,
                 what="node3 and node4 to have the right image from another source")
    finally:
        wrong = watch.stop()
        owner.release()
        os.close(dir_fd)
    assert wrong == [], f"a corrupt copy was installed on {sorted(set(wrong))}"
    assert lines_about(node3, image_id, "copy from node2 failed")
    assert lines_about(node3, image_id, "md5")
    assert lines_about(node3, image_id, "installed and verified on node3 (from node1)")


def test_on_limited_links_five_nodes_get_the_image_while_the_publisher_sends_it_once():
    if os.geteuid() != 0:
        pytest.skip("the local cluster needs root")
    with LocalCluster(size=5, link_mbit=100, restricted_key=SERVE_COMMAND) as cluster:
        for node in cluster.nodes:
            node.start_daemon()
        publisher = cluster["node1"]
        image_id, md5, size = cluster.new_image("node1", size=16 * MiB)
        sent = publisher.sent_bytes()
        cluster.upload(image_id, md5, size)
        wait_for(lambda: all(node.has(image_id) for node in cluster.nodes), 120,
                 what="the image on every node")
        assert all(node.has(image_id, md5) for node in cluster.nodes)
        # Every uplink carries about one copy: the publisher's too (4 without the relay).
        assert publisher.sent_bytes() - sent < 1.5 * size
        for before, node in zip(cluster.nodes[1:], cluster.nodes[2:]):
            assert lines_about(node, image_id, f"installed and verified on {node.name} "
                               f"(from {before.name})")
