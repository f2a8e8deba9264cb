"""doctor against the real RabbitMQ: credentials, virtual host, Glance's queue and its flags."""

import kombu
import pytest

from glance_image_sync.admin import doctor_broker
from glance_image_sync.admin.checks import FAIL, PASS, SKIP
from tests.helpers import settings_for

pytestmark = pytest.mark.broker


def checks(tmp_path, url, **options) -> dict:
    settings = settings_for(tmp_path, transport_url=url, **options)
    return {check.name: check for check in doctor_broker.checks(settings)}


def test_a_wrong_password_fails_with_its_fix_and_the_password_hidden(tmp_path, vhost):
    found = checks(tmp_path, f"rabbit://guest:wrong-secret@127.0.0.1:5672/{vhost}")
    broker = found["broker"]
    assert broker.status == FAIL and "ACCESS_REFUSED" in broker.detail
    assert broker.detail.startswith(f"amqp://guest:****@127.0.0.1:5672/{vhost} refused the "
                                    "credentials")
    assert "correct user 'guest' or its password in transport_url" in broker.fix
    assert "wrong-secret" not in broker.detail + broker.fix
    assert found["glance queue"].status == SKIP and found["glance publishes"].status == SKIP


def test_a_virtual_host_that_does_not_exist_fails_with_its_fix(tmp_path, vhost):
    found = checks(tmp_path, f"rabbit://guest:guest@127.0.0.1:5672/{vhost}-gone")
    assert found["broker"].status == FAIL and "NOT_ALLOWED" in found["broker"].detail
    assert f"set_permissions -p {vhost}-gone guest" in found["broker"].fix


def test_each_broker_of_the_transport_url_is_checked(tmp_path, vhost):
    found = doctor_broker.checks(settings_for(
        tmp_path, transport_url=f"rabbit://guest:guest@127.0.0.1:5672,guest:guest@127.0.0.1:1/"
        f"{vhost}"))
    assert [(c.name, c.status) for c in found[:2]] == [("broker", PASS), ("broker", FAIL)]
    assert "RabbitMQ" in found[0].detail and "127.0.0.1:1" in found[1].detail


def test_glance_queue_missing_then_present_with_a_notification_waiting(tmp_path, vhost):
    url = f"rabbit://guest:guest@127.0.0.1:5672/{vhost}"
    found = checks(tmp_path, url)
    assert found["broker"].status == PASS
    assert found["glance queue"].status == FAIL
    assert found["glance queue"].detail == "glance_notifications.info does not exist"
    assert "add glance_notifications to [oslo_messaging_notifications] topics" in \
        found["glance queue"].fix
    assert found["glance publishes"].status == FAIL
    assert "upload an image and run doctor again" in found["glance publishes"].fix

    with kombu.Connection(f"amqp://guest:guest@127.0.0.1:5672/{vhost}") as connection:
        exchange = kombu.Exchange("glance", type="topic", durable=False)
        queue = kombu.Queue("glance_notifications.info", exchange,
                            routing_key="glance_notifications.info", durable=False)
        connection.Producer().publish(b"{}", exchange=exchange, declare=[queue],
                                      routing_key="glance_notifications.info", retry=True)
    found = checks(tmp_path, url)
    assert found["glance queue"].status == PASS
    assert "exists (not durable, as [oslo_messaging_rabbit] says): 1 message waiting" in \
        found["glance queue"].detail
    assert found["glance publishes"].status == PASS
    assert "1 notification wait in glance_notifications.info" in found["glance publishes"].detail


def test_a_queue_whose_flags_differ_from_amqp_durable_queues_fails_and_stays(tmp_path, vhost):
    with kombu.Connection(f"amqp://guest:guest@127.0.0.1:5672/{vhost}") as connection:
        kombu.Queue("glance_notifications.info", durable=True).bind(connection.channel()).declare()
    found = checks(tmp_path, f"rabbit://guest:guest@127.0.0.1:5672/{vhost}")
    check = found["glance queue"]
    assert check.status == FAIL and "PRECONDITION_FAILED" in check.detail
    assert "other arguments than [oslo_messaging_rabbit] amqp_durable_queues" in check.detail
    assert "Glance's own amqp_durable_queues" in check.fix
    # Still there, still durable: doctor's declaration changed nothing.
    found = checks(tmp_path, f"rabbit://guest:guest@127.0.0.1:5672/{vhost}",
                   rabbit={"amqp_durable_queues": "true"})
    assert found["glance queue"].status == PASS
    assert "exists (durable, as [oslo_messaging_rabbit] says)" in found["glance queue"].detail


def test_a_quorum_queue_declared_by_glance_is_named_as_such(tmp_path, vhost):
    # What oslo.messaging declares with rabbit_quorum_queue = true (Kolla-Ansible's).
    with kombu.Connection(f"amqp://guest:guest@127.0.0.1:5672/{vhost}") as connection:
        kombu.Queue("glance_notifications.info", durable=True,
                    queue_arguments={"x-queue-type": "quorum"}).bind(
                        connection.channel()).declare()
    found = checks(tmp_path, f"rabbit://guest:guest@127.0.0.1:5672/{vhost}",
                   rabbit={"amqp_durable_queues": "true"})
    check = found["glance queue"]
    assert check.status == FAIL and "x-queue-type" in check.detail
    assert "other arguments than [oslo_messaging_rabbit] rabbit_quorum_queue" in check.detail
    assert "Glance's own rabbit_quorum_queue" in check.fix
    found = checks(tmp_path, f"rabbit://guest:guest@127.0.0.1:5672/{vhost}",
                   rabbit={"rabbit_quorum_queue": "true"})
    assert found["glance queue"].status == PASS
    assert "exists (quorum, as [oslo_messaging_rabbit] says)" in found["glance queue"].detail
