"""The relay on limited links: N nodes, each in a network namespace of its own whose
link tc limits to 100 Mbit/s both ways (tools/netns.py), a new image uploaded on node1.

For each N, the relay (the default) and the naive strategy (``relay = false``: every
peer copies from the publisher) run on the same cluster, alternating, each on a new
image. Measured: time from the first notification until every node holds the image,
verified, at its final path; and the bytes the publisher's link sent meanwhile.
"""

from __future__ import annotations

import time

from bench.scenarios import MiB, Result, show_size
from tools.localcluster import SERVE_COMMAND, LocalCluster, wait_for

LINK_MBIT = 100


def _replicate(cluster, size) -> tuple:
    """(seconds until every node has a new image, bytes the publisher sent meanwhile)."""
    publisher = cluster.nodes[0]
    image_id, md5, _ = cluster.new_image(publisher.name, size=size)
    sent = publisher.sent_bytes()
    started = time.monotonic()
    cluster.upload(image_id, md5, size, publisher=publisher.name)
    wait_for(lambda: all(node.path(image_id).exists() for node in cluster.nodes), 1800,
             interval=0.01, what="the image on every node")
    elapsed = time.monotonic() - started
    sent = publisher.sent_bytes() - sent
    if not all(node.has(image_id, md5) for node in cluster.nodes):
        raise RuntimeError("a node holds a copy that does not verify")
    for node in cluster.nodes[1:]:  # the next round's image needs the room
        node.path(image_id).unlink()
    return elapsed, sent


def _use(cluster, relay: bool) -> None:
    for node in cluster.nodes:
        if node.daemon is not None:
            node.stop_daemon()
        node.write_config({**cluster.extra_config, "relay": str(relay).lower()})
        node.start_daemon()


def relay_scale(node_counts=(3, 5, 9), size=128 * MiB, rounds=1) -> list:
    """One row per N: the relay beside the naive strategy and the link's limit."""
    limit = size * 8 / (LINK_MBIT * 1e6)
    measured = {}
    for count in node_counts:
        with LocalCluster(size=count, link_mbit=LINK_MBIT, restricted_key=SERVE_COMMAND,
                          extra_config={"relay_wait": 30}) as cluster:
            times = {"relay": [], "naive": []}
            sent = {"relay": [], "naive": []}
            for _ in range(rounds):
                for strategy in ("relay", "naive"):
                    _use(cluster, strategy == "relay")
                    elapsed, publisher_sent = _replicate(cluster, size)
                    times[strategy].append(elapsed)
                    sent[strategy].append(publisher_sent)
            measured[count] = {
                "relay": min(times["relay"]), "naive": min(times["naive"]),
                "relay_rounds": times["relay"], "naive_rounds": times["naive"],
                "publisher_sent": max(sent["relay"]) / size,
                "naive_publisher_sent": max(sent["naive"]) / size,
            }
    smallest, largest = min(node_counts), max(node_counts)
    rows = []
    for count in node_counts:
        numbers = measured[count]
        mine, naive = numbers["relay"], numbers["naive"]
        targets = [f"<= {numbers['naive']:.1f} s (naive)" if count == smallest else None,
                   f"<= 1.5x T({smallest}), <= 0.4x naive" if count == largest else None,
                   "publisher sends <= 2x the image"]
        ok = numbers["publisher_sent"] <= 2
        if count == smallest:
            ok = ok and mine <= naive
        if count == largest:
            ok = ok and mine <= 1.5 * measured[smallest]["relay"] and mine <= 0.4 * naive
        rows.append(Result(
            f"relay_{count}", f"{count} nodes on {LINK_MBIT} Mbit/s links: "
            f"{show_size(size)} on every node, verified",
            f"{mine:.1f} s ({mine / limit:.2f}x size / B); publisher sent "
            f"{numbers['publisher_sent']:.2f}x the image",
            "; ".join(target for target in targets if target),
            f"naive (all from the publisher) {naive:.1f} s, publisher sent "
            f"{numbers['naive_publisher_sent']:.2f}x; size / B = {limit:.1f} s",
            ok, {**numbers, "limit": limit, "size": size, "nodes": count,
                 "t_ratio_to_smallest": mine / measured[smallest]["relay"],
                 "ratio_to_naive": mine / naive}))
    return rows


SCENARIOS = {"relay_scale": relay_scale}
QUICK = {"relay_scale": {"node_counts": (3, 5), "size": 16 * MiB}}
