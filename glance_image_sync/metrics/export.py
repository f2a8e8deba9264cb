"""How one registry's metrics leave the process: served over HTTP, written to a textfile.

Both are off by default: ``Exporter`` serves them from the daemon
(``metrics_listen_port``, on loopback unless ``metrics_listen_address`` says
otherwise) and/or writes a node_exporter textfile (``metrics_textfile``) at
the end of every ``sync-images`` or ``both`` run and periodically from the
daemon. prometheus_client writes it to a temporary name and renames it.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from wsgiref import simple_server

from oslo_log import log as logging
from prometheus_client import make_wsgi_app, write_to_textfile

from glance_image_sync.exceptions import ConfigError

LOG = logging.getLogger(__name__)

# Seconds between two textfile writes of the daemon.
TEXTFILE_EVERY = 30.0


class _ThreadingServer(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold up the process's exit


class _QuietHandler(simple_server.WSGIRequestHandler):
    def log_message(self, *args) -> None:
        """No line on stderr per scrape."""


def serve_http(address: str, port: int, registry):
    """``registry`` at http://address:port/metrics, served by a thread; the server.

    prometheus_client's own WSGI app, on a server made here: its
    start_http_server returns nothing to stop the server with before 0.17,
    and Debian 12 has 0.16.
    """
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (_ThreadingServer,), {"address_family": family})
    server = simple_server.make_server(address, port, make_wsgi_app(registry), server_class,
                                       handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


class Exporter:
    """Makes one registry's metrics available as ``MetricsSettings`` asks.

    As a context manager (the daemon): served and written while in the block.
    """

    def __init__(self, settings, registry):
        self.settings = settings
        self.registry = registry
        self._server = None
        self._stop = threading.Event()
        self._writer = None

    @property
    def address(self):
        """(host, port) the endpoint listens on, or None."""
        return self._server.server_address[:2] if self._server else None

    def start(self) -> None:
        """Serve over HTTP and keep the textfile fresh, as configured (the daemon)."""
        if self.settings.listen_port:
            try:
                self._server = serve_http(self.settings.listen_address,
                                          self.settings.listen_port, self.registry)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {self.settings.listen_address}:"
                    f"{self.settings.listen_port}: {exc.strerror}") from None
            LOG.info("metrics: serving http://%s:%d/metrics", *self.address)
        if self.settings.textfile:
            self._writer = threading.Thread(target=self._keep_writing, name="metrics",
                                            daemon=True)
            self._writer.start()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._writer is not None:
            self._stop.set()
            self._writer.join()
            self._writer = None
            self.write_textfile()

    def write_textfile(self) -> None:
        """Write the textfile now, if one is configured; a failure is logged."""
        if not self.settings.textfile:
            return
        try:
            write_to_textfile(self.settings.textfile, self.registry)
        except OSError as exc:
            failure = exc
        else:
            return
        LOG.warning("metrics: cannot write %s: %s", self.settings.textfile, failure)

    def _keep_writing(self) -> None:
        while True:
            self.write_textfile()
            if self._stop.wait(TEXTFILE_EVERY):
                return
