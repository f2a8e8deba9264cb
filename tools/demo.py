"""The main job, on a real local cluster: an image uploaded on node1 replicated
to node2 and node3 by the daemons, verified, then deleted everywhere.

Run it with ``make demo`` (root: mount namespaces and sshd). Everything it
starts (three sshd, three daemons, a RabbitMQ virtual host) is torn down at
the end.
"""

from __future__ import annotations

import os
import sys
import time

from tools.localcluster import SSH_PORT, LocalCluster, md5_of, wait_for

SIZE = int(os.environ.get("DEMO_IMAGE_MIB", "256")) * 1024 * 1024


def say(text=""):
    print(f"[demo] {text}", flush=True)


def show_stores(cluster, image_id):
    for node in cluster.nodes:
        path = node.path(image_id)
        if path.exists():
            st = path.stat()
            say(f"  {node.name}: {st.st_size} bytes  md5 {md5_of(path)}  "
                f"mode {oct(st.st_mode & 0o777)}  owner {st.st_uid}:{st.st_gid}")
        else:
            say(f"  {node.name}: -")


def main() -> int:
    say("starting a three-node cluster on this machine: per node a mount namespace with its "
        "own /var/lib/glance/images, an sshd and a glance-image-sync daemon; one RabbitMQ")
    # The loopback addresses doc/architecture.rst names: 127.0.0.11, .12, .13.
    with LocalCluster(subnet="127.0.0") as cluster:
        for node in cluster.nodes:
            node.start_daemon()
            say(f"  {node.name}: sshd on {node.address}:{SSH_PORT}, daemon ready "
                f"(pid {node.daemon.pid}, log {node.log})")

        image_id, md5, size = cluster.new_image("node1", size=SIZE)
        say(f"glance-api on node1 stored image {image_id}: {size} bytes, md5 {md5}")
        say("glance-api on node1 notifies image.upload, image.activate and image.update "
            "(oslo.messaging, driver messagingv2, publisher_id image.node1)")
        published = time.monotonic()
        cluster.upload(image_id, md5, size)
        for node in cluster.nodes[1:]:
            wait_for(lambda node=node: node.path(image_id).exists(), 300,
                     what=f"the image on {node.name}")
            say(f"  {node.name}: verified copy in place {time.monotonic() - published:.2f} s "
                "after the notification")
        show_stores(cluster, image_id)
        if not all(node.has(image_id, md5) for node in cluster.nodes):
            say("FAILED: not every node holds a verified copy")
            return 1
        say("every node holds a byte-identical copy with the source's mode and the store's "
            "owner")
        say("what an operator sees on node3: glance-image-sync status")
        for line in cluster["node3"].run("status").stdout.splitlines():
            say("  " + line)

        say("glance-api on node2 deletes the image (its own file) and notifies image.delete")
        cluster["node2"].path(image_id).unlink()
        published = time.monotonic()
        cluster.delete(image_id, md5, size, publisher="node2")
        wait_for(lambda: not any(node.path(image_id).exists() for node in cluster.nodes), 60,
                 what="the image to be gone")
        say(f"  gone from every node {time.monotonic() - published:.2f} s after the "
            "notification")
        show_stores(cluster, image_id)
        say("  kept in the trash of node1 and node3 for deleted_image_grace (24 h), where "
            "'glance-image-sync restore' would take it back from: "
            + ", ".join(f"{node.name} {'yes' if image_id in node.trashed() else 'no'}"
                        for node in cluster.nodes))
        say("what node3's daemon logged:")
        for line in cluster["node3"].log.read_text().splitlines():
            if image_id in line:
                say("  " + line.split(" INFO ", 1)[-1])
        say("stopping the daemons and tearing the cluster down")
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
