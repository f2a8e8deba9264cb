"""Fixtures for the integration tiers: a virtual host, a local cluster.

Unit tests need none of this. ``-m "not cluster and not broker and not
systemd"`` runs only them; the integration tiers fail loudly (they are not
skipped) when what they need is missing, except for root, without which they
cannot run at all.
"""

import contextlib
import logging
import os
import uuid

import pytest

from tools.localcluster import LocalCluster, broker_running, rabbitmqctl
from tools.rabbitnodes import RabbitNodes


@pytest.fixture(autouse=True)
def _close_log_files_of_the_test():
    """Close the log files a test's in-process command opened.

    oslo.log's setup (any command run in-process) puts a WatchedFileHandler on
    the root logger for the test's log_file. Left there, it reopens that path
    on every later log call of the session, and raises FileNotFoundError from
    inside the logging call once the test's directory is removed: later tests
    then fail wherever the code logs.
    """
    root = logging.getLogger()
    before = set(root.handlers)
    yield
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and handler not in before:
            root.removeHandler(handler)
            handler.close()


def _need_broker():
    if not broker_running():
        pytest.fail("RabbitMQ is not running on 127.0.0.1:5672 (rabbitmq-server -detached)")


def _own_vhost():
    _need_broker()
    if os.geteuid() != 0:
        pytest.skip("creating a virtual host needs rabbitmqctl, as root")
    name = f"gis-test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name
    finally:
        if broker_running():
            rabbitmqctl("delete_vhost", name, check=False)


@pytest.fixture
def vhost():
    """A RabbitMQ virtual host of this test's own; yields its name."""
    yield from _own_vhost()


@pytest.fixture
def other_vhost():
    """A second virtual host of this test's own, to compare two runs side by side."""
    yield from _own_vhost()


@pytest.fixture
def cluster(request):
    """A started three-node local cluster.

    ``@pytest.mark.cluster_config(option=value, ...)`` adds glance-image-sync
    options; ``@pytest.mark.cluster_setup(durable=..., store_sizes=...)`` passes
    LocalCluster's own. ``@pytest.mark.own_broker(setting=value, ...)``: the
    cluster uses a RabbitMQ node of the test's own (``cluster.brokers``), with
    those settings of the rabbit application, for a test that restarts the
    broker or changes what the shared one would change for every other test.
    """
    _need_broker()
    if os.geteuid() != 0:
        pytest.skip("the local cluster needs root")
    config = request.node.get_closest_marker("cluster_config")
    setup = request.node.get_closest_marker("cluster_setup")
    own_broker = request.node.get_closest_marker("own_broker")
    with contextlib.ExitStack() as stack:
        brokers = stack.enter_context(RabbitNodes(1, rabbit_env=own_broker.kwargs)) \
            if own_broker else None
        yield stack.enter_context(LocalCluster(
            extra_config=config.kwargs if config else None, brokers=brokers,
            **(setup.kwargs if setup else {})))
