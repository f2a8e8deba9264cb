"""The options of ``[DEFAULT]``: the tool's own, each with its help text.

``api_nodes``, ``rsync_user``, ``log_file`` and ``verbose`` are the names the
original cron tool used; they keep working.
"""

import socket

from oslo_config import cfg, types

cluster_opts = [
    cfg.ListOpt(
        "api_nodes",
        default=[],
        mutable=True,
        help="Every glance-api node whose image store is kept in step, by short "
        "host name or FQDN, as ssh reaches it. One durable queue is declared "
        "per node. Required. The daemon re-reads it on SIGHUP.",
    ),
    cfg.StrOpt(
        "host",
        default=socket.gethostname(),
        sample_default="<this machine's host name>",
        help="This node's name. Matched against api_nodes by FQDN and by short "
        "name; it must name exactly one of them.",
    ),
]

messaging_opts = [
    cfg.StrOpt(
        "transport_url",
        default="rabbit://guest:guest@localhost:5672/",
        secret=True,
        help="RabbitMQ to read Glance's notifications from and keep the "
        "per-node queues in: Glance's own transport_url "
        "(rabbit://user:password@host:port[,user:password@host2:port]/vhost). "
        "With several brokers (the nodes of a cluster), each is tried in turn.",
    ),
    cfg.StrOpt(
        "notification_exchange",
        default="glance",
        help="Exchange Glance publishes notifications on (Glance's "
        "control_exchange).",
    ),
    cfg.StrOpt(
        "notification_topic",
        default="glance_notifications",
        deprecated_name="rabbit_notification_topic",
        help="Notification topic Glance publishes to and nobody else reads. "
        "Add it to Glance's [oslo_messaging_notifications] topics; the queue "
        "read is <notification_topic>.info.",
    ),
    cfg.IntOpt(
        "heartbeat",
        default=30,
        min=10,
        help="AMQP heartbeat in seconds. Each side declares the other dead after "
        "two missed heartbeats; the daemon sends one every heartbeat/4 s. Below "
        "10 s a short stall of the broker or this host (a busy disk, a VM "
        "pause) resets healthy connections.",
    ),
    cfg.IntOpt(
        "consumer_timeout",
        default=1800,
        min=10,
        help="RabbitMQ's consumer_timeout in seconds (1800 unless the broker "
        "sets it). An event whose transfer runs longer is re-queued before the "
        "broker would close the channel, so it is neither lost nor restarted.",
    ),
]

store_opts = [
    cfg.StrOpt(
        "filesystem_store_datadir",
        default="/var/lib/glance/images",
        help="Glance's file store directory; the same path on every node. "
        "Images are <filesystem_store_datadir>/<image id>.",
    ),
    cfg.StrOpt(
        "image_file_mode",
        default=None,
        sample_default="<the mode of the source's copy>",
        help="Octal permission bits of installed images, e.g. 0640. Default: "
        "the mode of the copy on the node it came from. The owner and group are "
        "always those of filesystem_store_datadir.",
    ),
    cfg.StrOpt(
        "state_dir",
        default="/var/lib/glance-image-sync",
        help="Directory for this node's own state: the run lock, the record "
        "of deleted images, and the last success and last error that "
        "'glance-image-sync status' shows.",
    ),
    cfg.IntOpt(
        "deleted_image_memory",
        default=30 * 24 * 3600,
        min=0,
        help="Seconds a deleted image id is remembered, so a late or replayed "
        "upload event never brings the image back.",
    ),
]

delete_opts = [
    cfg.IntOpt(
        "deleted_image_grace",
        default=24 * 3600,
        min=0,
        help="Seconds a deleted image's file stays in the store's trash "
        "(<filesystem_store_datadir>/.glance-image-sync-trash, moved there by a "
        "rename: no copy, no extra space) before it is purged; until then "
        "'glance-image-sync restore <image id>' puts it back. 0 removes the "
        "file at once, for good. At most deleted_image_memory.",
    ),
    cfg.IntOpt(
        "trash_min_free_percent",
        default=10,
        min=0,
        max=90,
        help="When less than this percentage of the image store's file system "
        "is free, the trash is purged before its grace period ends, oldest "
        "first, until this much is free again or the trash is empty (each "
        "image logged). Keep it above the share the largest upload you expect "
        "needs. 0: never purged early.",
    ),
    cfg.IntOpt(
        "delete_alarm_threshold",
        default=20,
        min=1,
        help="More deletes than this within a minute on one node are logged as "
        "an error and raised in the metrics (glance_image_sync_delete_burst), "
        "for an alert on a mass delete.",
    ),
]

transfer_opts = [
    cfg.StrOpt(
        "rsync_user",
        default="glance",
        help="User rsync logs in as on the other nodes (over ssh).",
    ),
    cfg.StrOpt(
        "rsync_remote_paths",
        default="absolute",
        choices=[
            ("absolute", "<rsync_user>@<node>:<filesystem_store_datadir>/<image id>: for "
             "a key without a forced command, or one restricted with rrsync -absolute "
             "(rrsync of rsync 3.5 and later)."),
            ("relative", "<rsync_user>@<node>:<image id>, relative to the directory the "
             "peer's rrsync restricts the key to: works with every rrsync (that of "
             "Ubuntu 22.04 and 24.04, rsync 3.2.7, has no -absolute). Needs that "
             "restriction: without it the path is relative to rsync_user's home."),
        ],
        help="How rsync names a file on a peer. 'glance-image-sync doctor' says which "
        "form each peer accepts; 'glance-image-sync ssh-keys' prints the matching "
        "authorized_keys line.",
    ),
    cfg.StrOpt(
        "ssh_config_file",
        default=None,
        help="ssh client configuration for rsync (passed as ssh -F): ports, "
        "keys, pinned host keys. Default: ssh's own.",
    ),
    cfg.IntOpt(
        "ssh_connect_timeout",
        default=10,
        min=1,
        help="Seconds ssh waits to connect to a peer.",
    ),
    cfg.ListOpt(
        "ssh_ciphers",
        default=["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                 "chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr"],
        help="Ciphers ssh offers a peer, in order of preference (ssh -o "
        "Ciphers=...). The default is OpenSSH's own set with AES-GCM first: on "
        "CPUs with AES instructions it encrypts about twice as fast as "
        "chacha20-poly1305, which a transfer is otherwise bound by. Empty: "
        "what ssh_config_file or ssh's defaults say.",
    ),
    cfg.IntOpt(
        "ssh_control_persist",
        default=60,
        min=0,
        help="Seconds to keep one ssh connection per peer open after its last "
        "transfer (ssh ControlMaster/ControlPersist; the sockets live in "
        "state_dir, which must then be a short path without spaces). Each "
        "image then costs no ssh handshake, which is a third of a second of "
        "CPU on the two nodes: it matters when a node catches up on many "
        "images. 0 opens a connection per transfer.",
    ),
    cfg.IntOpt(
        "rsync_timeout",
        default=120,
        min=5,
        help="Seconds without any data after which rsync gives up (rsync "
        "--timeout).",
    ),
    cfg.IntOpt(
        "transfer_timeout",
        default=6 * 3600,
        min=60,
        help="Seconds one transfer may take in all before it is killed.",
    ),
    cfg.IntOpt(
        "rsync_bwlimit",
        default=0,
        min=0,
        help="Bandwidth limit per transfer in KiB/s (rsync --bwlimit); 0 is "
        "unlimited.",
    ),
    cfg.BoolOpt(
        "relay",
        default=True,
        help="Pass new images on along a chain of nodes, as HDFS writes a block: the "
        "publisher's next node in api_nodes pulls from the publisher, and every further "
        "node streams the image from the node before it while that node is still "
        "receiving it. Each node's uplink then carries about one copy, and every node "
        "has the image in about the time one copy takes, however many nodes there are. "
        "Every copy is verified before it is installed; a node whose upstream fails or "
        "stalls fetches from the publisher instead. The daemon's transfers only: a cron "
        "run copies from the publisher. Needs 'glance-image-sync serve' as the peers' "
        "forced command ('glance-image-sync ssh-keys'). False: every node copies from "
        "the publisher.",
    ),
    cfg.IntOpt(
        "relay_wait",
        default=10,
        min=1,
        help="Seconds after Glance sent an image's event during which a node takes "
        "the image from the node before it in the chain: it waits that long for that "
        "node to start receiving it, and fetches from the publisher after. A node "
        "catching up on older events fetches them from the publisher, many images "
        "per rsync session.",
    ),
    cfg.IntOpt(
        "max_parallel_transfers",
        default=16,
        min=1,
        help="Images fetched at once; never two copies of the same image. From "
        "one peer at most two rsync sessions run at once: images that wait for "
        "one travel together in the next, so that a node catching up does not "
        "pay an rsync and ssh start-up per image.",
    ),
    cfg.ListOpt(
        "retry_delays",
        item_type=types.Integer(min=1),
        default=[10, 60, 300, 1800],
        help="Seconds before a failed transfer is tried again, by attempt; the "
        "last value repeats. Each wait is shortened at random by up to 20 % (never "
        "lengthened: the retry queue's TTL is the longest), so retries of many "
        "images do not all come back at once.",
    ),
    cfg.IntOpt(
        "max_attempts",
        default=10,
        min=1,
        help="Attempts before an event is parked in this node's failed queue "
        "(see 'glance-image-sync failed').",
    ),
]

metrics_opts = [
    cfg.PortOpt(
        "metrics_listen_port",
        default=0,
        help="TCP port on which the daemon serves Prometheus metrics at "
        "/metrics. 0 (the default) serves none.",
    ),
    cfg.HostAddressOpt(
        "metrics_listen_address",
        default="127.0.0.1",
        help="Address the metrics endpoint listens on. Loopback by default: "
        "only a scraper on this node (or a proxy) reaches it; the metrics name "
        "nodes and queues.",
    ),
    cfg.StrOpt(
        "metrics_textfile",
        default=None,
        help="File to write Prometheus metrics into for node_exporter's textfile "
        "collector, e.g. /var/lib/prometheus/node-exporter/glance-image-sync.prom "
        "(absolute, ending in .prom, in an existing directory). Written at the "
        "end of every sync-images or both run, and every 30 seconds by the "
        "daemon. Default: none.",
    ),
]


legacy_opts = [
    cfg.BoolOpt(
        "verbose",
        default=False,
        deprecated_for_removal=True,
        deprecated_reason="oslo.log removed it; use debug.",
        help="Accepted so that old configuration files keep working; ignored.",
    ),
]
