"""The package on a real node: Debian 12's systemd as PID 1 of a container.

The .deb is built from this tree (``tools/build-deb``, lintian included) and
installed with apt into a container booted by ``tools/container.py``; its
dependencies come from Debian's packages. The container is node2; node1 is a
``LocalCluster`` node on this machine, whose own sshd serves its image store
to an rrsync-restricted key, and both share a virtual host of the real
RabbitMQ. Everything is checked the way an operator sees it: ``systemctl``,
``journalctl``, the files. One container serves the whole module; each test
puts the daemon in the state it needs.

The test drop-in shortens the waits only (WatchdogSec, RestartSec, the
timer's first run); the hardening is the installed unit's.
"""

import json
import os
import pathlib
import subprocess
import threading
import uuid

import pytest

from tests.clusterhelpers import free_port, scrape_until
from tools.container import Container
from tools.localcluster import SSH_PORT, LocalCluster, broker_running, md5_of, wait_for

# One worker runs the whole tier (make test: --dist loadgroup): one build, one container at a time.
pytestmark = [pytest.mark.systemd, pytest.mark.xdist_group("systemd")]

ROOT = pathlib.Path(__file__).resolve().parent.parent
NODE = "node2"
CONF = "/etc/glance/glance-image-sync.conf"
UNIT = "glance-image-sync.service"
ONESHOT = "glance-image-sync-oneshot.service"
TIMER = "glance-image-sync-oneshot.timer"
STORE = "/var/lib/glance/images"
STATE = "/var/lib/glance-image-sync"
# The store's group is not the daemon's: an install must give the copy that
# group (fchown under the unit's system-call filter).
STORE_GROUP = "glance-store"
DROP_INS = {
    f"{UNIT}.d/test.conf": "[Service]\nWatchdogSec=4s\nRestartSec=1s\n",
    f"{TIMER}.d/test.conf": "[Timer]\nOnActiveSec=1s\nRandomizedDelaySec=0\nAccuracySec=1ms\n",
}
# The journal's lines that the environment, not the package, causes: the host
# leaves no CAP_SYS_RESOURCE in the container's bounding set.
ENVIRONMENT = [("dbus-daemon", "Failed to set fd limit")]


@pytest.fixture(scope="module")
def build():
    if os.geteuid() != 0:
        pytest.skip("the systemd tier needs root (containers, sshd)")
    return subprocess.run([str(ROOT / "tools/build-deb")], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)


@pytest.fixture(scope="module")
def deb(build):
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return next((ROOT / "dist").glob("glance-image-sync_*_all.deb"))


@pytest.fixture(scope="module")
def peer():
    if not broker_running():
        pytest.fail("RabbitMQ is not running on 127.0.0.1:5672 (rabbitmq-server -detached)")
    with LocalCluster(size=1, restricted_key=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def node(deb, peer):
    with Container(deb, name=NODE) as container:
        container.installed = container.install(deb)
        _set_up(container, peer)
        yield container


def _set_up(node, peer):
    """What an operator does after installing: keys, ssh configuration, the drop-ins."""
    for name, text in [("peer_ed25519", peer.client_key.read_text()),
                       ("known_hosts", (peer.base / "known_hosts").read_text()),
                       ("ssh_config", "".join([
                           f"Host {peer.nodes[0].name}\n",
                           f"  HostName {peer.nodes[0].address}\n  Port {SSH_PORT}\n",
                           "  IdentityFile /etc/glance/peer_ed25519\n  IdentitiesOnly yes\n",
                           "  UserKnownHostsFile /etc/glance/known_hosts\n",
                           "  StrictHostKeyChecking yes\n  LogLevel ERROR\n"]))]:
        node.path(f"/etc/glance/{name}").write_text(text)
    node.run("chown", "glance:glance", "/etc/glance/peer_ed25519")
    node.run("chmod", "0600", "/etc/glance/peer_ed25519")
    node.run("groupadd", "--system", STORE_GROUP)
    node.run("usermod", "-aG", STORE_GROUP, "glance")
    node.run("chgrp", STORE_GROUP, STORE)
    node.run("chmod", "0770", STORE)
    for name, text in DROP_INS.items():
        path = node.path(f"/etc/systemd/system/{name}")
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    node.systemctl("daemon-reload")
    configure(node, peer)


def configure(node, peer, **extra):
    """Write the node's configuration (the conffile, in place: root:glance 0640 stays)."""
    options = {"api_nodes": "node1,node2", "host": NODE, "rsync_user": "root",
               "transport_url": peer.transport_url,
               "ssh_config_file": "/etc/glance/ssh_config", "retry_delays": "1,2", **extra}
    node.path(CONF).write_text(
        "[DEFAULT]\n" + "".join(f"{key} = {value}\n" for key, value in options.items()))


def restart(node, peer, **extra) -> int:
    """The daemon, (re)started with this configuration; its main pid."""
    configure(node, peer, **extra)
    node.systemctl("restart", UNIT)
    return main_pid(node)


def main_pid(node) -> int:
    return int(node.show(UNIT, "MainPID"))


def ensure_running(node, peer) -> int:
    if node.show(UNIT, "ActiveState") != "active":
        return restart(node, peer)
    return main_pid(node)


def glance_processes(node) -> str:
    """Every process of the glance user inside, one a line ("" when none)."""
    return node.run("pgrep", "-a", "-u", "glance", check=False).stdout.strip()


def control_sockets(node) -> list:
    return sorted(name for name in os.listdir(node.path(STATE)) if name.startswith("ssh-"))


def journal(node, cursor=None) -> list:
    """The journal's entries (after ``cursor``; else of this boot), as dicts.

    Filtered here, not by journalctl: systemd 252's journalctl skips every
    entry after a cursor when the cursor's own entry fails its matches.
    """
    out = node.journal("-o", "json", *(("--after-cursor", cursor) if cursor else ("-b",)))
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def messages(entries, **fields) -> list:
    """The text of the entries whose fields have these values.

    journald keeps a message that is not printable text as bytes (JSON: a
    list of numbers); those are decoded, so that nothing escapes a check.
    """
    found = []
    for entry in entries:
        if all(entry.get(key) == value for key, value in fields.items()):
            message = entry.get("MESSAGE", "")
            if isinstance(message, list):
                message = bytes(message).decode("utf-8", "replace")
            found.append(message)
    return found


def wait_for_line(node, cursor, text, **fields) -> list:
    """The entries after ``cursor`` once one with these fields says ``text``.

    journald takes lines in as they come (a unit's stdout, PID 1's own): a
    state that systemctl reports may be ahead of them.
    """
    def arrived():
        entries = journal(node, cursor)
        return entries if any(text in line for line in messages(entries, **fields)) else None
    return wait_for(arrived, 30, what=f"{text!r} in the journal")


def installed(node, image_id, md5):
    path = node.path(f"{STORE}/{image_id}")
    return path.is_file() and md5_of(path) == md5


def upload(peer, size=4 * 1024 * 1024, publisher="node1"):
    """An image in node1's store, and Glance's notifications of its upload."""
    image_id, md5, size = peer.new_image("node1", size=size)
    peer.upload(image_id, md5, size, publisher=publisher)
    return image_id, md5


# -- the package ---------------------------------------------------------------------


def test_the_package_builds_and_lintian_reports_no_error(build):
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "build-deb: lintian reports no error" in build.stdout
    assert not [line for line in build.stdout.splitlines() if line.startswith("E: ")]


def test_apt_installs_it_with_its_files_in_place_and_nothing_enabled(node):
    assert "Setting up glance-image-sync" in node.installed.stdout
    assert node.run("dpkg-query", "-W", "-f", "${Status}", "glance-image-sync").stdout == \
        "install ok installed"
    assert "daemon" in node.run("glance-image-sync", "--help").stdout
    # The oneshot service has no [Install]: the timer starts it.
    for unit, state in [(UNIT, "disabled"), (ONESHOT, "static"), (TIMER, "disabled")]:
        assert node.path(f"/lib/systemd/system/{unit}").is_file(), unit
        assert node.systemctl("is-enabled", unit, check=False).stdout.strip() == state, unit
    assert node.show(UNIT, "ActiveState") in ("inactive", "active")  # not started by apt
    conffiles = node.run("dpkg-query", "-W", "-f", "${Conffiles}", "glance-image-sync").stdout
    assert CONF in conffiles
    conf = node.run("stat", "-c", "%U:%G %a", CONF).stdout.strip()
    assert conf == "root:glance 640"
    assert node.run("getent", "passwd", "glance").stdout.split(":")[5] == "/var/lib/glance"
    documentation = node.show(UNIT, "Documentation")
    assert documentation == "file:/usr/share/doc/glance-image-sync/README.rst"
    assert node.path(documentation.removeprefix("file:")).read_text().startswith("=====")


# -- the daemon under systemd ----------------------------------------------------------


def test_start_reaches_active_with_ready_and_the_journal_shows_the_daemon(node, peer):
    node.systemctl("stop", UNIT)
    configure(node, peer)
    cursor = node.cursor()
    # Type=notify: start returns once the daemon said READY=1, as soon as its
    # loops run (a broker that is away causes no start-up timeout); STATUS says
    # when they consume.
    node.systemctl("start", UNIT)
    assert (node.show(UNIT, "ActiveState"), node.show(UNIT, "SubState")) == ("active",
                                                                             "running")
    wait_for(lambda: node.show(UNIT, "StatusText").startswith(
        "fan-out consuming; sync consuming"), 30, what="STATUS to say both consume")
    wait_for_line(node, cursor, "ready: consuming on node2", _SYSTEMD_UNIT=UNIT)


def test_reload_applies_a_changed_api_nodes(node, peer):
    pid = ensure_running(node, peer)
    cursor = node.cursor()
    configure(node, peer, api_nodes="node1,node2,node3")
    try:
        node.systemctl("reload", UNIT)
        wait_for_line(node, cursor, "api_nodes is now node1, node2, node3",
                      _SYSTEMD_UNIT=UNIT)
        # The fan-out declares the new node's queue, which collects its events from now on.
        wait_for(lambda: "glance_image_sync.node3" in peer.queue_depths(), 30,
                 what="node3's queue")
        assert main_pid(node) == pid
    finally:
        configure(node, peer)


def test_the_watchdog_restarts_a_stopped_daemon(node, peer):
    pid = ensure_running(node, peer)
    restarts = int(node.show(UNIT, "NRestarts"))
    cursor = node.cursor()
    node.run("kill", "-STOP", str(pid))
    wait_for(lambda: main_pid(node) not in (0, pid) and
             node.show(UNIT, "ActiveState") == "active", 60, what="a restart")
    assert int(node.show(UNIT, "NRestarts")) == restarts + 1
    wait_for_line(node, cursor, "Watchdog timeout", UNIT=UNIT)


def test_kill_9_leads_to_a_restart(node, peer):
    pid = ensure_running(node, peer)
    restarts = int(node.show(UNIT, "NRestarts"))
    node.run("kill", "-9", str(pid))
    wait_for(lambda: main_pid(node) not in (0, pid) and
             node.show(UNIT, "ActiveState") == "active", 60, what="a restart")
    assert int(node.show(UNIT, "NRestarts")) == restarts + 1


def test_a_transfer_over_ssh_installs_a_verified_image_under_full_hardening(node, peer):
    port = free_port()  # the container shares this machine's network
    restart(node, peer, use_journal="true", metrics_listen_port=port)
    for prop, value in [("User", "glance"), ("ProtectSystem", "strict"),
                        ("NoNewPrivileges", "yes"), ("PrivateDevices", "yes"),
                        ("CapabilityBoundingSet", "")]:
        assert node.show(UNIT, prop) == value, prop
    image_id, md5 = upload(peer)
    wait_for(lambda: installed(node, image_id, md5), 60, what="the image on node2")
    owner = node.run("stat", "-c", "%U:%G %a", f"{STORE}/{image_id}").stdout.strip()
    assert owner == f"glance:{STORE_GROUP} 640"  # the store's group, the source's mode
    # use_journal = true: the transfer's lines carry the image id as a field of their own.
    wait_for_line(node, None, "installed and verified", IMAGE_ID=image_id)
    found = messages(journal(node), _SYSTEMD_UNIT=UNIT, IMAGE_ID=image_id)
    assert any("fetching from node1" in line for line in found), found
    assert any("installed and verified on node2 (from node1)" in line for line in found), found
    # Debian's prometheus_client serves the metrics, its kombu answers status.
    scrape_until(port, lambda got: got.get(("glance_image_sync_transfers_total", (
        ("peer", "node1"), ("result", "ok")))) == 1.0, "the transfer in the metrics")
    status = node.run("glance-image-sync", "status", check=False)
    assert "node2 *" in status.stdout, status.stdout + status.stderr


def test_the_check_of_a_copy_in_place_runs_at_nice_19(node, peer):
    # debug: "already in place" is a debug line (a no-op is not recorded anywhere else).
    pid = node.host_pid(restart(node, peer, use_journal="true", debug="true"))
    # A copy already in place, as Glance leaves it on the node it was uploaded to.
    # Not too big: at nice 19 the check gets almost no CPU while the machine is
    # busy (a nice-19 thread weighs 15 against 1024 for a busy nice-0 one).
    image_id = str(uuid.uuid4())
    path = node.path(f"{STORE}/{image_id}")
    with open(path, "wb") as image:
        block = os.urandom(1 << 20)
        for _ in range(32):
            image.write(block)
    node.run("chown", f"glance:{STORE_GROUP}", f"{STORE}/{image_id}")
    md5, size = md5_of(path), path.stat().st_size
    cursor = node.cursor()
    seen = set()
    done = threading.Event()
    sampler = threading.Thread(target=_sample_niceness, args=(pid, seen, done))
    sampler.start()
    try:
        peer.notify("image.upload", image_id, md5, size, publisher=NODE)
        wait_for(lambda: [line for line in messages(journal(node, cursor), IMAGE_ID=image_id)
                          if "already in place and verified on node2" in line], 120,
                 what="the check of the copy in place")
    finally:
        done.set()
        sampler.join()
    assert 19 in seen, f"the daemon's threads ran at nice {sorted(seen)} only"
    assert not [line for line in messages(journal(node, cursor)) if "CPU priority" in line]


def _sample_niceness(pid, seen, done):
    """Every nice value the threads of ``pid`` show until ``done``."""
    while not done.is_set():
        for task in pathlib.Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                fields = task.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            seen.add(int(fields[16]))  # the 19th field, counted from the pid
        done.wait(0.002)


def test_stop_ends_with_no_process_left_and_nothing_killed(node, peer):
    ensure_running(node, peer)
    image_id, md5 = upload(peer)
    wait_for(lambda: installed(node, image_id, md5), 60, what="the image on node2")
    # The transfer's ssh connection to node1 is kept (ssh_control_persist): a
    # master that is no child of the daemon.
    assert "[mux]" in glance_processes(node)
    assert control_sockets(node)
    cursor = node.cursor()
    node.systemctl("stop", UNIT)
    assert node.show(UNIT, "ActiveState") == "inactive"
    assert node.show(UNIT, "Result") == "success"
    assert glance_processes(node) == ""
    assert control_sockets(node) == []
    entries = wait_for_line(node, cursor, "Stopped glance-image-sync.service", UNIT=UNIT)
    killed = [line for line in messages(entries) if "SIGKILL" in line or "Killing" in line]
    assert killed == []


def test_the_oneshot_service_and_the_timer_work(node, peer):
    node.systemctl("stop", UNIT)  # one or the other: they share a lock
    image_id, md5 = upload(peer)
    cursor = node.cursor()
    node.systemctl("start", ONESHOT)  # Type=oneshot: returns when the run has ended
    assert node.show(ONESHOT, "Result") == "success"
    assert installed(node, image_id, md5)
    assert glance_processes(node) == ""
    assert control_sockets(node) == []
    first = node.show(ONESHOT, "InvocationID")

    image_id, md5 = upload(peer)
    node.systemctl("start", TIMER)
    try:
        wait_for(lambda: installed(node, image_id, md5), 60, what="the timer's run")
        wait_for(lambda: node.show(ONESHOT, "ActiveState") == "inactive", 60,
                 what="the timer's run to end")
        assert node.show(ONESHOT, "InvocationID") != first
        assert node.show(ONESHOT, "Result") == "success"
    finally:
        node.systemctl("stop", TIMER)
    assert glance_processes(node) == ""
    entries = wait_for_line(node, cursor, "Stopped glance-image-sync-oneshot.timer", UNIT=TIMER)
    killed = [line for line in messages(entries) if "SIGKILL" in line or "Killing" in line]
    assert killed == []


# README.rst, "From pip": the drop-in for a program and an image store elsewhere.
ELSEWHERE = "\n".join([
    "[Service]",
    "ExecStart=",
    "ExecStart=/opt/glance-image-sync/bin/glance-image-sync --config-file "
    "/etc/glance/glance-image-sync.conf daemon",
    "ReadWritePaths=",
    "ReadWritePaths=/srv/glance/images",
    ""])


def test_the_readmes_drop_in_runs_a_program_and_a_store_from_elsewhere(node, peer):
    readme = (ROOT / "README.rst").read_text()
    assert all(line in readme for line in ELSEWHERE.splitlines())
    node.systemctl("stop", UNIT)
    node.run("install", "-D", "/usr/bin/glance-image-sync",
             "/opt/glance-image-sync/bin/glance-image-sync")
    node.run("install", "-d", "-o", "glance", "-g", "glance", "-m", "0750",
             "/srv/glance/images")
    drop_in = node.path(f"/etc/systemd/system/{UNIT}.d/elsewhere.conf")
    drop_in.write_text(ELSEWHERE)
    try:
        node.systemctl("daemon-reload")
        restart(node, peer, filesystem_store_datadir="/srv/glance/images")
        assert "/opt/glance-image-sync/bin/glance-image-sync" in node.show(UNIT, "ExecStart")
        # A delete writes to the store: only the drop-in's ReadWritePaths allows it.
        image_id = str(uuid.uuid4())
        node.path(f"/srv/glance/images/{image_id}").write_bytes(b"an image")
        peer.delete(image_id, publisher="node1")
        wait_for(lambda: not node.path(f"/srv/glance/images/{image_id}").exists(), 60,
                 what="the delete in /srv/glance/images")
    finally:
        node.systemctl("stop", UNIT)
        drop_in.unlink()
        node.systemctl("daemon-reload")
        configure(node, peer)


def test_the_journal_has_no_eperm_sigsys_or_read_only_file_system(node):
    """Run last: everything the module did to the node is in the journal by then."""
    bad = []
    for entry in journal(node):
        message = entry.get("MESSAGE")
        if not isinstance(message, str):
            continue
        if any(entry.get("SYSLOG_IDENTIFIER") == who and text in message
               for who, text in ENVIRONMENT):
            continue
        if any(word in message for word in ("EPERM", "Operation not permitted", "SIGSYS",
                                            "Bad system call", "Read-only file system")):
            bad.append(message)
    assert bad == []
    # And the daemon did run here (a journal of nothing would pass too).
    assert messages(journal(node), _SYSTEMD_UNIT=UNIT)
