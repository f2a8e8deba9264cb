"""TLS to a real RabbitMQ TLS listener of the tests' own (tools/rabbitnodes.py).

The node's certificates come from a CA made here: a server certificate for
127.0.0.1 and localhost, a client certificate, an expired one, a second CA.
The same TLS listener also answers on 127.0.0.2, which its certificate does
not name. Verification is on by default; each failure is one line that says
what failed, in the log of the daemon (which retries) and of the one-shot
commands (which exit 1).
"""

import os
import signal
import subprocess
import sys
import uuid

import pytest

from tests.helpers import write_config
from tests.oslonotify import delete_event, notify
from tools.localcluster import wait_for
from tools.rabbitnodes import RabbitNodes

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def tls_broker():
    if os.geteuid() != 0:
        pytest.skip("a RabbitMQ node of the tests' own needs root")
    with RabbitNodes(1, tls=True) as nodes:
        yield nodes


@pytest.fixture
def broker_vhost(tls_broker):
    name = f"gis-tls-{uuid.uuid4().hex[:8]}"
    tls_broker.ctl("add_vhost", name)
    tls_broker.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    tls_broker.ctl("delete_vhost", name, check=False)


def run(config, *args):
    return subprocess.run([sys.executable, "-m", "glance_image_sync", "--config-file",
                           str(config), *args], capture_output=True, text=True, timeout=120)


def configure(tmp_path, url, **rabbit):
    (tmp_path / "images").mkdir(exist_ok=True)
    return write_config(tmp_path, transport_url=url, log_file=str(tmp_path / "gis.log"),
                        rabbit={"ssl": "true", **rabbit})


def messages(tls_broker, vhost):
    out = tls_broker.ctl("list_queues", "-p", vhost, "name", "messages").stdout
    return {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}


def test_notifications_cross_tls_with_a_client_certificate(tls_broker, broker_vhost, tmp_path):
    certs, node = tls_broker.certs, tls_broker[0]
    url = f"rabbit://guest:guest@{node.tls_address}/{broker_vhost}"
    config = configure(tmp_path, url, ssl_ca_file=certs.ca, ssl_cert_file=certs.client[0],
                       ssl_key_file=certs.client[1])
    assert run(config, "duplicate-notifications").returncode == 0  # declares Glance's queue
    # Glance's side over TLS, verifying with the same CA, as oslo.messaging does.
    glance = notify(url, [delete_event(str(uuid.uuid4()))],
                    {"ssl": True, "ssl_ca_file": str(certs.ca)})
    assert glance.returncode == 0 and "Could not send" not in glance.stderr, glance.stderr
    result = run(config, "duplicate-notifications")
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "gis.log").read_text()
    assert f"fan-out: connected to amqp://guest:****@{node.tls_address}/{broker_vhost}" in log
    depths = messages(tls_broker, broker_vhost)
    assert depths["glance_notifications.info"] == 0
    assert [depths[f"glance_image_sync.node{n}"] for n in (1, 2, 3)] == [1, 1, 1]


FAILURES = {
    # name: (transport_url host, [oslo_messaging_rabbit] options, what the line says)
    "a CA that did not sign the broker's certificate": (
        "localhost", lambda c: {"ssl_ca_file": c.other_ca},
        "SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
        "failed: self-signed certificate in certificate chain"),
    "a certificate for another name": (
        "127.0.0.2", lambda c: {"ssl_ca_file": c.ca},
        "SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
        "failed: IP address mismatch, certificate is not valid for '127.0.0.2'"),
    # The broker's alert says why, unless (TLS 1.3) its reset overtakes the alert.
    "an expired client certificate": (
        "localhost", lambda c: {"ssl_ca_file": c.ca, "ssl_cert_file": c.expired[0],
                                "ssl_key_file": c.expired[1]},
        ("certificate expired", "it may refuse the client certificate ssl_cert_file")),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_tls_failure_is_one_line_saying_what_failed(tls_broker, broker_vhost, tmp_path,
                                                      failure):
    host, options, says = FAILURES[failure]
    port = tls_broker[0].tls_port
    config = configure(tmp_path, f"rabbit://guest:guest@{host}:{port}/{broker_vhost}",
                       **options(tls_broker.certs))
    result = run(config, "duplicate-notifications")
    assert result.returncode == 1
    log = (tmp_path / "gis.log").read_text()
    assert "Traceback" not in log + result.stderr
    given_up = [line for line in log.splitlines() if "giving up" in line]
    assert len(given_up) == 1, log
    assert (f"giving up: cannot reach the broker (amqp://guest:****@{host}:{port}/"
            f"{broker_vhost}: ") in given_up[0]
    says = (says,) if isinstance(says, str) else says
    assert any(text in given_up[0] for text in says), given_up[0]
    status = run(config, "status")
    assert status.returncode == 1 and any(text in status.stdout for text in says), \
        status.stdout


def test_the_daemon_logs_a_tls_failure_in_one_line_and_keeps_trying(tls_broker, broker_vhost,
                                                                    tmp_path):
    config = configure(tmp_path, f"rabbit://guest:guest@{tls_broker[0].tls_address}/"
                       f"{broker_vhost}", ssl_ca_file=tls_broker.certs.other_ca)
    daemon = subprocess.Popen([sys.executable, "-m", "glance_image_sync", "--config-file",
                               str(config), "daemon"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    log = tmp_path / "gis.log"
    try:
        wait_for(lambda: log.exists() and log.read_text().count(
            "CERTIFICATE_VERIFY_FAILED") >= 4, 30, what="a few attempts")
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
    assert code == 0
    text = log.read_text()
    assert "Traceback" not in text + daemon.stderr.read()
    failed = [line for line in text.splitlines() if "CERTIFICATE_VERIFY_FAILED" in line]
    assert all("WARNING" in line and "reconnecting in" in line for line in failed)


def test_an_expired_broker_certificate_is_one_line_too(tls_broker, tmp_path):
    """Last in the module: the node restarts with the expired certificate."""
    node = tls_broker[0]
    node.stop()
    node.use_server_certificate(tls_broker.certs.expired)
    node.start()
    node.wait_started()
    config = configure(tmp_path, f"rabbit://guest:guest@{node.tls_address}/",
                       ssl_ca_file=tls_broker.certs.ca)
    result = run(config, "both")
    assert result.returncode == 1
    log = (tmp_path / "gis.log").read_text()
    assert "Traceback" not in log + result.stderr
    given_up = [line for line in log.splitlines() if "giving up" in line]
    assert len(given_up) == 1, log
    assert ("SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
            "failed: certificate has expired") in given_up[0]
