"""The main job, on a real local cluster: an image uploaded on node1 replicated
to node2 and node3, verified, then deleted everywhere.

Run it with ``make demo`` (root: mount namespaces and sshd). Everything it
starts (three sshd, RabbitMQ virtual host, the nodes' processes) is torn down
at the end.
"""

from __future__ import annotations

import sys
import time

from tools.localcluster import LocalCluster, md5_of

SIZE = 64 * 1024 * 1024


def say(text):
    print(f"[demo] {text}", flush=True)


def show_stores(cluster, image_id):
    for node in cluster.nodes:
        path = node.path(image_id)
        if path.exists():
            st = path.stat()
            say(f"  {node.name}: {image_id}  {st.st_size} bytes  md5 {md5_of(path)}  "
                f"mode {oct(st.st_mode & 0o777)}")
        else:
            say(f"  {node.name}: (no {image_id})")


def main() -> int:
    say("starting a three-node cluster: a mount namespace, sshd and a store per node, "
        "one RabbitMQ virtual host")
    with LocalCluster() as cluster:
        for node in cluster.nodes:
            say(f"  {node.name}: sshd on {node.address}:2222, store {node.images} mounted on "
                "/var/lib/glance/images")
        image_id, md5, size = cluster.new_image("node1", size=SIZE)
        say(f"glance-api on node1 stored image {image_id} ({size} bytes, md5 {md5})")
        say("glance-api on node1 notifies image.upload, image.activate, image.update "
            "(oslo.messaging, driver messagingv2, publisher image.node1)")
        cluster.upload(image_id, md5, size)
        show_stores(cluster, image_id)
        for node in cluster.nodes:
            started = time.monotonic()
            result = node.run("both")
            say(f"{node.name}: glance-image-sync both -> exit {result.returncode} "
                f"in {time.monotonic() - started:.2f} s")
            if result.returncode:
                say(node.log.read_text()[-2000:])
                return 1
        show_stores(cluster, image_id)
        if not all(node.has(image_id, md5) for node in cluster.nodes):
            say("FAILED: not every node holds a verified copy")
            return 1
        say("every node holds a byte-identical, verified copy")

        say("glance-api on node2 deletes the image and notifies image.delete")
        cluster["node2"].path(image_id).unlink()
        cluster.delete(image_id, md5, size, publisher="node2")
        for node in cluster.nodes:
            result = node.run("both")
            say(f"{node.name}: glance-image-sync both -> exit {result.returncode}")
        show_stores(cluster, image_id)
        if any(node.path(image_id).exists() for node in cluster.nodes):
            say("FAILED: the image is still somewhere")
            return 1
        say("the image is gone from every node; tearing the cluster down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
