"""A new operator's first steps: each mistake is one clear line and its exit status, and
stdout carries only the command's output."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from glance_image_sync import service
from glance_image_sync.cmd import commands as cli


def main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_without_a_configuration_file_it_says_what_was_looked_for(tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setattr(service, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.conf"))
    code, out, err = main(capsys, "status")
    assert (code, out) == (2, "")
    assert err == ("glance-image-sync: configuration error: api_nodes is empty: no "
                   f"configuration file was read ({tmp_path / 'absent.conf'} does not exist; "
                   "give one with --config-file)\n")
    empty = tmp_path / "empty.conf"
    empty.write_text("[DEFAULT]\nrsync_user = glance\n")
    code, out, err = main(capsys, "--config-file", str(empty), "status")
    assert code == 2
    assert err == (f"glance-image-sync: configuration error: api_nodes is empty in {empty}: "
                   "list every glance-api node in [DEFAULT] api_nodes\n")


def test_the_default_file_is_the_one_under_etc_glance():
    assert service.DEFAULT_CONFIG_FILE == "/etc/glance/glance-image-sync.conf"


def test_a_pidfile_without_daemonize_is_a_usage_error(tmp_path, capsys):
    conf = tmp_path / "c.conf"
    conf.write_text("[DEFAULT]\napi_nodes = node1\nhost = node1\n")
    code, out, err = main(capsys, "--config-file", str(conf), "daemon", "--pidfile",
                          str(tmp_path / "pid"))
    assert (code, out) == (2, "")
    assert err == ("glance-image-sync: error: --pidfile needs --daemonize (under systemd, "
                   "the unit tracks the process)\n")
    assert not (tmp_path / "pid").exists()


def test_reconcile_json_stays_json_when_a_peer_is_unreachable(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text("Host node2\n  HostName 127.0.0.1\n  Port 1\n")
    conf = tmp_path / "c.conf"
    conf.write_text("[DEFAULT]\napi_nodes = node1,node2\nhost = node1\n"
                    f"filesystem_store_datadir = {images}\nstate_dir = {tmp_path / 'state'}\n"
                    f"ssh_config_file = {ssh_config}\nssh_control_persist = 0\n")
    code, out, err = main(capsys, "--config-file", str(conf), "reconcile", "--format", "json")
    doc = json.loads(out)  # logs went to stderr, not in the middle of the document
    assert code == 1 and doc["peers"]["node2"]["reachable"] is False
    assert "reconcile: cannot list node2" in err


def test_a_configuration_of_the_2013_tool_still_works(tmp_path, capsys):
    """Only the four options its README showed; host is the machine's own name."""
    log = tmp_path / "glance-image-sync.log"
    conf = tmp_path / "glance-image-sync.conf"
    conf.write_text(f"[DEFAULT]\napi_nodes = {socket.gethostname()},node2,node3\n"
                    f"rsync_user = someone\nlog_file = {log}\nverbose = True\n")
    settings = service.prepare(cli.cfg.ConfigOpts(), ["--config-file", str(conf), "both"],
                               cli.COMMAND_OPT)
    assert settings.nodes.peers() == ("node2", "node3")
    assert settings.transfer.user == "someone"
    assert settings.store.datadir == "/var/lib/glance/images"
    assert not settings.glance_api.configured


# -- a state_dir or image store this user cannot write ------------------------------------


@pytest.fixture
def shared_dir():
    """A directory every user can reach (pytest's own are root's, mode 0700)."""
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root")
    path = tempfile.mkdtemp(prefix="gis-first-runs-")
    os.chmod(path, 0o755)  # noqa: S103 - nobody must reach the files inside
    try:
        yield path
    finally:
        shutil.rmtree(path)


# What lets another user run this checkout's program: it may lie in a directory only
# root can enter (a CI clone in mktemp -d's 0700). Reading and searching only: every
# write the tool attempts is still refused as it would be to that user.
READ_ANYWHERE = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


def as_nobody(conf, *args):
    script = os.path.join(os.path.dirname(sys.executable), "glance-image-sync")
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           *READ_ANYWHERE, "--", script, "--config-file", conf, *args],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})


@pytest.mark.cluster  # needs root, to be another user
@pytest.mark.parametrize("command", ["sync-images", "both", "daemon"])
def test_a_state_dir_left_to_root_is_found_at_start_up(shared_dir, command):
    state, images = os.path.join(shared_dir, "state"), os.path.join(shared_dir, "images")
    os.mkdir(state, 0o750)  # made by an earlier run as root
    open(os.path.join(state, "lock"), "w").close()
    os.mkdir(images)
    os.chown(images, 65534, 65534)
    conf = os.path.join(shared_dir, "c.conf")
    with open(conf, "w") as f:
        f.write(f"[DEFAULT]\napi_nodes = node1\nhost = node1\nstate_dir = {state}\n"
                f"filesystem_store_datadir = {images}\n"
                "transport_url = rabbit://guest:guest@127.0.0.1:1/\n")
    os.chmod(conf, 0o644)
    result = as_nobody(conf, command)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"glance-image-sync: configuration error: state_dir: {state} is owned by root:root, "
        "mode 0750; glance-image-sync runs as nobody (uid 65534) and cannot write there "
        f"(chown -R the user that runs it: {state}, or run it as that directory's owner)\n")

    os.chown(state, 65534, 65534)  # the directory is, but not its lock file
    result = as_nobody(conf, command)
    assert result.returncode == 2
    assert f"state_dir: {os.path.join(state, 'lock')} is owned by root:root, mode 0644" \
        in result.stderr


@pytest.mark.cluster
@pytest.mark.parametrize("command", ["sync-images", "daemon"])
def test_an_image_store_it_cannot_write_is_found_at_start_up(shared_dir, command):
    state, images = os.path.join(shared_dir, "state"), os.path.join(shared_dir, "images")
    os.mkdir(images, 0o755)  # root's
    conf = os.path.join(shared_dir, "c.conf")
    with open(conf, "w") as f:
        f.write(f"[DEFAULT]\napi_nodes = node1\nhost = node1\nstate_dir = {state}\n"
                f"filesystem_store_datadir = {images}\n"
                "transport_url = rabbit://guest:guest@127.0.0.1:1/\n")
    os.chmod(conf, 0o644)
    os.mkdir(state)
    os.chown(state, 65534, 65534)
    result = as_nobody(conf, command)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"glance-image-sync: configuration error: filesystem_store_datadir: {images} is owned "
        "by root:root, mode 0755; glance-image-sync runs as nobody (uid 65534) and cannot "
        "write there (run it as the store's owner, Glance's user)\n")


def test_access_checks_name_the_path_its_owner_and_mode_and_who_runs(tmp_path, monkeypatch):
    from glance_image_sync.exceptions import ConfigError
    from glance_image_sync.state import access

    state = tmp_path / "state"
    access.check_state_dir(str(state / "deeper"))  # missing, under a writable parent: fine
    state.mkdir(mode=0o750)
    access.check_state_dir(str(state))
    access.check_store(str(tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="state_dir .*/file is not a directory"):
        access.check_state_dir(str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="filesystem_store_datadir .*/file is not a directory"):
        access.check_store(str(tmp_path / "file"))

    # What another user meets (root may write anywhere, so the answer is given here).
    monkeypatch.setattr(access, "_writable", lambda path: False)
    with pytest.raises(ConfigError) as caught:
        access.check_state_dir(str(state))
    mode = oct(os.stat(state).st_mode & 0o777)[2:].rjust(4, "0")
    assert str(caught.value).startswith(f"state_dir: {state} is owned by ")
    assert f", mode {mode}; glance-image-sync runs as " in str(caught.value)
    assert f"(uid {os.geteuid()})" in str(caught.value)
    with pytest.raises(ConfigError, match="does not exist and cannot be created"):
        access.check_state_dir(str(state / "a" / "b"))
    with pytest.raises(ConfigError, match="run it as the store's owner"):
        access.check_store(str(tmp_path))
