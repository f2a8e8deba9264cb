"""Glance's queue as oslo.messaging's Notifier declares it, whichever side starts first.

For each of Glance's settings (classic, amqp_durable_queues, rabbit_quorum_queue),
oslo.messaging's real Notifier publishes after the fan-out declared the queue,
and the fan-out runs after the Notifier declared it: neither side is refused,
and both orders leave the broker with the same exchange and queue.
"""

import json
import subprocess
import uuid

import pytest
from oslo_config import cfg

from glance_image_sync import service
from glance_image_sync.cmd import commands as cli
from glance_image_sync.fanout.consumer import fanout_loop
from tests.oslonotify import delete_event, notify
from tools.localcluster import rabbitmqctl

pytestmark = pytest.mark.broker
NODES = ("node1", "node2", "node3")
SETTINGS = {
    "classic": {},
    "durable": {"amqp_durable_queues": True},
    "quorum": {"rabbit_quorum_queue": True},
}


def settings_for(vhost, tmp_path, rabbit):
    path = tmp_path / f"{vhost}.conf"
    path.write_text(
        "[DEFAULT]\n"
        f"api_nodes = {','.join(NODES)}\nhost = node1\n"
        f"transport_url = rabbit://guest:guest@127.0.0.1:5672/{vhost}\n"
        f"state_dir = {tmp_path / 'state'}\n"
        "[oslo_messaging_rabbit]\n"
        + "".join(f"{name} = {str(value).lower()}\n" for name, value in rabbit.items()))
    return path, service.prepare(cfg.ConfigOpts(), ["--config-file", str(path), "both"],
                                 cli.COMMAND_OPT)


def glance_url(vhost):
    return f"rabbit://guest:guest@127.0.0.1:5672/{vhost}"


def fan_out_once(settings):
    loop = fanout_loop(settings, once=True)
    try:
        loop.run()
    finally:
        loop.close()
    return loop.component


def glance_publishes(vhost, rabbit, count=1):
    result = notify(glance_url(vhost), [delete_event(str(uuid.uuid4())) for _ in range(count)],
                    rabbit)
    assert result.returncode == 0, result.stderr
    # Glance's notifier logs a refused publish, and goes on: it must have nothing to say.
    assert "PRECONDITION_FAILED" not in result.stderr
    assert "Could not send notification" not in result.stderr, result.stderr


def declared(vhost):
    """What the broker holds for Glance: (exchange row, queue row)."""
    exchanges = rabbitmqctl("list_exchanges", "-p", vhost, "name", "type", "durable",
                            "auto_delete", "arguments").stdout
    queues = rabbitmqctl("list_queues", "-p", vhost, "name", "type", "durable", "auto_delete",
                         "arguments").stdout
    exchange = next(line for line in exchanges.splitlines() if line.startswith("glance\t"))
    queue = next(line for line in queues.splitlines()
                 if line.startswith("glance_notifications.info\t"))
    return exchange, queue


@pytest.mark.parametrize("kind", sorted(SETTINGS))
def test_either_side_first_declares_the_same_queue_and_neither_is_refused(
        vhost, other_vhost, tmp_path, kind):
    rabbit = SETTINGS[kind]
    # The fan-out first, then Glance.
    _, ours = settings_for(vhost, tmp_path, rabbit)
    fan_out_once(ours)
    glance_publishes(vhost, rabbit)
    first = fan_out_once(ours)
    assert first.handled == 1 and not first.mismatches
    # Glance first, then the fan-out.
    _, ours_too = settings_for(other_vhost, tmp_path, rabbit)
    glance_publishes(other_vhost, rabbit)
    second = fan_out_once(ours_too)
    assert second.handled == 1 and not second.mismatches

    assert declared(vhost) == declared(other_vhost)
    exchange, queue = declared(vhost)
    durable = "true" if kind != "classic" else "false"
    assert exchange.split("\t")[1:4] == ["topic", durable, "false"]
    assert queue.split("\t")[1:4] == ["quorum" if kind == "quorum" else "classic", durable,
                                      "false"]


def test_a_queue_glance_declared_otherwise_is_consumed_as_it_is_and_status_says_so(
        vhost, tmp_path, capsys):
    glance_publishes(vhost, SETTINGS["quorum"], count=2)  # Glance: rabbit_quorum_queue = true
    path, ours = settings_for(vhost, tmp_path, SETTINGS["classic"])  # we were not told
    capsys.readouterr()
    fanout = fan_out_once(ours)
    assert fanout.handled == 2  # consumed as it is
    # oslo.log's handler (set up by service.prepare) writes to stderr.
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert ("fan-out: queue glance_notifications.info (and its exchange glance) exists with "
            "other arguments than [oslo_messaging_rabbit] rabbit_quorum_queue gives it "
            "(PRECONDITION_FAILED - inequivalent arg 'durable'") in errors[0]
    # Glance goes on publishing, unharmed.
    glance_publishes(vhost, SETTINGS["quorum"])
    assert declared(vhost)[1].split("\t")[1] == "quorum"

    result = subprocess.run([*cli_argv(path), "status", "--format", "json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    problems = json.loads(result.stdout)["problems"]
    assert any("glance_notifications.info exists with other arguments than "
               "[oslo_messaging_rabbit] rabbit_quorum_queue" in p for p in problems), problems


def cli_argv(path):
    import sys
    return [sys.executable, "-m", "glance_image_sync", "--config-file", str(path)]
