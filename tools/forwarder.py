"""A byte forwarder between TCP and Unix sockets, for tools/netns.py's nodes.

``python -I tools/forwarder.py LISTEN=CONNECT ...``, with ``tcp:HOST:PORT``
and ``unix:PATH`` endpoints: listens on every LISTEN, connects each client to
its CONNECT, passes bytes both ways and closes both sides of a connection when
either side closes. Prints ``ready`` once it listens. Runs alone, in a node's
network namespace, and imports nothing but the standard library, to start
quickly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time


def _endpoint(spec):
    """``tcp:HOST:PORT`` or ``unix:PATH`` -> (family, address)."""
    kind, _, rest = spec.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return socket.AF_INET, (host, int(port))
    if kind == "unix":
        return socket.AF_UNIX, rest
    raise ValueError(f"{spec}: not tcp:HOST:PORT nor unix:PATH")


def _open(family, **kwargs) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, **kwargs)
    if family == socket.AF_INET:
        # AMQP's frames are small and answered: Nagle's delay on this hop would add up.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _listen(spec) -> socket.socket:
    family, address = _endpoint(spec)
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


class _Connection:
    """One client and its upstream; closed as a whole when either side ends."""

    def __init__(self, client, upstream):
        self.sockets = (client, upstream)
        self.lock = threading.Lock()
        self.running = 2

    def pump(self, source, target):
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                target.sendall(data)
        # Everything read was sent: now both ends see the connection close (shutdown
        # wakes the other direction's recv; the last pump closes the sockets).
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self.lock:
            self.running -= 1
            last = self.running == 0
        if last:
            for sock in self.sockets:
                sock.close()


def _serve(listener, connect_spec):
    family, address = _endpoint(connect_spec)
    while True:
        client, _ = listener.accept()
        if family == socket.AF_INET or client.family == socket.AF_INET:
            with contextlib.suppress(OSError):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = _open(family)
        try:
            upstream.connect(address)
        except OSError as error:
            # The broker is down (restarted by a test): the client sees its
            # connection close, as it would have seen it refused.
            print(f"forward: {connect_spec}: {error}", file=sys.stderr, flush=True)
            upstream.close()
            client.close()
            continue
        connection = _Connection(client, upstream)
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=connection.pump, args=(source, target),
                             daemon=True).start()


def forward(pairs):
    """Listen on every LISTEN of ``pairs`` (LISTEN=CONNECT) and forward to its CONNECT."""
    # Ended by SIGTERM's default action (the kernel closes every connection; no
    # interpreter shutdown waits on the threads), whatever the parent ignored or blocked.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    listeners = []
    for pair in pairs:
        listen_spec, _, connect_spec = pair.partition("=")
        _endpoint(connect_spec)
        listeners.append((_listen(listen_spec), connect_spec))
    for listener, connect_spec in listeners:
        threading.Thread(target=_serve, args=(listener, connect_spec), daemon=True).start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def main(argv=None):
    pairs = sys.argv[1:] if argv is None else argv
    if not pairs:
        print("usage: forwarder.py tcp:HOST:PORT|unix:PATH=tcp:HOST:PORT|unix:PATH ...",
              file=sys.stderr)
        return 2
    forward(pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
