"""A real three-node glance-api cluster on one machine (doc/architecture.rst).

Each node is a mount namespace in which its own directory is bind-mounted on
``/var/lib/glance/images``, so every node uses the same path as real hosts do.
Each node runs its own sshd on its own loopback address (127.x.y.11, .12, ...;
x and y drawn per cluster, so that clusters of concurrent runs never meet)
inside that namespace, and glance-image-sync runs there too, with a
configuration of its own. All nodes share the real RabbitMQ on 127.0.0.1:5672,
in a virtual host of their own that is deleted afterwards. Stopping a node's
sshd or daemon, or restarting RabbitMQ, are real faults.

With ``link_mbit``, each node is in a network namespace of its own too, on a
link limited to that many Mbit/s each way to a switch the nodes share
(tools/netns.py): its sshd listens on an address that exists only in these
namespaces, and it reaches RabbitMQ on 127.0.0.1 through forwarders.

Used by the integration tests, the demo and the benchmarks. Needs root.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from tools import netns
from tools.lifecycle import Started

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATADIR = "/var/lib/glance/images"
SSH_PORT = 2222
BROKER = "127.0.0.1:5672"
FIXTURE = ROOT / "tests/fixtures/notifications/real-glance-33/04-image.upload.json"
# Where a node's deletes go for deleted_image_grace (glance_image_sync.store.trash).
TRASH_DIR = ".glance-image-sync-trash"
# Installed images get the owner of the datadir; these ids need no user.
STORE_UID = STORE_GID = 4242
# What README.rst tells operators to put before the peers' key in authorized_keys: rsync
# may only read the image store (rrsync; -absolute lets our absolute remote paths through).
RRSYNC_KEY_OPTIONS = f'command="rrsync -ro -absolute {DATADIR}",restrict'
# The same without -absolute, as rrsync before rsync 3.5 (Ubuntu 22.04's and 24.04's
# 3.2.7) has it: it takes only paths relative to the store (rsync_remote_paths = relative).
RRSYNC_RELATIVE_KEY_OPTIONS = f'command="rrsync -ro {DATADIR}",restrict'
# The forced command README.rst recommends: glance-image-sync serve streams images to
# peers that relay them, and hands every other request to rrsync -ro -absolute.
SERVE_COMMAND = f"serve --store {DATADIR} --absolute"


def wait_for(predicate, timeout=30.0, interval=0.05, what="condition"):
    """Poll ``predicate`` until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def rabbitmqctl(*args, check=True):
    return subprocess.run(["rabbitmqctl", "-q", *args], check=check, capture_output=True,
                          text=True, timeout=120)


def broker_running() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 5672), 1):
        return True
    return False


def md5_of(path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Node:
    def __init__(self, cluster, index):
        self.cluster = cluster
        self.index = index
        self.name = f"node{index}"
        network = cluster.network
        # None: the node shares the root network namespace (and loopback) with the others.
        self.netns = network.namespace(index) if network else None
        self.address = network.address(index) if network else f"{cluster.subnet}.{10 + index}"
        self.dir = cluster.base / self.name
        self.images = self.dir / "images"
        self.state = self.dir / "state"
        self.config = self.dir / "glance-image-sync.conf"
        self.log = self.dir / "glance-image-sync.log"
        self.holder = None
        self.sshd = None
        self.daemon = None
        self.tmpfs = False

    # -- the namespace -----------------------------------------------------

    def start_namespace(self):
        for path in (self.images, self.state, self.dir / "ssh"):
            path.mkdir(parents=True, exist_ok=True)
        size = self.cluster.store_sizes.get(self.name)
        if size:  # a small disk of its own, to be filled
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                            str(self.images)], check=True)
            self.tmpfs = True
        os.chown(self.images, STORE_UID, STORE_GID)
        # A node is a fresh host: its ssh sessions (run by root's bash, which
        # reads ~/.bashrc when sshd starts it) must not run this machine's
        # shell set-up. pyenv's there takes a lock file; a session killed by
        # a fault test while holding it made every later session wait 60 s.
        enter = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.holder = subprocess.Popen(
            [*enter, "unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             f'mount --bind "$1" {DATADIR} && '
             '{ [ ! -f "$2" ] || mount --bind /dev/null "$2"; } && '
             'echo ready && exec sleep infinity',
             "holder", str(self.images), str(pathlib.Path("~root/.bashrc").expanduser())],
            stdout=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{self.name}: could not set up its mount namespace")

    def command(self, argv) -> list:
        """``argv`` as run inside this node's mount namespace (and network namespace)."""
        spaces = ["--mount", "--net"] if self.netns else ["--mount"]
        return ["nsenter", "--target", str(self.holder.pid), *spaces, "--", *argv]

    def sent_bytes(self) -> int:
        """The bytes this node's link has sent (with link_mbit only)."""
        return self._network().sent_bytes(self.index)

    def received_bytes(self) -> int:
        """The bytes this node's link has received (with link_mbit only)."""
        return self._network().received_bytes(self.index)

    def _network(self) -> netns.Network:
        if self.cluster.network is None:
            raise RuntimeError("a node has a link of its own only with link_mbit")
        return self.cluster.network

    # -- sshd --------------------------------------------------------------

    def start_sshd(self):
        key = self.dir / "ssh/host_ed25519"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
        config = self.dir / "ssh/sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {self.address}:{SSH_PORT}",
            f"HostKey {key}",
            f"AuthorizedKeysFile {self.cluster.authorized_keys}",
            "PidFile none",
            "UsePAM no",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            # The client key's PATH (authorize): a peer's glance-image-sync is this one.
            "PermitUserEnvironment PATH",
            "LogLevel INFO",  # "Accepted publickey" lines: tests count logins
            "",
        ]))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        log = open(self.dir / "sshd.log", "ab")  # noqa: SIM115 - lives with the process
        self.sshd = subprocess.Popen(self.command(["/usr/sbin/sshd", "-D", "-e", "-f",
                                                   str(config)]),
                                     stdout=log, stderr=log)
        log.close()
        wait_for(lambda: self.sshd.poll() is not None or self.sshd_accepts(), 15,
                 what=f"{self.name}'s sshd")
        if self.sshd.poll() is not None:
            raise RuntimeError(f"{self.name}'s sshd exited: "
                               f"{(self.dir / 'sshd.log').read_text()[-500:]}")

    def sshd_accepts(self) -> bool:
        if self.netns:  # not reachable from here: is it listening, in its namespace?
            return _listening(self.holder.pid, self.address, SSH_PORT)
        with contextlib.suppress(OSError), socket.create_connection((self.address, SSH_PORT),
                                                                    0.5):
            return True
        return False

    def stop_sshd(self):
        """The node's ssh is down: its listener, and every connection it serves.

        Each connection is a child process of the listener, in a session of its own,
        that would outlive it; peers that reuse connections would go on being served.
        """
        if self.sshd is not None:
            sessions = _descendants(self.sshd.pid)
            _terminate(self.sshd)
            for pid in sessions:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.sshd = None

    def host_key_line(self) -> str:
        public = (self.dir / "ssh/host_ed25519.pub").read_text().split()
        return f"[{self.address}]:{SSH_PORT} {public[0]} {public[1]}"

    # -- glance-image-sync -------------------------------------------------

    def write_config(self, extra: dict):
        """[DEFAULT] options, with ``extra``; the cluster's [oslo_messaging_rabbit] ones."""
        options = {
            "api_nodes": ",".join(n.name for n in self.cluster.nodes),
            "host": self.name,
            "rsync_user": "root",
            "transport_url": self.cluster.transport_url,
            "ssh_config_file": str(self.cluster.ssh_config),
            "state_dir": str(self.state),
            "filesystem_store_datadir": DATADIR,
            "retry_delays": "1,2",
            "log_file": str(self.log),
            **extra,
        }
        rabbit = self.cluster.rabbit_options
        # [DEFAULT] last: a test that appends an option appends it there.
        self.config.write_text(
            "[oslo_messaging_rabbit]\n"
            + "".join(f"{key} = {str(value).lower()}\n" for key, value in rabbit.items())
            + "[DEFAULT]\n" + "".join(f"{key} = {value}\n" for key, value in options.items()))

    def argv(self, *args) -> list:
        return self.command([*self.cluster.program, "--config-file", str(self.config), *args])

    def run(self, *args, timeout=300) -> subprocess.CompletedProcess:
        """Run a glance-image-sync command on this node; return its result."""
        return subprocess.run(self.argv(*args), capture_output=True, text=True,
                              timeout=timeout, env=self.cluster.env)

    def spawn(self, *args, env=None, **popen) -> subprocess.Popen:
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("stderr", subprocess.DEVNULL)
        return subprocess.Popen(self.argv(*args), env={**self.cluster.env, **(env or {})},
                                **popen)

    def start_daemon(self, env=None) -> subprocess.Popen:
        """``glance-image-sync daemon`` on this node; returns once it is consuming."""
        mark = self.log.stat().st_size if self.log.exists() else 0
        self.daemon = self.spawn("daemon", env=env)
        wait_for(lambda: self.daemon.poll() is not None or
                 "ready: consuming" in self.log_since(mark), 30,
                 what=f"{self.name}'s daemon to be ready")
        if self.daemon.poll() is not None:
            raise RuntimeError(f"{self.name}'s daemon exited: {self.log_since(mark)[-2000:]}")
        return self.daemon

    def stop_daemon(self, sig=signal.SIGTERM, timeout=30) -> int:
        self.daemon.send_signal(sig)
        code = self.daemon.wait(timeout)
        self.daemon = None
        return code

    def log_since(self, offset=0) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def temporaries(self) -> list:
        """Copies and staging directories under way or left over (owner files are not)."""
        return [name for name in self.files() if name.startswith(".glance-image-sync.")
                and not name.startswith(".glance-image-sync.owner.")]

    def owner_files(self) -> list:
        """The lock files of the processes writing into the store now (or killed)."""
        return [name for name in self.files() if name.startswith(".glance-image-sync.owner.")]

    # -- the store, seen from outside ----------------------------------------

    def path(self, image_id) -> pathlib.Path:
        return self.images / image_id

    def has(self, image_id, md5=None) -> bool:
        path = self.path(image_id)
        return path.is_file() and (md5 is None or md5_of(path) == md5)

    def files(self) -> list:
        """Every name in the store but its trash directory (see ``trashed``)."""
        return sorted(name for name in os.listdir(self.images) if name != TRASH_DIR)

    def trashed(self) -> list:
        """The images in the store's trash (their records left out)."""
        trash = self.images / TRASH_DIR
        return sorted(name for name in os.listdir(trash) if not name.endswith(".json")) \
            if trash.is_dir() else []

    def contents(self) -> dict:
        """{image file: md5} of the store, temporaries left out."""
        found = {}
        for name in self.files():
            if not name.startswith("."):
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    found[name] = md5_of(self.images / name)
        return found

    def stop(self):
        _terminate(self.daemon)
        self.stop_sshd()
        _terminate(self.holder)
        if self.tmpfs:
            subprocess.run(["umount", "--lazy", str(self.images)], check=False)


class LocalCluster(Started):
    """The cluster; with ``restricted_key``, the client key may only run read-only rrsync.

    ``restricted_key`` True puts RRSYNC_KEY_OPTIONS before the key in
    ``authorized_keys``; a string puts those options instead.
    ``rabbit_options``: [oslo_messaging_rabbit] options of Glance's side and of
    every node alike. ``brokers``: a tools.rabbitnodes.RabbitNodes to use
    instead of the shared broker (every node of it in transport_url).
    ``link_mbit``: each node in a network namespace of its own, on a link of
    that many Mbit/s each way (tools/netns.py); ``subnet`` is then unused.
    """

    def __init__(self, size=3, base=None, extra_config=None, durable=False, store_sizes=None,
                 subnet=None, restricted_key=False, rabbit_options=None, brokers=None,
                 link_mbit=None):
        self.base = pathlib.Path(base or tempfile.mkdtemp(prefix="gis-cluster-"))
        self.network = None
        if link_mbit is not None:
            ports = [int(BROKER.rpartition(":")[2])] if brokers is None else [
                port for node in brokers.nodes for port in (node.port, node.tls_port) if port]
            self.network = netns.Network(self.base, size, link_mbit, ports=ports)
        self.vhost = f"gis-{uuid.uuid4().hex[:12]}"
        # All of 127/8 is loopback: a /24 of its own per cluster.
        self.subnet = subnet or f"127.{random.randrange(1, 255)}.{random.randrange(0, 256)}"
        self.brokers = brokers
        self.rabbitmqctl = brokers.ctl if brokers else rabbitmqctl
        self.transport_url = (brokers.url(vhost=self.vhost) if brokers
                              else f"rabbit://guest:guest@{BROKER}/{self.vhost}")
        self.nodes = [Node(self, index) for index in range(1, size + 1)]
        self.authorized_keys = self.base / "authorized_keys"
        self.ssh_config = self.base / "ssh_config"
        self.client_key = self.base / "client_ed25519"
        self.extra_config = dict(extra_config or {})
        # Glance's amqp_durable_queues: its notification queue survives a
        # broker restart (the only way its notifications do).
        self.rabbit_options = {"amqp_durable_queues": durable, **(rabbit_options or {})}
        self.store_sizes = dict(store_sizes or {})
        self.restricted_key = restricted_key
        script = pathlib.Path(sys.executable).with_name("glance-image-sync")
        self.program = [str(script)] if script.exists() else [sys.executable, "-m",
                                                              "glance_image_sync"]
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.base),
                    "LC_ALL": "C",
                    # coverage.py's, set by the test run: the tool's processes report too.
                    **{k: v for k, v in os.environ.items() if k.startswith("COVERAGE_")}}
        self._notifiers = {}

    def __getitem__(self, name) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def start(self):
        if os.geteuid() != 0:
            raise RuntimeError("the local cluster needs root (mount namespaces, sshd)")
        programs = ["rsync", "/usr/sbin/sshd", "unshare", "nsenter", "rabbitmqctl"]
        for program in programs + (["ip", "tc"] if self.network else []):
            if not shutil.which(program):
                raise RuntimeError(f"{program} is not installed (see .ci/install)")
        os.makedirs(DATADIR, exist_ok=True)
        self.rabbitmqctl("add_vhost", self.vhost)
        self.rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(self.client_key)], check=True)
        self.authorize(RRSYNC_KEY_OPTIONS if self.restricted_key is True
                       else self.restricted_key or None)
        if self.network:
            self.network.start()
        for node in self.nodes:
            node.start_namespace()
            node.start_sshd()
        (self.base / "known_hosts").write_text(
            "".join(node.host_key_line() + "\n" for node in self.nodes))
        self.ssh_config.write_text("".join(
            f"Host {node.name}\n  HostName {node.address}\n  Port {SSH_PORT}\n" for node in
            self.nodes) + "\n".join([
                "Host *",
                f"  IdentityFile {self.client_key}",
                "  IdentitiesOnly yes",
                f"  UserKnownHostsFile {self.base / 'known_hosts'}",
                "  StrictHostKeyChecking yes",
                "  LogLevel ERROR",
                "",
            ]))
        for node in self.nodes:
            node.write_config(self.extra_config)
        return self

    def authorize(self, options=None):
        """Let the client key in on every node, with these authorized_keys ``options``.

        ``SERVE_COMMAND`` stands for the forced command README.rst recommends. On
        every key, ``glance-image-sync`` is on the PATH, as it is on a real node.
        """
        public_key = (self.base / "client_ed25519.pub").read_text()
        program = pathlib.Path(self.program[0])
        if options == SERVE_COMMAND:
            options = f'command="{" ".join(self.program)} {SERVE_COMMAND}",restrict'
        path = f'environment="PATH={program.parent}:/usr/bin:/bin"'
        self.authorized_keys.write_text(f"{options},{path} {public_key}" if options
                                        else f"{path} {public_key}")

    def stop(self):
        for node in self.nodes:
            node.stop()
        if self.network:
            self.network.stop()
        for notifier in self._notifiers.values():
            with contextlib.suppress(Exception):
                notifier.transport.cleanup()
        if self.brokers is None and broker_running():
            rabbitmqctl("delete_vhost", self.vhost, check=False)
        shutil.rmtree(self.base, ignore_errors=True)

    # -- Glance's side -----------------------------------------------------

    def new_image(self, node_name, size=4 * 1024 * 1024, mode=0o640, data=None):
        """Write an image into a node's store as Glance would; return (id, md5, size)."""
        image_id = str(uuid.uuid4())
        path = self[node_name].path(image_id)
        with open(path, "wb") as f:
            if data is not None:
                f.write(data)
            else:
                remaining = size
                while remaining:
                    chunk = os.urandom(min(remaining, 1 << 20))
                    f.write(chunk)
                    remaining -= len(chunk)
        os.chmod(path, mode)
        os.chown(path, STORE_UID, STORE_GID)
        return image_id, md5_of(path), path.stat().st_size

    def notifier(self, publisher="node1"):
        """oslo.messaging's Notifier, set up the way Glance sets up its own.

        Create it on the main thread (call this before starting a thread that
        publishes): a thread that set up oslo.messaging's transport is never
        reported as ended here (its tstate lock is never released, seen with
        oslo.messaging 18.3 and eventlet 0.41), so joining it waits for ever,
        and so does the interpreter's exit.
        """
        if publisher not in self._notifiers:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("create the notifier on the main thread first: "
                                   f"cluster.notifier({publisher!r})")
            import warnings

            from oslo_config import cfg

            with warnings.catch_warnings():  # oslo.messaging still imports eventlet
                warnings.simplefilter("ignore")
                import oslo_messaging

            conf = cfg.ConfigOpts()
            conf([], project="glance")
            oslo_messaging.set_transport_defaults("glance")
            transport = oslo_messaging.get_notification_transport(conf,
                                                                  url=self.transport_url)
            for name, value in self.rabbit_options.items():
                conf.set_override(name, value, group="oslo_messaging_rabbit")
            self._notifiers[publisher] = oslo_messaging.Notifier(
                transport, publisher_id=f"image.{publisher}", driver="messagingv2",
                topics=["notifications", "glance_notifications"])
        return self._notifiers[publisher]

    def notify(self, event_type, image_id, checksum=None, size=None, publisher="node1",
               status="active", deleted=False):
        """Publish one Glance image notification (payload as Glance 33 lays it out)."""
        payload = copy.deepcopy(_glance_payload())
        payload.update(id=image_id, checksum=checksum, size=size, status=status,
                       deleted=deleted)
        self.notifier(publisher).info({}, event_type, payload)

    def upload(self, image_id, checksum, size, publisher="node1"):
        """The notifications of one upload, in Glance 33's order."""
        for event_type in ("image.upload", "image.activate", "image.update"):
            self.notify(event_type, image_id, checksum, size, publisher)

    def delete(self, image_id, checksum=None, size=None, publisher="node1"):
        self.notify("image.delete", image_id, checksum, size, publisher, status="deleted",
                    deleted=True)

    def publish_raw(self, body: bytes, routing_key="glance_notifications.info",
                    exchange="glance"):
        """Put exactly these bytes on the broker (forged or captured messages)."""
        import kombu

        with kombu.Connection(self.kombu_url) as connection:
            producer = connection.Producer()
            producer.publish(body, exchange=exchange, routing_key=routing_key,
                             content_type="application/json", content_encoding="utf-8",
                             serializer=None, retry=True)

    @property
    def kombu_url(self) -> str:
        return f"amqp://guest:guest@{BROKER}/{self.vhost}"

    def queue_depths(self) -> dict:
        out = self.rabbitmqctl("list_queues", "-p", self.vhost, "name", "messages").stdout
        depths = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                depths[parts[0]] = int(parts[1])
        return depths


def _glance_payload() -> dict:
    message = json.loads(json.loads(FIXTURE.read_text())["body"])
    return json.loads(message["oslo.message"])["payload"]


def _descendants(pid) -> list:
    """Every process below ``pid``, children first."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                for child in (task / "children").read_text().split():
                    found += [int(child), *_descendants(int(child))]
    return found


def _listening(pid, address, port) -> bool:
    """Whether a TCP socket listens on ``address``:``port`` in the network namespace of
    process ``pid`` (its /proc/<pid>/net/tcp, which shows addresses as host-order words)."""
    local = f"{int.from_bytes(socket.inet_aton(address), sys.byteorder):08X}:{port:04X}"
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in pathlib.Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":  # 0A: TCP_LISTEN
                return True
    return False


def _terminate(proc, timeout=10):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
