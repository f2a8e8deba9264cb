"""RabbitMQ nodes of a test's own: single, with a TLS listener, or a cluster of three.

The shared broker on 127.0.0.1:5672 is never touched. Each node here has its
own node name (``gis-<random>-<n>@localhost``), AMQP, TLS and Erlang
distribution ports, Erlang cookie (in a HOME of its own), configuration,
data and log directories, all under one temporary directory that ``stop()``
deletes. Nodes run in the foreground as children of the test process (in a
session of their own, so a stop reaches every Erlang process they start),
and listen on 127.0.0.1 only.

``Certificates`` makes the CA and certificates a TLS test needs with
openssl: a server certificate for 127.0.0.1 and localhost, a client
certificate, an expired one, one for another name, and a second CA that
signed none of them.

Used by the broker tests (TLS, clusters, alarms) and needs root (the
cookie's file, the node's data directory). RabbitMQ is Debian 12's 3.10.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

from tools.lifecycle import Started

RABBIT_BIN = pathlib.Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT = 90


def free_port() -> int:
    """A TCP port nobody listens on at this moment (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Certificates:
    """A test CA and the certificates signed by it, made with openssl in ``directory``."""

    def __init__(self, directory):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = self._ca("ca", "glance-image-sync test CA")
        self.other_ca = self._ca("other-ca", "a CA that signed nothing here")
        self.server = self._signed("server", "localhost",
                                   "subjectAltName=IP:127.0.0.1,DNS:localhost")
        self.client = self._signed("client", "glance-image-sync client")
        self.expired = self._signed("expired", "localhost",
                                    "subjectAltName=IP:127.0.0.1,DNS:localhost", expired=True)
        self.wrong_name = self._signed("wrong-name", "broker.example.org",
                                       "subjectAltName=DNS:broker.example.org")

    def _openssl(self, *args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60,
                       cwd=self.dir)

    def _ca(self, name, subject) -> pathlib.Path:
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                      "-subj", f"/CN={subject}", "-keyout", f"{name}.key",
                      "-out", f"{name}.pem")
        return self.dir / f"{name}.pem"

    def _signed(self, name, common_name, extension=None, expired=False):
        """(certificate, key) of ``name``, signed by the CA."""
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={common_name}",
                      "-keyout", f"{name}.key", "-out", f"{name}.csr")
        extfile = self.dir / f"{name}.ext"
        extfile.write_text((extension or "") + "\n")
        if expired:
            # openssl x509 cannot back-date: a CA "database" with explicit dates can.
            dates = ["-startdate", "20200101000000Z", "-enddate", "20200201000000Z"]
            self._sign_with_ca_command(name, extfile, dates)
        else:
            self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem",
                          "-CAkey", "ca.key", "-CAcreateserial", "-days", "30",
                          "-extfile", str(extfile), "-out", f"{name}.pem")
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"

    def _sign_with_ca_command(self, name, extfile, dates):
        db = self.dir / "ca-db"
        db.mkdir(exist_ok=True)
        (db / "index.txt").write_text("")
        (db / "serial").write_text("1000\n")
        config = self.dir / "ca.cnf"
        config.write_text("\n".join([
            "[ca]", "default_ca = test", "[test]", f"dir = {db}",
            "database = $dir/index.txt", "serial = $dir/serial",
            "new_certs_dir = $dir", "default_md = sha256", "policy = any",
            "copy_extensions = none", "[any]", "commonName = supplied", ""]))
        self._openssl("ca", "-batch", "-config", str(config), "-cert", "ca.pem",
                      "-keyfile", "ca.key", "-in", f"{name}.csr", "-out", f"{name}.pem",
                      "-extfile", str(extfile), "-notext", *dates)


class RabbitNode:
    """One RabbitMQ node of our own; ``tls``: a Certificates to listen with TLS too."""

    def __init__(self, base, name, cookie, tls=None, rabbit_env=None):
        self.name = name
        self.rabbit_env = rabbit_env or {}
        self.nodename = f"{name}@localhost"
        self.dir = pathlib.Path(base) / name
        self.cookie = cookie
        self.port = free_port()
        self.dist_port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self.server_certificate = tls.server if tls else None  # (cert, key)
        self.process = None
        self.output = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tls_address(self) -> str:
        return f"localhost:{self.tls_port}"

    def env(self) -> dict:
        """The environment of this node's server and of rabbitmqctl talking to it."""
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.dir),  # the Erlang cookie is $HOME/.erlang.cookie
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            # rabbitmqctl's own distribution ports: away from those of the
            # shared node's CLI tools, and of other test nodes.
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self.dist_port + 1),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self.dist_port + 1),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def configure(self) -> None:
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        cookie = self.dir / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.port}",
            "loopback_users = none",
            "log.console = false",
            "log.file.level = info",
            # A test node must stay usable on a busy machine with little free disk.
            "disk_free_limit.absolute = 1MB",
        ]
        if self.tls:
            key = self.server_certificate
            lines += [
                f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}",
                # The same listener on an address the certificate does not name.
                f"listeners.ssl.2 = 127.0.0.2:{self.tls_port}",
                f"ssl_options.cacertfile = {self.tls.ca}",
                f"ssl_options.certfile = {key[0]}",
                f"ssl_options.keyfile = {key[1]}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        (self.dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        # The rabbit application's own settings, some of which (channel_tick_interval)
        # rabbitmq.conf has no key for.
        settings = ", ".join(f"{{{key}, {value}}}" for key, value in self.rabbit_env.items())
        (self.dir / "advanced.config").write_text(f"[{{rabbit, [{settings}]}}].\n")

    def use_server_certificate(self, certificate) -> None:
        """Serve ``(cert, key)`` on the TLS listener from the next start on."""
        self.server_certificate = certificate

    def start(self) -> None:
        """Start the node (returns at once; see ``wait_started``)."""
        self.configure()
        self.output = open(self.dir / "console.log", "ab")  # noqa: SIM115 - lives with it
        self.process = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env(),
                                        cwd=self.dir, stdout=self.output,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def restart(self) -> None:
        """Stop the node and start it again: every connection drops, transient queues go."""
        self.stop()
        self.start()
        self.wait_started()

    def wait_started(self, timeout=START_TIMEOUT) -> None:
        def started():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.nodename} exited: {self.console()[-2000:]}")
            return self.ctl("await_startup", "--timeout", "5", check=False).returncode == 0

        _wait_for(started, timeout, f"{self.nodename} to start", interval=0.5)

    def console(self) -> str:
        path = self.dir / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ctl(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        """rabbitmqctl against this node."""
        return subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-q", "-n", self.nodename,
                               *args], env=self.env(), check=check, capture_output=True,
                              text=True, timeout=timeout)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout=60) -> None:
        """Stop the node (its data stays, for a start again)."""
        if not self.running():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        # epmd forgets the name once the node's connection to it closes.
        self.output.close()

    def kill(self) -> None:
        """Stop the node the hard way, as a crashed host would."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.output.close()


class RabbitNodes(Started):
    """``count`` nodes, clustered when more than one; a context manager that always stops.

    ``tls``: give every node a TLS listener with certificates made here
    (``self.certs``). ``rabbit_env``: settings of the rabbit application
    (``{"consumer_timeout": 10000}``), in every node's advanced.config.
    ``url(user, password)`` is a transport_url naming every node.
    """

    def __init__(self, count=1, tls=False, prefix="gis", rabbit_env=None):
        self.base = pathlib.Path(tempfile.mkdtemp(prefix=f"{prefix}-rabbit-"))
        tag = uuid.uuid4().hex[:8]
        cookie = uuid.uuid4().hex.upper()
        self.certs = Certificates(self.base / "certs") if tls else None
        self.nodes = [RabbitNode(self.base, f"{prefix}-{tag}-{index}", cookie, self.certs,
                                 rabbit_env)
                      for index in range(1, count + 1)]

    def __getitem__(self, index) -> RabbitNode:
        return self.nodes[index]

    def start(self) -> RabbitNodes:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_started()
        first, *others = self.nodes
        for node in others:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.nodename)
            node.ctl("start_app")
        if others:
            self.wait_running(self.nodes)
        return self

    def running_nodes(self, via=None) -> list:
        """The node names the cluster reports running (asked of ``via``, or a running node)."""
        via = via or next(node for node in self.nodes if node.running())
        result = via.ctl("cluster_status", "--formatter", "json", check=False)
        if result.returncode != 0:
            return []
        return json.loads(result.stdout).get("running_nodes", [])

    def wait_running(self, nodes, timeout=60) -> None:
        """Until the cluster reports every one of ``nodes`` running (joined)."""
        names = {node.nodename for node in nodes}
        _wait_for(lambda: names <= set(self.running_nodes()), timeout,
                  f"{', '.join(sorted(names))} to run in the cluster", interval=0.5)

    def ctl(self, *args, check=True) -> subprocess.CompletedProcess:
        """rabbitmqctl against a running node of the cluster."""
        return next(node for node in self.nodes if node.running()).ctl(*args, check=check)

    def add_user(self, user, password, vhost="/") -> None:
        node = self.nodes[0]
        node.ctl("add_user", user, password)
        node.ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")

    def url(self, user="guest", password="guest", tls=False, vhost="") -> str:  # noqa: S107
        hosts = ",".join(f"{user}:{password}@{node.tls_address if tls else node.address}"
                         for node in self.nodes)
        return f"rabbit://{hosts}/{vhost}"

    def stop(self) -> None:
        for node in self.nodes:
            try:
                node.stop()
            except Exception:  # noqa: BLE001 - stop the others all the same
                node.kill()
        shutil.rmtree(self.base, ignore_errors=True)
