"""A datagram socket standing in for systemd's NOTIFY_SOCKET, for daemon tests."""

import socket
import threading
import time


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []  # (monotonic time, text)
        self._stop = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, OSError):
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def texts(self):
        return [text for _, text in self.messages]

    def times_of(self, text):
        return [at for at, got in self.messages if got == text]

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()
