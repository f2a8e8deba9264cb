"""Reading frames ahead of py-amqp, against py-amqp's own transport."""

import socket

import pytest
from amqp.transport import TCPTransport

from glance_image_sync.framereader import FrameReader, whole_frame_at_start


@pytest.mark.parametrize("buffer, whole", [
    (b"", False),
    (b"\x01\x00\x01\x00\x00", False),  # half a header
    (b"\x08\x00\x00\x00\x00\x00\x00", False),  # a heartbeat without its end octet
    (b"\x08\x00\x00\x00\x00\x00\x00\xce", True),  # a whole heartbeat
    (b"\x03\x00\x01\x00\x00\x00\x05abcd", False),  # a body frame one octet short
    (b"\x03\x00\x01\x00\x00\x00\x05abcde\xce", True),
    (b"\x03\x00\x01\x00\x00\x00\x05abcde\xce\x08\x00", True),  # and the start of the next
])
def test_a_frame_is_whole_only_with_its_end_octet(buffer, whole):
    assert whole_frame_at_start(buffer) is whole
    assert whole_frame_at_start(bytearray(buffer)) is whole


class _OverSocketPair:
    """py-amqp's own TCP transport, fed by hand through a socket pair."""

    def __init__(self):
        self.ours, self.theirs = socket.socketpair()
        self.transport = TCPTransport("127.0.0.1:5672")
        self.transport.sock = self.ours
        self.transport._setup_transport()
        self.frames = []
        self.recvs = 0

    def count_recvs(self):
        recv = self.transport._quick_recv

        def counted(wanted):
            self.recvs += 1
            return recv(wanted)
        self.transport._quick_recv = counted

    def blocking_read(self, timeout=None):  # what py-amqp's Connection does, minus dispatch
        with self.transport.having_timeout(timeout):
            self.frames.append(self.transport.read_frame())

    def close(self):
        self.ours.close()
        self.theirs.close()


def _frame(kind, payload):
    return bytes([kind, 0, 1]) + len(payload).to_bytes(4, "big") + payload + b"\xce"


def test_the_reader_reads_many_frames_at_once_and_keeps_a_frame_cut_short():
    connection = _OverSocketPair()
    try:
        reader = FrameReader(connection)
        connection.count_recvs()
        frames = [_frame(3, str(number).encode() * 40) for number in range(30)]
        late = _frame(3, b"late" * 100)
        connection.theirs.sendall(b"".join(frames) + late[:150])

        for _ in frames:
            reader.read_frame(timeout=1)
        # py-amqp alone reads three times per frame (header, payload, end octet).
        assert connection.recvs < 5
        assert [payload for _, _, payload in connection.frames] == \
            [frame[7:-1] for frame in frames]
        assert not reader.frame_buffered()

        with pytest.raises(socket.timeout):
            reader.read_frame(timeout=0.05)  # only 150 octets of it are here
        connection.theirs.sendall(late[150:])
        reader.read_frame(timeout=1)
        assert connection.frames[-1] == (3, 1, late[7:-1])
    finally:
        connection.close()


def test_without_read_ahead_hooks_the_reader_leaves_py_amqp_alone():
    class Transport:
        pass

    class Connection:
        transport = Transport()

        def blocking_read(self, timeout):
            self.timeout = timeout

    connection = Connection()
    reader = FrameReader(connection)
    assert reader.frame_buffered() is False
    reader.read_frame(timeout=0.5)
    assert connection.timeout == 0.5
    assert not hasattr(connection.transport, "_quick_recv")

