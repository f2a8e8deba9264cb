"""The settings read under Glance's own names: the broker, and Glance's API.

``[DEFAULT] transport_url`` and ``[oslo_messaging_rabbit]`` as oslo.messaging
reads them (the queues, TLS), and the credentials for Glance's API from
keystoneauth1's options in ``[keystone_authtoken]`` (``opts.glance``).
"""

from __future__ import annotations

import os
import re
import ssl
import urllib.parse
from dataclasses import dataclass

from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import loading as ks_loading

from glance_image_sync import opts
from glance_image_sync.exceptions import ConfigError
from glance_image_sync.opts import REMOVED


@dataclass(frozen=True)
class TlsSettings:
    """[oslo_messaging_rabbit] ssl_*: the broker's certificate is always verified."""

    ca_file: str | None = None  # None: the system's trusted CAs
    cert_file: str | None = None  # a client certificate, or None
    key_file: str | None = None
    version: str | None = None  # oslo.messaging's ssl_version name, or None: the best


@dataclass(frozen=True)
class BrokerSettings:
    urls: tuple  # kombu URLs, password included: never log these
    heartbeat: int
    consumer_timeout: int
    tls: TlsSettings | None = None  # None: plain AMQP

    def redacted(self) -> str:
        """The broker addresses, as they may appear in logs."""
        return ", ".join(redact_url(url) for url in self.urls)

    @property
    def vhost(self) -> str:
        """The virtual host, as rabbitmqctl -p names it."""
        return urllib.parse.unquote(urllib.parse.urlsplit(self.urls[0]).path[1:]) or "/"


@dataclass(frozen=True)
class TopologySettings:
    """How the queues are declared: Glance's as oslo.messaging's notifier does, and ours."""

    exchange: str
    topic: str
    durable: bool  # Glance's exchange and queue: amqp_durable_queues or rabbit_quorum_queue
    quorum: bool  # rabbit_quorum_queue: Glance's queue and every one of ours
    retry_delays: tuple
    auto_delete: bool = False  # amqp_auto_delete (Glance's exchange and queue)
    # The x-arguments oslo.messaging gives Glance's queue, as sorted (name, value) pairs.
    notification_arguments: tuple = ()


@dataclass(frozen=True)
class GlanceApiSettings:
    """Where and as whom to ask Glance's API; ``auth`` None: not configured."""

    auth: object = None  # a keystoneauth1 auth plugin
    session: object = None  # a keystoneauth1 Session
    region_name: str | None = None
    interface: str = "internal"
    endpoint_override: str | None = None

    @property
    def configured(self) -> bool:
        return self.auth is not None


# Seconds a request to Glance's API may take when [keystone_authtoken]
# timeout does not say.
API_TIMEOUT = 30


def refuse_removed_options(conf) -> None:
    for name, replacement in REMOVED.items():
        if conf[name] is not None:
            raise ConfigError(f"{name} was removed: set {replacement} instead, to Glance's "
                              "value (or pass Glance's glance-api.conf as the first "
                              "--config-file), and delete the old line")


def notification_arguments(rabbit) -> tuple:
    """The x-arguments of Glance's queue, as oslo.messaging's notifier gives them."""
    if rabbit.rabbit_quorum_queue and rabbit.rabbit_ha_queues:
        # oslo.messaging refuses this too: Glance could not publish.
        raise ConfigError("[oslo_messaging_rabbit] rabbit_quorum_queue and rabbit_ha_queues "
                          "are both true: a queue is quorum or mirrored, not both")
    arguments = {}
    if rabbit.rabbit_ha_queues:
        arguments["x-ha-policy"] = "all"
    if rabbit.rabbit_quorum_queue:
        arguments["x-queue-type"] = "quorum"
        for name, value in (("x-delivery-limit", rabbit.rabbit_quorum_delivery_limit),
                            ("x-max-in-memory-length", rabbit.rabbit_quorum_max_memory_length),
                            ("x-max-in-memory-bytes", rabbit.rabbit_quorum_max_memory_bytes)):
            if value:
                arguments[name] = value
    return tuple(sorted(arguments.items()))


# oslo.messaging's ssl_version names (case-insensitive), each a protocol of
# Python's ssl module where this Python still offers it.
SSL_VERSIONS = {"tlsv1": "PROTOCOL_TLSv1", "sslv23": "PROTOCOL_SSLv23",
                "sslv2": "PROTOCOL_SSLv2", "sslv3": "PROTOCOL_SSLv3",
                "tlsv1_1": "PROTOCOL_TLSv1_1", "tlsv1_2": "PROTOCOL_TLSv1_2"}


def tls_settings(rabbit) -> TlsSettings | None:
    if not rabbit.ssl:
        return None
    version = rabbit.ssl_version.lower() or None
    if version is not None and not hasattr(ssl, SSL_VERSIONS.get(version, "-")):
        raise ConfigError(f"[oslo_messaging_rabbit] ssl_version {rabbit.ssl_version!r} is not "
                          "one this Python offers (TLSv1, SSLv23, TLSv1_1, TLSv1_2); leave it "
                          "empty for the best both sides offer")
    files = {}
    for name in ("ssl_ca_file", "ssl_cert_file", "ssl_key_file"):
        value = getattr(rabbit, name)
        if value and not os.path.isfile(value):
            raise ConfigError(f"[oslo_messaging_rabbit] {name} {value} does not exist")
        files[name] = value or None
    if files["ssl_key_file"] and not files["ssl_cert_file"]:
        raise ConfigError("[oslo_messaging_rabbit] ssl_key_file is set without ssl_cert_file")
    return TlsSettings(ca_file=files["ssl_ca_file"], cert_file=files["ssl_cert_file"],
                       key_file=files["ssl_key_file"], version=version)


def glance_api_settings(conf) -> GlanceApiSettings:
    """The API's credentials from keystoneauth1's options; unconfigured without auth_type.

    With no ``auth_type`` (or no ``auth_url`` for a plugin that needs one)
    there is no API to ask, which is not an error: the API is only ever extra
    evidence. A plugin named but missing its other options is one.
    """
    group = conf[opts.AUTH_GROUP]
    api = conf[opts.API_GROUP]
    if not group.auth_type:
        return GlanceApiSettings()
    try:
        auth = ks_loading.load_auth_from_conf_options(conf, opts.AUTH_GROUP)
        session = ks_loading.load_session_from_conf_options(
            conf, opts.AUTH_GROUP, auth=auth, timeout=group.timeout or API_TIMEOUT)
    except ks_exceptions.MissingRequiredOptions as exc:
        if any(opt.dest == "auth_url" for opt in exc.options):
            return GlanceApiSettings()
        raise ConfigError(f"[{opts.AUTH_GROUP}]: {exc}") from None
    except ks_exceptions.ClientException as exc:  # an unknown auth_type, among others
        raise ConfigError(f"[{opts.AUTH_GROUP}]: {exc}") from None
    return GlanceApiSettings(auth=auth, session=session, region_name=api.region_name,
                             interface=api.interface, endpoint_override=api.endpoint_override)


def kombu_urls(transport_url: str) -> list:
    """kombu URLs, one per broker, from an oslo.messaging transport_url.

    ``rabbit://u:p@h1:5672,u:p@h2:5672/vhost`` becomes
    ``amqp://u:p@h1:5672/vhost`` and ``amqp://u:p@h2:5672/vhost`` (kombu
    fails over between them).
    """
    parsed = urllib.parse.urlsplit(transport_url)
    if parsed.scheme not in ("rabbit", "amqp", "pyamqp"):
        raise ConfigError(
            f"transport_url must start with rabbit:// (got {parsed.scheme or 'no'} scheme)"
        )
    if parsed.query or parsed.fragment:
        raise ConfigError("transport_url: query options are not supported")
    vhost = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
    urls = []
    for host in parsed.netloc.split(","):
        hostport = host.rpartition("@")[2]
        if not hostport:
            raise ConfigError("transport_url names no broker host")
        if not re.search(r":\d+$", hostport):
            # oslo.messaging's default, with TLS too (kombu's would be 5671).
            host += ":5672"
        urls.append(f"amqp://{host}/{vhost}")
    return urls


def redact_url(url: str) -> str:
    """A URL with its password replaced, fit for a log line."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    userinfo, _, hostport = parsed.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urllib.parse.urlunsplit(parsed._replace(netloc=f"{user}:****@{hostport}"))
