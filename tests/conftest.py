"""Fixtures for the integration tiers: a virtual host, a local cluster.

Unit tests need none of this. ``-m "not cluster and not broker and not
systemd"`` runs only them; the integration tiers fail loudly (they are not
skipped) when what they need is missing, except for root, without which they
cannot run at all.
"""

import logging
import os
import uuid

import pytest

from tools.localcluster import LocalCluster, broker_running, rabbitmqctl


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


@pytest.fixture
def vhost():
    """A RabbitMQ virtual host of this test's own; yields its kombu URL."""
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
def cluster(request):
    """A started three-node local cluster.

    ``@pytest.mark.cluster_config(option=value, ...)`` adds glance-image-sync
    options; ``@pytest.mark.cluster_setup(durable=..., store_sizes=...)`` passes
    LocalCluster's own.
    """
    _need_broker()
    if os.geteuid() != 0:
        pytest.skip("the local cluster needs root")
    config = request.node.get_closest_marker("cluster_config")
    setup = request.node.get_closest_marker("cluster_setup")
    with LocalCluster(extra_config=config.kwargs if config else None,
                      **(setup.kwargs if setup else {})) as started:
        yield started
