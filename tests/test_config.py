"""Options, Settings, and the generated sample configuration."""

import importlib.metadata
import logging
import pathlib
import subprocess
import sys

import pytest
from oslo_config import cfg
from oslo_log import handlers, log

from glance_image_sync import service
from glance_image_sync.cmd import commands as cli
from glance_image_sync.exceptions import ConfigError
from glance_image_sync.settings import kombu_urls, redact_url

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _prepare(tmp_path, text, command="both"):
    path = tmp_path / "glance-image-sync.conf"
    path.write_text("[DEFAULT]\n" + text)
    conf = cfg.ConfigOpts()
    settings = service.prepare(conf, ["--config-file", str(path), command], cli.COMMAND_OPT)
    return conf, settings


def test_legacy_configuration_still_works(tmp_path):
    conf, settings = _prepare(tmp_path, "api_nodes = node1,node2.example.com\nhost = node2\n"
                              "rsync_user = someone\nverbose = True\n"
                              "rabbit_notification_topic = old_topic\n")
    assert settings.nodes.all == ("node1", "node2.example.com")
    assert settings.nodes.this == "node2.example.com"
    assert settings.transfer.user == "someone"
    assert settings.topology.topic == "old_topic"
    assert settings.topology.durable is False
    assert settings.store.datadir == "/var/lib/glance/images"
    assert conf.command.name == "both"


@pytest.mark.parametrize("text, message", [
    ("api_nodes = node1\nhost = node7\n", "not one of api_nodes"),
    ("api_nodes = node1\nhost = node1\nrsync_user = root;id\n", "not a user name"),
    ("api_nodes = node1\nhost = node1\nssh_config_file = /no/such/file\n", "does not exist"),
    ("api_nodes = node1\nhost = node1\nssh_config_file = /a b\n", "without spaces"),
    ("api_nodes = node1\nhost = node1\nfilesystem_store_datadir = images\n", "absolute path"),
    ("api_nodes = node1\nhost = node1\nimage_file_mode = 0999\n", "octal mode"),
    ("api_nodes = node1\nhost = node1\nheartbeat = 2\n", "heartbeat"),
    ("api_nodes = node1\nhost = node1\ntransport_url = redis://x/\n", "rabbit://"),
    ("api_nodes = node1\nhost = node1\nqueue_type = quorum\n",
     r"queue_type was removed: set \[oslo_messaging_rabbit\] rabbit_quorum_queue instead"),
    ("api_nodes = node1\nhost = node1\nnotification_durable = true\n",
     r"notification_durable was removed: set \[oslo_messaging_rabbit\] amqp_durable_queues"),
    ("api_nodes = node1\nhost = node1\nssh_control_persist = 60\nstate_dir = /a b\n",
     "ssh_control_persist needs a state_dir without spaces"),
    ("api_nodes = node1\nhost = node1\nssh_ciphers = aes128-ctr,x -oProxyCommand=id\n",
     "not the name of an ssh cipher"),
    ("api_nodes = node1\nhost = node1\ndeleted_image_grace = 90000\n"
     "deleted_image_memory = 86400\n", "must not be longer than deleted_image_memory"),
    ("api_nodes = node1\nhost = node1\ntrash_min_free_percent = 95\n",
     "trash_min_free_percent"),
    ("api_nodes = node1\nhost = node1\ndelete_alarm_threshold = 0\n",
     "delete_alarm_threshold"),
])
def test_bad_values_are_refused_at_start_up_with_a_reason(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _prepare(tmp_path, text)


def test_bad_configuration_exits_2_with_a_message(tmp_path, capsys):
    path = tmp_path / "c.conf"
    path.write_text("[DEFAULT]\napi_nodes = node1\nhost = elsewhere\n")
    assert cli.main(["--config-file", str(path), "both"]) == 2
    assert "host 'elsewhere' is not one of api_nodes" in capsys.readouterr().err


def test_transport_urls_become_kombu_urls_and_never_show_a_password():
    assert kombu_urls("rabbit://u:p%40ss@h1:5672,u:p@h2:5673/glance") == [
        "amqp://u:p%40ss@h1:5672/glance", "amqp://u:p@h2:5673/glance"]
    assert kombu_urls("rabbit://guest:guest@localhost:5672/") == [
        "amqp://guest:guest@localhost:5672/"]
    assert redact_url("amqp://u:s3cret@h1:5672/v") == "amqp://u:****@h1:5672/v"


def test_sample_configuration_is_generated_and_current(tmp_path):
    generated = tmp_path / "sample.conf"
    subprocess.run(
        [sys.executable, "-m", "oslo_config.generator",
         "--config-file", str(ROOT / "etc/oslo-config-generator/glance-image-sync.conf"),
         "--output-file", str(generated)],
        check=True, cwd=ROOT)
    committed = (ROOT / "etc/glance-image-sync.conf.sample").read_text()
    assert generated.read_text() == committed, (
        "etc/glance-image-sync.conf.sample is stale: run tools/generate-sample-config")


@pytest.mark.parametrize("text, message", [
    ("metrics_textfile = relative.prom\n", "absolute path"),
    ("metrics_textfile = /tmp/glance-image-sync.txt\n", "must end in .prom"),
    ("metrics_textfile = /no/such/dir/x.prom\n", "does not exist"),
    ("metrics_listen_port = 70000\n", "metrics_listen_port"),
    ("metrics_listen_address = not an address!\n", "metrics_listen_address"),
])
def test_bad_metrics_options_are_refused_at_start_up(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _prepare(tmp_path, "api_nodes = node1\nhost = node1\n" + text)


def test_metrics_are_off_and_on_loopback_by_default(tmp_path):
    _, settings = _prepare(tmp_path, "api_nodes = node1\nhost = node1\n")
    assert settings.metrics.listen_port == 0
    assert settings.metrics.listen_address == "127.0.0.1"
    assert settings.metrics.textfile is None
    _, settings = _prepare(tmp_path, "api_nodes = node1\nhost = node1\n"
                           f"metrics_textfile = {tmp_path}/gis.prom\n")
    assert settings.metrics.textfile == f"{tmp_path}/gis.prom"


def test_ssh_reuses_connections_and_prefers_aes_gcm_by_default(tmp_path):
    _, settings = _prepare(tmp_path, "api_nodes = node1\nhost = node1\n")
    assert settings.transfer.control_persist == 60
    assert settings.transfer.control_dir == "/var/lib/glance-image-sync"
    assert settings.transfer.ciphers.startswith("aes128-gcm@openssh.com,")
    # Every cipher of OpenSSH's default set stays on offer: any peer still agrees on one.
    for default in ("chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr",
                    "aes256-gcm@openssh.com"):
        assert default in settings.transfer.ciphers.split(",")


def test_empty_ssh_ciphers_and_zero_persist_leave_ssh_to_itself(tmp_path):
    _, settings = _prepare(tmp_path, "api_nodes = node1\nhost = node1\nssh_ciphers =\n"
                           "ssh_control_persist = 0\n")
    assert settings.transfer.ciphers is None
    assert settings.transfer.control_dir is None


def test_the_package_runs_as_a_module_and_says_its_version():
    result = subprocess.run([sys.executable, "-m", "glance_image_sync", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == importlib.metadata.version("glance-image-sync")


def test_logs_on_a_stream_carry_no_terminal_escapes_unless_colours_are_asked_for(
        tmp_path, capsys):
    """oslo.log 5.0.1 (Debian 12) puts its ColorHandler on stdout whatever the options: each
    line would end in ESC[00m, and reach the journal as binary data."""
    conf = cfg.ConfigOpts()
    log.register_options(conf)
    conf([])
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        # oslo.log 5.0.1 has no log_color: no colours can be asked for.
        for colours in (False, True) if "log_color" in conf else (False,):
            if colours:
                conf.set_override("log_color", True)
            log.setup(conf, "test")
            for handler in list(root.handlers):  # as oslo.log 5.0.1 sets itself up
                if type(handler) is logging.StreamHandler:
                    root.removeHandler(handler)
                    root.addHandler(handlers.ColorHandler(handler.stream))
            service._replace_handlers(conf)
            logging.getLogger("test").warning("a line")
            out = capsys.readouterr().out
            assert out.endswith("a line\033[00m\n" if colours else "a line\n"), repr(out)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in before:
            root.addHandler(handler)


def test_the_journal_handler_sends_the_image_id_beside_oslo_logs_own_fields():
    assert set(service.ImageJournalHandler.custom_fields) == {
        *handlers.OSJournalHandler.custom_fields, "image_id"}
