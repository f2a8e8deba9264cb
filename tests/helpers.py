"""What unit tests share: settings built the way the command builds them."""

from oslo_config import cfg

from glance_image_sync import service
from glance_image_sync.cmd.commands import COMMAND_OPT

NODES = ("node1", "node2", "node3")


def write_config(tmp_path, rabbit=None, **options):
    """A configuration file for node1 of a three-node cluster, with ``options``
    ([DEFAULT]) and ``rabbit`` ([oslo_messaging_rabbit])."""
    values = {"api_nodes": ",".join(NODES), "host": "node1",
              "transport_url": "rabbit://guest:guest@127.0.0.1:5672/",
              "state_dir": str(tmp_path / "state"),
              "filesystem_store_datadir": str(tmp_path / "images"), **options}
    path = tmp_path / "test.conf"
    path.write_text("[DEFAULT]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
                    + "[oslo_messaging_rabbit]\n"
                    + "".join(f"{k} = {v}\n" for k, v in (rabbit or {}).items()))
    return path


def settings_for(tmp_path, command="both", **options):
    """Settings read from a configuration file, as ``glance-image-sync <command>`` reads them."""
    path = write_config(tmp_path, **options)
    return service.prepare(cfg.ConfigOpts(), ["--config-file", str(path), command],
                           COMMAND_OPT)
