"""Settings: every option read and checked once, at start-up.

oslo.config validates lazily, so a bad value would otherwise surface in the
middle of the night, in the middle of a transfer. ``Settings.from_conf`` reads
each option once, checks it against what the rest of the code relies on, and
raises ``ConfigError`` with a message an operator can act on. Below this module
nothing reads ``conf``.
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
from glance_image_sync.nodes import Nodes
from glance_image_sync.opts import REMOVED

_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
# rsync splits its -e string on whitespace and honours quotes: a path that
# needs neither is passed through unchanged.
_SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9_./+@%=,-]*")
_CIPHER_RE = re.compile(r"[a-z0-9][a-z0-9@.-]*")


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
class StoreSettings:
    datadir: str
    file_mode: int | None
    state_dir: str
    deleted_memory: int


@dataclass(frozen=True)
class DeleteSettings:
    grace: int = 24 * 3600  # seconds in the trash; 0: removed at once
    min_free_percent: int = 10  # below this share free, the trash is purged early
    alarm_threshold: int = 20  # more deletes than this in a minute: an alarm


@dataclass(frozen=True)
class TransferSettings:
    user: str
    ssh_config_file: str | None
    connect_timeout: int
    io_timeout: int
    total_timeout: int
    bwlimit: int
    remote_datadir: str
    ciphers: str | None = None  # ssh's Ciphers, or None for its own choice
    control_dir: str | None = None  # where ssh's connection sockets live, if reused
    control_persist: int = 0
    # "absolute": <datadir>/<id> on the peer; "relative": <id>, relative to the
    # directory the peer's rrsync restricts the key to.
    remote_paths: str = "absolute"


@dataclass(frozen=True)
class MetricsSettings:
    listen_address: str = "127.0.0.1"
    listen_port: int = 0  # 0: no endpoint
    textfile: str | None = None


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


@dataclass(frozen=True)
class Settings:
    nodes: Nodes
    broker: BrokerSettings
    topology: TopologySettings
    store: StoreSettings
    transfer: TransferSettings
    max_parallel: int
    max_attempts: int
    metrics: MetricsSettings = MetricsSettings()
    glance_api: GlanceApiSettings = GlanceApiSettings()
    deletes: DeleteSettings = DeleteSettings()

    @classmethod
    def from_conf(cls, conf) -> Settings:
        try:
            nodes = Nodes(conf.api_nodes, conf.host)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        _no_removed_options(conf)
        datadir = _absolute_path(conf.filesystem_store_datadir, "filesystem_store_datadir")
        rabbit = conf.oslo_messaging_rabbit
        return cls(
            nodes=nodes,
            broker=BrokerSettings(
                urls=tuple(kombu_urls(conf.transport_url)),
                heartbeat=conf.heartbeat,
                consumer_timeout=conf.consumer_timeout,
                tls=_tls(rabbit),
            ),
            topology=TopologySettings(
                exchange=_name(conf.notification_exchange, "notification_exchange"),
                topic=_name(conf.notification_topic, "notification_topic"),
                durable=rabbit.amqp_durable_queues or rabbit.rabbit_quorum_queue,
                quorum=rabbit.rabbit_quorum_queue,
                retry_delays=tuple(conf.retry_delays) or (60,),
                auto_delete=rabbit.amqp_auto_delete,
                notification_arguments=_notification_arguments(rabbit),
            ),
            store=StoreSettings(
                datadir=datadir,
                file_mode=_file_mode(conf.image_file_mode),
                state_dir=_absolute_path(conf.state_dir, "state_dir"),
                deleted_memory=conf.deleted_image_memory,
            ),
            transfer=TransferSettings(
                user=_user(conf.rsync_user),
                ssh_config_file=_ssh_config(conf.ssh_config_file),
                connect_timeout=conf.ssh_connect_timeout,
                io_timeout=conf.rsync_timeout,
                total_timeout=conf.transfer_timeout,
                bwlimit=conf.rsync_bwlimit,
                remote_datadir=datadir,
                remote_paths=conf.rsync_remote_paths,
                ciphers=_ciphers(conf.ssh_ciphers),
                **_control(conf.ssh_control_persist, conf.state_dir),
            ),
            max_parallel=conf.max_parallel_transfers,
            max_attempts=conf.max_attempts,
            metrics=MetricsSettings(
                listen_address=conf.metrics_listen_address,
                listen_port=conf.metrics_listen_port,
                textfile=_textfile(conf.metrics_textfile),
            ),
            glance_api=glance_api_settings(conf),
            deletes=_deletes(conf),
        )


def _no_removed_options(conf) -> None:
    for name, replacement in REMOVED.items():
        if conf[name] is not None:
            raise ConfigError(f"{name} was removed: set {replacement} instead, to Glance's "
                              "value (or pass Glance's glance-api.conf as the first "
                              "--config-file), and delete the old line")


def _notification_arguments(rabbit) -> tuple:
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


def _tls(rabbit) -> TlsSettings | None:
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


def _deletes(conf) -> DeleteSettings:
    if conf.deleted_image_grace > conf.deleted_image_memory:
        # A trashed image whose deletion is forgotten could be fetched back by a
        # late upload event while a peer still holds it.
        raise ConfigError(f"deleted_image_grace ({conf.deleted_image_grace} s) must not be "
                          f"longer than deleted_image_memory ({conf.deleted_image_memory} s)")
    return DeleteSettings(grace=conf.deleted_image_grace,
                          min_free_percent=conf.trash_min_free_percent,
                          alarm_threshold=conf.delete_alarm_threshold)


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


def _absolute_path(value: str, name: str) -> str:
    if not value or not os.path.isabs(value) or "\0" in value:
        raise ConfigError(f"{name} must be an absolute path (got {value!r})")
    return os.path.normpath(value)


def _name(value: str, name: str) -> str:
    if not value or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}", value):
        raise ConfigError(f"{name} {value!r} is not a usable AMQP name")
    return value


def _user(value: str) -> str:
    if not value or not _USER_RE.fullmatch(value):
        raise ConfigError(f"rsync_user {value!r} is not a user name")
    return value


def _ssh_config(value: str | None) -> str | None:
    if not value:
        return None
    if not _SAFE_PATH_RE.fullmatch(value):
        raise ConfigError(
            f"ssh_config_file {value!r} must be an absolute path without spaces or quotes"
        )
    if not os.path.isfile(value):
        raise ConfigError(f"ssh_config_file {value} does not exist")
    return value


def _ciphers(names: list) -> str | None:
    for name in names:
        if not _CIPHER_RE.fullmatch(name):
            raise ConfigError(f"ssh_ciphers: {name!r} is not the name of an ssh cipher")
    return ",".join(names) or None


def _textfile(value: str | None) -> str | None:
    if not value:
        return None
    path = _absolute_path(value, "metrics_textfile")
    if not path.endswith(".prom"):
        raise ConfigError(f"metrics_textfile {value} must end in .prom "
                          "(node_exporter reads no other file)")
    if not os.path.isdir(os.path.dirname(path)):
        raise ConfigError(f"metrics_textfile {value}: directory "
                          f"{os.path.dirname(path)} does not exist")
    return path


def _control(persist: int, state_dir: str) -> dict:
    if not persist:
        return {}
    state_dir = os.path.normpath(state_dir)
    if not _SAFE_PATH_RE.fullmatch(state_dir):
        raise ConfigError(f"ssh_control_persist needs a state_dir without spaces or quotes "
                          f"(got {state_dir!r}): ssh's sockets live there; or set "
                          "ssh_control_persist = 0")
    return {"control_dir": state_dir, "control_persist": persist}


def _file_mode(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        mode = int(value, 8)
    except ValueError:
        raise ConfigError(f"image_file_mode {value!r} is not an octal mode like 0640") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"image_file_mode {value!r} must be between 0000 and 0777")
    return mode
