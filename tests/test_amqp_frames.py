"""Our publish frames and frame reads, against py-amqp's own and the real broker."""

import socket

import amqp
import kombu
import pytest
from amqp import spec
from amqp.method_framing import frame_writer
from amqp.serialization import dumps
from amqp.transport import TCPTransport

from glance_image_sync.broker.framereader import FrameReader, whole_frame_at_start
from glance_image_sync.broker.publisher import ConfirmingPublisher
from glance_image_sync.broker.publishframes import PublishEncoder, encode_properties

FRAME_MAX = 4096
PERSISTENT_JSON = {"content_type": "application/json", "content_encoding": "utf-8",
                   "delivery_mode": 2}


class _Capture:
    def __init__(self):
        self.written = bytearray()

    def write(self, data):
        self.written += data


class _Connection:
    frame_max = FRAME_MAX
    bytes_sent = 0


def py_amqp_frames(body, exchange, routing_key, properties, channel_id=3):
    """What py-amqp's basic_publish writes for the same publish."""
    capture = _Capture()
    write = frame_writer(_Connection(), capture)
    write(1, channel_id, spec.Basic.Publish,
          dumps("Bssbb", (0, exchange, routing_key, True, False)),
          amqp.Message(body, **properties))
    return bytes(capture.written)


@pytest.mark.parametrize("body, properties", [
    (b'{"image_id": "x"}', PERSISTENT_JSON),
    (b"", PERSISTENT_JSON),
    ('{"name": "caf\u00e9"}', PERSISTENT_JSON),  # a delivery's body, as py-amqp decoded it
    ('{"name": "caf\u00e9"}', {"content_type": "application/json"}),
    (b"x" * (FRAME_MAX - 8), PERSISTENT_JSON),  # one body frame, exactly full
    (b"y" * (3 * FRAME_MAX + 17), PERSISTENT_JSON),  # split across four body frames
    (b"{}", {**PERSISTENT_JSON, "expiration": "60000"}),
    (b"{}", {**PERSISTENT_JSON, "application_headers": {
        "x-gis-reason": "notification: body is not JSON", "x-gis-attempt": 3,
        "x-gis-replayed": True}}),
    (b"{}", {"content_type": "text/plain", "priority": 5, "message_id": "m-1",
             "timestamp": 1700000000, "app_id": "glance-image-sync"}),
])
def test_publish_frames_are_byte_for_byte_what_py_amqp_writes(body, properties):
    encoder = PublishEncoder(channel_id=3, frame_max=FRAME_MAX)
    for _ in range(2):  # the second time from the caches
        assert encoder.encode(body, "", "glance_image_sync.node2", dict(properties)) == \
            py_amqp_frames(body, "", "glance_image_sync.node2", dict(properties))


def test_each_destination_gets_its_own_method_frame():
    encoder = PublishEncoder(channel_id=1, frame_max=FRAME_MAX)
    to_node2 = encoder.encode(b"{}", "", "glance_image_sync.node2", PERSISTENT_JSON)
    to_node3 = encoder.encode(b"{}", "", "glance_image_sync.node3", PERSISTENT_JSON)
    assert to_node2 == py_amqp_frames(b"{}", "", "glance_image_sync.node2", PERSISTENT_JSON, 1)
    assert to_node3 == py_amqp_frames(b"{}", "", "glance_image_sync.node3", PERSISTENT_JSON, 1)


def test_properties_that_are_not_set_are_left_out():
    assert encode_properties({}) == b"\x00\x00"
    assert encode_properties({"content_type": None, "delivery_mode": 2}) == b"\x10\x00\x02"


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


# -- against the broker ---------------------------------------------------------


@pytest.mark.broker
def test_confirmed_publishes_arrive_intact_with_their_headers(vhost):
    body = bytes(range(256)) * 1024  # 256 KiB: more than one frame at any frame_max
    headers = {"x-gis-reason": "a reason", "x-gis-attempt": 2}
    outcomes = {}
    with kombu.Connection(f"amqp://guest:guest@127.0.0.1:5672/{vhost}") as connection:
        channel = connection.channel()
        channel.queue_declare("q", durable=True, auto_delete=False)
        publisher = ConfirmingPublisher(connection)
        publisher.publish(body, "q", on_done=lambda ok, why: outcomes.update(q=(ok, why)),
                          headers=headers)
        publisher.publish(b"{}", "no-such-queue",
                          on_done=lambda ok, why: outcomes.update(none=(ok, why)))
        while publisher.pending:
            connection.drain_events(timeout=10)
        message = channel.basic_get("q", no_ack=True)

    # Confirms may come out of order: the broker confirms the unroutable
    # copy at once, the persistent one once it is on disk.
    assert outcomes["q"] == (True, "")
    assert outcomes["none"][0] is False and "unroutable" in outcomes["none"][1]
    assert message.body == body
    assert message.headers == headers
    assert message.properties["delivery_mode"] == 2


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

