"""Connections to the broker, from BrokerSettings.

Every connection of the tool is made here: the consumers' persistent ones and
the short ones of the operator commands. Several brokers (a comma-separated
transport_url) are tried in turn.
"""

from __future__ import annotations

import socket

from kombu import Connection
from kombu.exceptions import OperationalError

CONNECT_TIMEOUT = 5

_PROBE = Connection("amqp://")
# What a lost, refused or reset connection or channel raises (py-amqp, sockets,
# kombu's wrappers): the errors to reconnect on, never to crash on.
ERRORS = (_PROBE.connection_errors + _PROBE.channel_errors
          + (OSError, socket.timeout, OperationalError))


def connection(broker) -> Connection:
    """A kombu Connection (not yet connected); never log its URL: use as_uri()."""
    return Connection(list(broker.urls), heartbeat=broker.heartbeat,
                      connect_timeout=CONNECT_TIMEOUT, failover_strategy="round-robin")


def raw_channel(connection):
    """A channel whose messages keep their bodies as the bytes that came.

    py-amqp otherwise decodes a body with whatever codec its
    content_encoding names, which a publisher of hostile messages chooses:
    some codecs give text that cannot be encoded back, and a message moved
    to the dead-letter queue would no longer be the message that came.
    """
    channel = connection.channel()
    channel.auto_decode = False
    return channel


def connect(broker) -> Connection:
    """A connected Connection, each broker tried once, without kombu's sleeps."""
    conn = connection(broker)
    conn.ensure_connection(max_retries=len(broker.urls) - 1, interval_start=0,
                           interval_step=0, interval_max=0)
    return conn
