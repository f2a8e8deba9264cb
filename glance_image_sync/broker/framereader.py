"""Reading AMQP frames without a system call per frame, and without waiting.

py-amqp reads each frame with three ``recv`` calls (header, payload, end
octet), and every ``drain_events`` with a timeout switches the socket's mode
twice: at thousands of deliveries and confirms a second, that is much of the
fan-out's time. A ``FrameReader`` makes the transport read ahead (one ``recv``
fills py-amqp's own buffer with many frames) and hands py-amqp the frames that
are already whole in that buffer without touching the socket at all.

It relies on two attributes of py-amqp 5's transports, ``_quick_recv`` and
``_read_buffer`` (both TCP and TLS have them); on a transport without them it
stays out of the way and every read goes through py-amqp as it is.
"""

from __future__ import annotations

# Bytes asked for per recv(). py-amqp copies what is left of its buffer each
# time it takes a piece off the front, so a larger buffer costs more in
# copies than it saves in system calls.
READ_AHEAD = 16 * 1024
_HEADER = 7  # type (1), channel (2), payload size (4); the end octet follows the payload


class FrameReader:
    def __init__(self, connection):
        """``connection``: a connected py-amqp Connection (kombu's ``.connection``)."""
        self.connection = connection
        transport = connection.transport
        self._transport = None
        if hasattr(transport, "_quick_recv") and hasattr(transport, "_read_buffer"):
            recv = transport._quick_recv
            transport._quick_recv = lambda wanted: recv(max(wanted, READ_AHEAD))
            self._transport = transport

    def frame_buffered(self) -> bool:
        """Whether a whole frame is already read: the next one costs no system call."""
        if self._transport is None:
            return False
        return whole_frame_at_start(self._transport._read_buffer)

    def in_hand(self) -> bool:
        """Whether there is something to read that the socket will not signal:
        a whole frame already read, or bytes TLS has decrypted and not handed on."""
        if self.frame_buffered():
            return True
        pending = getattr(self.connection.sock, "pending", None)
        return bool(pending and pending())

    def read_frame(self, timeout: float) -> None:
        """Read and dispatch one frame.

        Raises ``socket.timeout`` when one is not all in within ``timeout``
        (py-amqp keeps the part read, for the next call).
        """
        # With the frame in the buffer, no timeout is needed: nothing will wait.
        self.connection.blocking_read(None if self.frame_buffered() else timeout)


def whole_frame_at_start(buffer) -> bool:
    """Whether ``buffer`` starts with a complete AMQP frame."""
    if len(buffer) < _HEADER:
        return False
    size = int.from_bytes(buffer[3:_HEADER], "big")
    return len(buffer) >= _HEADER + size + 1
