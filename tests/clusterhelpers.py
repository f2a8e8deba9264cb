"""What several cluster tests share: running the tool, looking at stores, logs,
queues and metrics."""

import os
import socket
import stat
import urllib.request

import kombu
from prometheus_client.parser import text_string_to_metric_families

from glance_image_sync.broker import topology
from tools.localcluster import wait_for


def run_both_everywhere(cluster):
    for node in cluster.nodes:
        result = node.run("both")
        assert result.returncode == 0, (node.name, result.stdout, result.stderr,
                                        node.log.read_text()[-3000:])


def store_snapshot(cluster):
    """Every node's store: {node: {name: (size, mode, uid, gid, mtime)}}."""
    snapshot = {}
    for node in cluster.nodes:
        entries = {}
        for name in node.files():
            st = os.lstat(node.images / name)
            entries[name] = (st.st_size, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                             st.st_mtime_ns)
        snapshot[node.name] = entries
    return snapshot


def sshd_logins(cluster):
    return sum((node.dir / "sshd.log").read_text().count("Accepted publickey")
               for node in cluster.nodes)


def dead_letter_reasons(cluster):
    reasons = []
    with kombu.Connection(cluster.kombu_url) as connection:
        channel = connection.channel()
        while True:
            message = channel.basic_get(topology.DEAD_LETTER_QUEUE)
            if message is None:
                return reasons
            reasons.append(message.headers["x-gis-reason"])
            channel.basic_ack(message.delivery_tag)


def parse(text) -> dict:
    """{(sample name, sorted labels): value}, by prometheus_client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse(response.read().decode())


def scrape_until(port, predicate, what) -> dict:
    """The first scrape whose samples satisfy ``predicate``."""
    def ready():
        got = scrape(port)
        return got if predicate(got) else None
    return wait_for(ready, 60, interval=0.2, what=what)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def queue_messages(name):
    return ("glance_image_sync_queue_messages", (("queue", name),))
