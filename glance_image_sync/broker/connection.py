"""Connections to the broker, from BrokerSettings.

Every connection of the tool is made here: the consumers' persistent ones and
the short ones of the operator commands. Several brokers (the nodes of a
cluster, comma-separated in transport_url) are tried in turn, each with a
kombu Connection of its own: with TLS, each broker's certificate is checked
against the host name it is reached by (one kombu Connection over several
brokers would check every one against the first broker's name).

TLS always verifies: the broker's certificate against ``ssl_ca_file`` (or
the system's CAs) and its host name against transport_url's.

A broker that refuses the credentials (ACCESS_REFUSED) raises
``BrokerRefused``: a configuration error, which retrying cannot cure.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import urllib.parse

import amqp
from kombu import Connection
from kombu.exceptions import OperationalError

from glance_image_sync.exceptions import BrokerRefused, BrokerUnavailable
from glance_image_sync.settings import SSL_VERSIONS, redact_url

CONNECT_TIMEOUT = 5
# A write that makes no progress for this long fails (SO_SNDTIMEO), and the
# connection is made again: a broker that stops reading (a resource alarm
# blocks publishers so) never holds the loop's thread for ever. (py-amqp's
# default TCP_USER_TIMEOUT of 1 s ends such a connection sooner where Linux
# offers it; this bound holds without it.)
WRITE_TIMEOUT = 5.0

_PROBE = Connection("amqp://")
# What a lost, refused or reset connection or channel raises (py-amqp, sockets,
# TLS, kombu's wrappers): the errors to reconnect on, never to crash on.
ERRORS = (_PROBE.connection_errors + _PROBE.channel_errors
          + (OSError, socket.timeout, OperationalError))


def ssl_options(tls, hostname):
    """py-amqp's ``ssl`` argument for one broker: False, or verifying options."""
    if tls is None:
        return False
    options = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": hostname,
               "ca_certs": tls.ca_file}
    if tls.cert_file:
        options["certfile"] = tls.cert_file
        options["keyfile"] = tls.key_file
    if tls.version:
        options["ssl_version"] = getattr(ssl, SSL_VERSIONS[tls.version])
    return options


def connection(broker, url, on_blocked=None, on_unblocked=None) -> Connection:
    """A kombu Connection to one broker (not yet connected); log ``redact_url(url)`` only.

    ``on_blocked(reason)`` and ``on_unblocked()`` are py-amqp's callbacks for
    RabbitMQ's connection.blocked and connection.unblocked: called inside
    its dispatch of a frame, so they must only record.
    """
    options = {"write_timeout": WRITE_TIMEOUT}
    if on_blocked is not None:
        options.update(on_blocked=on_blocked, on_unblocked=on_unblocked)
    return Connection(url, heartbeat=broker.heartbeat, connect_timeout=CONNECT_TIMEOUT,
                      ssl=ssl_options(broker.tls, urllib.parse.urlsplit(url).hostname),
                      transport_options=options)


def close(conn, graceful=True) -> None:
    """Close a connection without ever waiting long, and without raising.

    A graceful close waits for the broker's close-ok, which a broker that
    blocks the connection (a resource alarm) or is gone never sends: the
    wait is bounded by CONNECT_TIMEOUT, then the socket is dropped. Without
    ``graceful``, the socket is dropped at once.
    """
    try:
        if graceful:
            if conn.connected:
                conn.connection.sock.settimeout(CONNECT_TIMEOUT)
            conn.release()
            return
    except (*ERRORS, AttributeError):
        pass  # AttributeError: py-amqp's transport is already gone
    try:
        conn.collect()
    except (*ERRORS, AttributeError):
        pass


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


def connect(broker, first=0, on_attempt=None, **callbacks) -> tuple:
    """(a connected Connection, the index of its URL): each broker tried once, from ``first``.

    Without kombu's sleeps: the caller decides when to try again. Raises
    BrokerRefused when a broker refuses the credentials, BrokerUnavailable
    (naming every broker tried and why) when none can be reached.
    ``on_attempt()`` is called before each broker is tried (one try takes at
    most about 3 * CONNECT_TIMEOUT: TCP, TLS, AMQP's handshake).
    """
    failures = []
    for step in range(len(broker.urls)):
        if on_attempt is not None:
            on_attempt()
        index = (first + step) % len(broker.urls)
        url = broker.urls[index]
        conn = connection(broker, url, **callbacks)
        try:
            conn.ensure_connection(max_retries=0)
        except ERRORS as exc:
            conn.release()
            cause = root_cause(exc)
            if isinstance(cause, amqp.exceptions.AccessRefused):
                raise BrokerRefused(f"{redact_url(url)} refused the credentials of "
                                    f"transport_url ({describe(cause)})") from None
            failures.append(f"{redact_url(url)}: {describe(cause)}{_tls_hint(broker, cause)}")
            continue
        return conn, index
    raise BrokerUnavailable("; ".join(failures))


@contextlib.contextmanager
def connected(broker, **callbacks):
    """A connected Connection (as ``connect``), closed with ``close`` at the end."""
    conn, _ = connect(broker, **callbacks)
    try:
        yield conn
    finally:
        close(conn)


def _tls_hint(broker, cause) -> str:
    """What a TLS connection cut short without a reason most likely means.

    A broker that refuses the client's certificate (expired, unknown CA,
    none given) sends an alert and resets the connection; with TLS 1.3 the
    reset may reach us before the alert, and all that is left is an EOF.
    """
    if broker.tls is None or not isinstance(cause, (ssl.SSLEOFError, ConnectionResetError)):
        return ""
    given = ("the client certificate ssl_cert_file" if broker.tls.cert_file
             else "a connection without a client certificate")
    return (f" (the broker closed the TLS connection during the handshake: it may refuse "
            f"{given}; its log says why)")


def root_cause(exc):
    """The error kombu wrapped (an OperationalError says less than the TLS error in it)."""
    while isinstance(exc, OperationalError) and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__
    return exc


def describe(exc) -> str:
    """An exception as one line: its type, and its message when that says more."""
    exc = root_cause(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
