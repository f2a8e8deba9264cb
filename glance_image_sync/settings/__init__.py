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
from dataclasses import dataclass

from glance_image_sync.exceptions import ConfigError
from glance_image_sync.nodes import Nodes
from glance_image_sync.settings.glance import (  # noqa: F401 - re-exported
    API_TIMEOUT,
    SSL_VERSIONS,
    BrokerSettings,
    GlanceApiSettings,
    TlsSettings,
    TopologySettings,
    glance_api_settings,
    kombu_urls,
    notification_arguments,
    redact_url,
    refuse_removed_options,
    tls_settings,
)

_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
# rsync splits its -e string on whitespace and honours quotes: a path that
# needs neither is passed through unchanged.
_SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9_./+@%=,-]*")
_CIPHER_RE = re.compile(r"[a-z0-9][a-z0-9@.-]*")


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
    # Stream new images along the chain of nodes (sync.sources); False: all from the publisher.
    relay: bool = True
    relay_wait: int = 10  # seconds to wait for the upstream node to start receiving


@dataclass(frozen=True)
class MetricsSettings:
    listen_address: str = "127.0.0.1"
    listen_port: int = 0  # 0: no endpoint
    textfile: str | None = None


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
        refuse_removed_options(conf)
        datadir = _absolute_path(conf.filesystem_store_datadir, "filesystem_store_datadir")
        rabbit = conf.oslo_messaging_rabbit
        return cls(
            nodes=nodes,
            broker=BrokerSettings(
                urls=tuple(kombu_urls(conf.transport_url)),
                heartbeat=conf.heartbeat,
                consumer_timeout=conf.consumer_timeout,
                tls=tls_settings(rabbit),
            ),
            topology=TopologySettings(
                exchange=_name(conf.notification_exchange, "notification_exchange"),
                topic=_name(conf.notification_topic, "notification_topic"),
                durable=rabbit.amqp_durable_queues or rabbit.rabbit_quorum_queue,
                quorum=rabbit.rabbit_quorum_queue,
                retry_delays=tuple(conf.retry_delays) or (60,),
                auto_delete=rabbit.amqp_auto_delete,
                notification_arguments=notification_arguments(rabbit),
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
                relay=conf.relay,
                relay_wait=conf.relay_wait,
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


def _deletes(conf) -> DeleteSettings:
    if conf.deleted_image_grace > conf.deleted_image_memory:
        # A trashed image whose deletion is forgotten could be fetched back by a
        # late upload event while a peer still holds it.
        raise ConfigError(f"deleted_image_grace ({conf.deleted_image_grace} s) must not be "
                          f"longer than deleted_image_memory ({conf.deleted_image_memory} s)")
    return DeleteSettings(grace=conf.deleted_image_grace,
                          min_free_percent=conf.trash_min_free_percent,
                          alarm_threshold=conf.delete_alarm_threshold)


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


# Also theirs, for those who read settings: the broker's and the API's.
__all__ = ["API_TIMEOUT", "SSL_VERSIONS", "BrokerSettings", "DeleteSettings",
           "GlanceApiSettings", "MetricsSettings", "Settings", "StoreSettings", "TlsSettings",
           "TopologySettings", "TransferSettings", "glance_api_settings", "kombu_urls",
           "redact_url"]
