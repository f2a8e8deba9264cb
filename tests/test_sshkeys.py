"""ssh-keys: the authorized_keys and known_hosts lines, from real keys (unit tests)."""

import json
import shutil
import subprocess

import pytest

from glance_image_sync.admin import sshkeys
from glance_image_sync.cmd import commands as cli
from tests.helpers import write_config


def keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "a comment", "-f",
                    str(path)], check=True, timeout=30)
    return path.with_suffix(".pub")


def ssh_fingerprint(pub) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return out.split()[1]


@pytest.fixture
def keys(tmp_path):
    """This node's key, node2's and node3's host keys, and an ssh_config for them."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    mine = keygen(tmp_path / "gis_ed25519")
    for node in ("node2", "node3"):
        keygen(tmp_path / f"{node}_host")
        shutil.copy(tmp_path / f"{node}_host.pub", hosts / f"{node}.pub")
    config = tmp_path / "ssh_config"
    config.write_text("Host node2\n  HostName 10.9.8.2\n  Port 2222\n"
                      "Host node3\n  HostName node3.example.com\n")
    return tmp_path, mine, hosts, config


def run(tmp_path, capsys, *args, **options) -> tuple:
    path = write_config(tmp_path, filesystem_store_datadir="/var/lib/glance/images", **options)
    code = cli.main(["--config-file", str(path), "ssh-keys", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_lines_name_each_peer_as_ssh_looks_it_up(keys, capsys):
    tmp_path, mine, hosts, config = keys
    code, out, err = run(tmp_path, capsys, "--public-key", str(mine), "--host-keys", str(hosts),
                         ssh_config_file=config, rsync_user="glance")
    assert code == 0, err
    key = " ".join(mine.read_text().split()[:2])
    # relay (the default): serve streams to peers and hands rsync to rrsync -ro -absolute.
    assert ('command="glance-image-sync serve --store /var/lib/glance/images --absolute",'
            f"restrict {key} glance-image-sync@node1") in out.splitlines()
    assert "authorized_keys of glance on node2, node3" in out
    node2 = " ".join((hosts / "node2.pub").read_text().split()[:2])
    node3 = " ".join((hosts / "node3.pub").read_text().split()[:2])
    assert f"[10.9.8.2]:2222 {node2}" in out.splitlines()  # HostName and Port of ssh_config
    assert f"node3.example.com {node3}" in out.splitlines()
    assert f"# node2: ssh-ed25519 {ssh_fingerprint(hosts / 'node2.pub')}" in out
    assert "a comment" not in out


def test_relative_remote_paths_get_the_restriction_every_rrsync_takes(keys, capsys):
    tmp_path, mine, hosts, config = keys
    code, out, _ = run(tmp_path, capsys, "--public-key", str(mine), "--host-keys", str(hosts),
                       "--format", "json", ssh_config_file=config,
                       rsync_remote_paths="relative", relay="false")
    doc = json.loads(out)
    assert code == 0 and doc["missing"] == []
    assert set(doc["authorized_keys"]) == {"node2", "node3"}
    assert doc["authorized_keys"]["node2"].startswith(
        'command="rrsync -ro /var/lib/glance/images",restrict ssh-ed25519 ')
    assert doc["known_hosts"]["node2"][0].startswith("[10.9.8.2]:2222 ssh-ed25519 ")


def test_with_relay_and_relative_paths_serve_hands_rsync_to_rrsync_without_absolute(
        keys, capsys):
    tmp_path, mine, hosts, config = keys
    code, out, _ = run(tmp_path, capsys, "--public-key", str(mine), "--host-keys", str(hosts),
                       "--format", "json", ssh_config_file=config,
                       rsync_remote_paths="relative")
    assert code == 0
    assert json.loads(out)["authorized_keys"]["node3"].startswith(
        'command="glance-image-sync serve --store /var/lib/glance/images",restrict ')


def test_host_keys_are_found_in_a_hashed_known_hosts_file(keys, capsys):
    tmp_path, mine, hosts, config = keys
    known = tmp_path / "scanned"
    known.write_text("".join(
        f"{name} {' '.join((hosts / f'{node}.pub').read_text().split()[:2])}\n"
        for node, name in (("node2", "[10.9.8.2]:2222"), ("node3", "node3.example.com"))))
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True,
                   timeout=30)
    assert "10.9.8.2" not in known.read_text()  # hashed
    code, out, err = run(tmp_path, capsys, "--public-key", str(mine), "--known-hosts",
                         str(known), "--format", "json", ssh_config_file=config)
    doc = json.loads(out)
    assert code == 0, err
    assert doc["known_hosts"]["node2"] == [
        "[10.9.8.2]:2222 " + " ".join((hosts / "node2.pub").read_text().split()[:2])]
    assert len(doc["known_hosts"]["node3"]) == 1


def test_a_missing_host_key_is_named_and_the_rest_still_printed(keys, capsys):
    tmp_path, mine, hosts, config = keys
    (hosts / "node3.pub").unlink()
    code, out, err = run(tmp_path, capsys, "--public-key", str(mine), "--host-keys", str(hosts),
                         ssh_config_file=config)
    assert code == 1
    assert f"no host key for node3 in {hosts}/node3.pub" in err
    assert "[10.9.8.2]:2222 ssh-ed25519 " in out


@pytest.mark.parametrize("content, words", [
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n", "is a private key: give its .pub"),
    ("not a key\n", "holds no ssh public key"),
])
def test_a_file_that_is_not_a_public_key_is_a_usage_error(keys, capsys, content, words):
    tmp_path, _, hosts, config = keys
    bad = tmp_path / "bad"
    bad.write_text(content)
    code, out, err = run(tmp_path, capsys, "--public-key", str(bad), "--host-keys", str(hosts),
                         ssh_config_file=config)
    assert code == 2 and out == "" and words in err
    assert err.count("\n") == 1


def test_fingerprints_are_sha256_as_ssh_keygen_prints_them(keys):
    _, mine, _, _ = keys
    assert sshkeys.fingerprint(mine.read_text().split()[1]) == ssh_fingerprint(mine)
