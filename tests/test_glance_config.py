"""Glance's own glance-api.conf as the first --config-file: the two cannot disagree."""

import pathlib
import ssl
import warnings

import pytest
from oslo_config import cfg

from glance_image_sync import opts, service
from glance_image_sync.broker import connection, topology
from glance_image_sync.cmd import commands as cli
from glance_image_sync.exceptions import ConfigError

GLANCE_API_CONF = pathlib.Path(__file__).parent / "fixtures/glance/glance-api.conf"


def _oslo_messaging_options() -> dict:
    with warnings.catch_warnings():  # oslo.messaging still imports eventlet
        warnings.simplefilter("ignore")
        import oslo_messaging.opts
    return {opt.name: opt for group, group_opts in oslo_messaging.opts.list_opts()
            if group == "oslo_messaging_rabbit" for opt in group_opts}


def test_the_rabbit_options_are_oslo_messagings_own_name_type_and_default():
    theirs = _oslo_messaging_options()
    for ours in opts.rabbit_opts:
        assert ours.name in theirs, ours.name
        assert type(ours) is type(theirs[ours.name]), ours.name
        assert ours.default == theirs[ours.name].default, ours.name
    names = {opt.name for opt in opts.rabbit_opts}
    assert {"rabbit_quorum_queue", "amqp_durable_queues", "ssl", "ssl_ca_file", "ssl_cert_file",
            "ssl_key_file", "ssl_version"} <= names


def _prepare(*paths):
    argv = [arg for path in paths for arg in ("--config-file", str(path))] + ["both"]
    conf = cfg.ConfigOpts()
    return conf, service.prepare(conf, argv, cli.COMMAND_OPT)


def _glance_conf(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("a CA\n")
    path = tmp_path / "glance-api.conf"
    path.write_text(GLANCE_API_CONF.read_text().replace("@CA@", str(ca)))
    return path, ca


def _own_conf(tmp_path, extra=""):
    path = tmp_path / "glance-image-sync.conf"
    path.write_text("[DEFAULT]\napi_nodes = node1,node2\nhost = node1\n"
                    f"state_dir = {tmp_path / 'state'}\nlog_file = {tmp_path / 'gis.log'}\n"
                    + extra)
    return path


def test_glances_own_file_gives_its_broker_settings_and_the_rest_is_ignored(tmp_path):
    glance, ca = _glance_conf(tmp_path)
    conf, settings = _prepare(glance, _own_conf(tmp_path))
    broker = settings.broker
    assert [connection.redact_url(url) for url in broker.urls] == [
        f"amqp://openstack:****@controller{n}:5671//" for n in (1, 2, 3)]
    assert broker.tls.ca_file == str(ca) and broker.tls.cert_file is None
    topo = settings.topology
    assert topo.quorum and topo.durable and not topo.auto_delete
    assert dict(topo.notification_arguments) == {"x-queue-type": "quorum",
                                                 "x-delivery-limit": 20}
    # Declared as oslo.messaging's notifier declares it with these settings.
    queue = topology.notification_queue(topo)
    assert (queue.name, queue.durable, queue.auto_delete, queue.queue_arguments) == (
        "glance_notifications.info", True, False,
        {"x-queue-type": "quorum", "x-delivery-limit": 20})
    assert (queue.exchange.name, queue.exchange.type, queue.exchange.durable) == (
        "glance", "topic", True)
    assert all(q.queue_arguments == {**(q.queue_arguments or {}), "x-queue-type": "quorum"}
               and q.durable for q in topology.node_queues("node1", topo))
    # The later file wins where both set an option (oslo.log's log_dir comes from Glance's).
    assert conf.log_file == str(tmp_path / "gis.log")
    assert conf.log_dir == "/var/log/glance"


def test_with_glances_file_first_our_file_cannot_change_the_broker_settings_silently(
        tmp_path):
    """An operator who sets them again in our file overrides Glance's: said in the README;
    here: the order of the files decides, as in every oslo.config program."""
    glance, _ = _glance_conf(tmp_path)
    _, settings = _prepare(glance, _own_conf(
        tmp_path, "[oslo_messaging_rabbit]\nrabbit_quorum_queue = false\n"))
    assert settings.topology.quorum is False and settings.topology.durable is True


@pytest.mark.parametrize("rabbit, message", [
    ("ssl = true\nssl_ca_file = /no/such/ca.pem\n", "ssl_ca_file /no/such/ca.pem does not exist"),
    ("ssl = true\nssl_version = TLSv9\n", "ssl_version 'TLSv9' is not one this Python offers"),
    ("rabbit_quorum_queue = true\nrabbit_ha_queues = true\n", "quorum or mirrored, not both"),
])
def test_bad_rabbit_settings_are_refused_at_start_up(tmp_path, rabbit, message):
    with pytest.raises(ConfigError, match=message):
        _prepare(_own_conf(tmp_path, "[oslo_messaging_rabbit]\n" + rabbit))


def test_tls_always_verifies_the_broker_and_its_host_name(tmp_path):
    _, settings = _prepare(_own_conf(tmp_path, "transport_url = rabbit://u:p@b1,u:p@b2:5671/\n"
                                     "[oslo_messaging_rabbit]\nssl = true\n"
                                     "ssl_version = TLSv1_2\n"))
    # oslo.messaging's default port, TLS or not.
    assert settings.broker.urls == ("amqp://u:p@b1:5672/", "amqp://u:p@b2:5671/")
    conns = [connection.connection(settings.broker, url) for url in settings.broker.urls]
    assert [c.ssl["server_hostname"] for c in conns] == ["b1", "b2"]
    assert all(c.ssl["cert_reqs"] == ssl.CERT_REQUIRED for c in conns)
    assert conns[0].ssl["ca_certs"] is None  # the system's CAs
    assert conns[0].ssl["ssl_version"] == ssl.PROTOCOL_TLSv1_2
    assert "certfile" not in conns[0].ssl
    assert conns[0].transport_options["write_timeout"] == connection.WRITE_TIMEOUT
    (tmp_path / "plain").mkdir()
    _, plain = _prepare(_own_conf(tmp_path / "plain"))
    assert connection.connection(plain.broker, plain.broker.urls[0]).ssl is False


def test_a_tls_connection_cut_short_says_what_it_most_likely_means(tmp_path):
    import socket
    import threading

    from glance_image_sync.exceptions import BrokerUnavailable

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def hang_up():  # as a broker that refuses the client's certificate, without a word
        peer, _ = server.accept()
        peer.recv(1)  # the client's hello: the handshake has begun
        peer.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    _, settings = _prepare(_own_conf(tmp_path, f"transport_url = rabbit://u:p@127.0.0.1:{port}/\n"
                                     "[oslo_messaging_rabbit]\nssl = true\n"))
    try:
        with pytest.raises(BrokerUnavailable,
                           match="it may refuse a connection without a client certificate"):
            connection.connect(settings.broker)
    finally:
        thread.join(5)
        server.close()
