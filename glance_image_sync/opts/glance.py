"""The options read under Glance's own names and groups.

``[oslo_messaging_rabbit]`` carries oslo.messaging's names, types, defaults
and meaning, so that Glance's glance-api.conf can be passed as the first
``--config-file`` and the two cannot disagree (``tests/test_glance_config.py``
compares them with oslo.messaging's own definitions). The optional
credentials for Glance's API are keystoneauth1's own options in
``[keystone_authtoken]``, where Glance keeps its service user's; where to
find the API is in ``[glance_api]``.
"""

from oslo_config import cfg

# Glance's own group for its service user's credentials: with glance-api.conf
# passed as another --config-file, they need not be written twice.
AUTH_GROUP = "keystone_authtoken"
API_GROUP = "glance_api"

RABBIT_GROUP = "oslo_messaging_rabbit"

# oslo.messaging's own definitions (same name, type and default): Glance's
# glance-api.conf sets them, and the notification queue must be declared as
# Glance's notifier declares it.
rabbit_opts = [
    cfg.BoolOpt(
        "rabbit_quorum_queue",
        default=False,
        help="Use quorum queues (x-queue-type: quorum), as oslo.messaging's option: "
        "Glance's notification queue and every queue of glance-image-sync (quorum "
        "queues are replicated over a RabbitMQ cluster, always durable). Must be "
        "Glance's value: give Glance's glance-api.conf as the first --config-file.",
    ),
    cfg.BoolOpt(
        "amqp_durable_queues",
        default=False,
        help="Declare Glance's notification exchange and queue durable, as "
        "oslo.messaging's option (ignored with rabbit_quorum_queue). Must be "
        "Glance's value. The queues of glance-image-sync are always durable.",
    ),
    cfg.BoolOpt(
        "amqp_auto_delete",
        default=False,
        help="Declare Glance's notification exchange and queue auto-delete, as "
        "oslo.messaging's option. Must be Glance's value.",
    ),
    cfg.BoolOpt(
        "rabbit_ha_queues",
        default=False,
        help="Declare Glance's notification queue with x-ha-policy: all, as "
        "oslo.messaging's option. Must be Glance's value.",
    ),
    *(cfg.IntOpt(name, default=0, help=f"{argument} of Glance's quorum notification "
                 "queue, as oslo.messaging's option; 0 sets none. Must be Glance's value.")
      for name, argument in (("rabbit_quorum_delivery_limit", "x-delivery-limit"),
                             ("rabbit_quorum_max_memory_length", "x-max-in-memory-length"),
                             ("rabbit_quorum_max_memory_bytes", "x-max-in-memory-bytes"))),
    cfg.BoolOpt(
        "ssl",
        default=False,
        help="Connect to every broker over TLS. The broker's certificate is always "
        "verified, and so is its host name against the one in transport_url.",
    ),
    cfg.StrOpt(
        "ssl_version",
        default="",
        help="TLS protocol version, as oslo.messaging's option (TLSv1, SSLv23, "
        "TLSv1_1, TLSv1_2, where Python offers them). Empty: the best both sides offer.",
    ),
    cfg.StrOpt("ssl_key_file", default="",
               help="Private key of the client certificate (with ssl)."),
    cfg.StrOpt("ssl_cert_file", default="",
               help="Client certificate, for brokers that ask for one (with ssl). Empty: "
               "none is sent."),
    cfg.StrOpt("ssl_ca_file", default="",
               help="CA certificates that verify the broker's certificate (with ssl). "
               "Empty: the system's trusted CAs."),
]

# Replaced by Glance's own options: registered only to say so.
removed_opts = [
    cfg.StrOpt("notification_durable", help="Removed: see amqp_durable_queues."),
    cfg.StrOpt("queue_type", help="Removed: see rabbit_quorum_queue."),
]
REMOVED = {
    "notification_durable": "[oslo_messaging_rabbit] amqp_durable_queues",
    "queue_type": "[oslo_messaging_rabbit] rabbit_quorum_queue",
}


glance_api_opts = [
    cfg.StrOpt(
        "region_name",
        default=None,
        help="Region of Glance's endpoint in the Keystone catalog. Default: "
        "the catalog's only (or first) one.",
    ),
    cfg.StrOpt(
        "interface",
        default="internal",
        choices=["public", "internal", "admin"],
        help="Which of Glance's catalog endpoints to use.",
    ),
    cfg.URIOpt(
        "endpoint_override",
        default=None,
        schemes=["http", "https"],
        help="Glance's API at this URL instead of the catalog's, e.g. "
        "http://127.0.0.1:9292 for this node's own glance-api. The token still "
        "comes from [keystone_authtoken].",
    ),
]
