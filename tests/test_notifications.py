"""The notification parser on every captured Glance message, and on garbage."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glance_image_sync.events import Action, Ignored, ImageEvent
from glance_image_sync.exceptions import Rejected
from glance_image_sync.fanout import notifications
from glance_image_sync.nodes import Nodes
from tests.fixtures import body_of, notification_files

NODES = Nodes(["node1", "node2.example.com", "node3"], "node2")
CIRROS = ("5f0b5d6c-1c6e-4f5a-9a39-1f4c1e1a7e11", "c8fc807773e5354afe61636071771906", 21430272)
PROBE = ("b90e9b0f-36ce-43c1-b08c-9b4201f6571f", "9b8f6225e89197b8d67aafd6f91ce7bf", 4194304)

PRESENT, ABSENT, IGNORED = "present", "absent", "ignored"
EXPECTED = {
    "legacy/legacy_essex_messages.json[0]": (IGNORED, None),  # upload before data: no checksum
    "legacy/legacy_essex_messages.json[1]": (PRESENT, CIRROS),
    "legacy/legacy_essex_messages.json[2]": (ABSENT, CIRROS),  # payload is the bare id
    "legacy/legacy_essex_messages.json[3]": (IGNORED, None),  # ERROR, text payload
    "legacy/legacy_folsom_messages.json[0]": (PRESENT, CIRROS),
    "legacy/legacy_folsom_messages.json[1]": (PRESENT, CIRROS),
    "legacy/legacy_folsom_messages.json[2]": (ABSENT, CIRROS),  # status says active
    "legacy/legacy_folsom_messages.json[3]": (IGNORED, None),
    "legacy/legacy_grizzly_messages.json[0]": (IGNORED, None),
    "legacy/legacy_grizzly_messages.json[1]": (IGNORED, None),
    "legacy/legacy_grizzly_messages.json[2]": (PRESENT, CIRROS),
    "legacy/legacy_grizzly_messages.json[3]": (PRESENT, CIRROS),
    "legacy/legacy_grizzly_messages.json[4]": (PRESENT, CIRROS),
    "legacy/legacy_grizzly_messages.json[5]": (ABSENT, CIRROS),
    "legacy/legacy_grizzly_messages.json[6]": (IGNORED, None),
    "real-glance-33/01-image.create.json": (IGNORED, None),
    "real-glance-33/02-image.update.json": (IGNORED, None),  # saving
    "real-glance-33/03-image.prepare.json": (IGNORED, None),
    "real-glance-33/04-image.upload.json": (PRESENT, PROBE),
    "real-glance-33/05-image.activate.json": (PRESENT, PROBE),
    "real-glance-33/06-image.update.json": (PRESENT, PROBE),
    "real-glance-33/07-image.send.json": (IGNORED, None),
    "real-glance-33/08-image.update.json": (PRESENT, PROBE),
    "real-glance-33/09-image.delete.json": (ABSENT, PROBE),
}
for version in ("v1", "v2"):
    folder = f"oslo-{version}/{version}"
    EXPECTED.update({
        f"{folder}_00_image_create_queued.json": (IGNORED, None),
        f"{folder}_01_image_create_queued.json": (IGNORED, None),
        f"{folder}_02_image_update_saving.json": (IGNORED, None),
        f"{folder}_03_image_prepare_saving.json": (IGNORED, None),
        f"{folder}_04_image_upload_active.json": (PRESENT, CIRROS),
        f"{folder}_05_image_activate_active.json": (PRESENT, CIRROS),
        f"{folder}_06_image_update_active.json": (PRESENT, CIRROS),
        f"{folder}_07_image_delete_deleted.json": (ABSENT, CIRROS),
        f"{folder}_image_upload_ERROR.json": (IGNORED, None),
    })


def test_every_fixture_has_an_expectation():
    assert sorted(name for name, _ in notification_files()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_gives_the_right_event(name):
    kind, image = EXPECTED[name]
    result = notifications.parse(body_of(name), NODES)
    if kind == IGNORED:
        assert isinstance(result, Ignored), result
        return
    assert isinstance(result, ImageEvent)
    assert result.image_id == image[0]
    assert result.source == "node1"
    assert result.message_id
    assert result.publisher in ("image.node1", "node1")  # the publisher_id, as it came
    if kind == PRESENT:
        assert (result.action, result.checksum, result.size) == (Action.PRESENT, *image[1:])
    elif name == "legacy/legacy_essex_messages.json[2]":  # the bare id: nothing more to keep
        assert (result.action, result.checksum, result.size) == (Action.ABSENT, None, None)
    else:
        # What Glance's delete says of the file goes along, for the trash's record.
        assert (result.action, result.checksum, result.size) == (Action.ABSENT, *image[1:])


def test_a_deletes_malformed_size_or_md5_is_dropped_and_the_delete_kept():
    message = json.loads(json.loads(body_of("real-glance-33/09-image.delete.json"))
                         ["oslo.message"])
    message["payload"].update(checksum="not an md5", size="4194304")
    result = notifications.parse(_v2(message), NODES)
    assert (result.action, result.image_id) == (Action.ABSENT, PROBE[0])
    assert (result.checksum, result.size) == (None, None)


def _v2(message: dict) -> bytes:
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(message)}).encode()


def _upload(**changes) -> dict:
    message = json.loads(json.loads(body_of("oslo-v2/v2_04_image_upload_active.json"))
                         ["oslo.message"])
    for key, value in changes.items():
        if key.startswith("payload_"):
            message["payload"][key[len("payload_"):]] = value
        else:
            message[key] = value
    return message


def test_fqdn_and_short_publishers_name_the_node_as_written_in_api_nodes():
    for publisher, node in [("image.node2", "node2.example.com"),
                            ("image.node1.example.com", "node1"),
                            ("NODE3", "node3")]:
        assert notifications.parse(_v2(_upload(publisher_id=publisher)), NODES).source == node


def test_glance_default_publisher_names_no_node():
    event = notifications.parse(_v2(_upload(publisher_id="image.localhost")), NODES)
    assert event.action is Action.PRESENT and event.source is None


@pytest.mark.parametrize("publisher", ["image.node4", "image.node2.other.org", "kube9"])
def test_a_publisher_not_in_api_nodes_is_applied_from_the_peers_with_a_warning(publisher,
                                                                               caplog):
    # A rolling change of api_nodes: an upload through a node this one does not know yet.
    event = notifications.parse(_v2(_upload(publisher_id=publisher)), NODES)
    assert event.action is Action.PRESENT and event.source is None
    host = publisher.removeprefix("image.")
    assert f"publisher {host} is not in api_nodes (node1, node2.example.com, node3): the " \
        "image is fetched from the peers" in caplog.text


@pytest.mark.parametrize("message, reason", [
    (_upload(publisher_id="image.node1;rm -rf /"), "does not name a host"),
    (_upload(publisher_id="image.n\u043ede1"), "does not name a host"),
    (_upload(payload_id="../../etc/x"), "is not a UUID"),
    (_upload(payload_id="5F0B5D6C-1C6E-4F5A-9A39-1F4C1E1A7E11"), "not a canonical UUID"),
    (_upload(payload_id="{5f0b5d6c-1c6e-4f5a-9a39-1f4c1e1a7e11}"), "is not a UUID"),
    (_upload(payload_id=12), "is not a UUID"),
    (_upload(payload_checksum="c8fc8077 3e5354afe61636071771906"), "not 32 hex digits"),
    (_upload(payload_checksum="$(reboot)"), "not 32 hex digits"),
    (_upload(payload_size=-1), "not a non-negative integer"),
    (_upload(payload_size="21430272"), "not a non-negative integer"),
    (_upload(payload_size=True), "not a non-negative integer"),
    (_upload(payload_size=1.5), "not a non-negative integer"),
    (_upload(payload="Image storage media is full"), "payload is str, not an image"),
    (_upload(event_type=["image.upload"]), "event_type"),
    (_upload(priority=None), "no priority"),
    (dict(_upload(), payload=None, event_type="image.delete"), "image.delete payload is NoneType"),
])
def test_hostile_or_malformed_notifications_are_rejected_with_a_reason(message, reason):
    with pytest.raises(Rejected) as caught:
        notifications.parse(_v2(message), NODES)
    assert reason in caught.value.reason


@pytest.mark.parametrize("body, reason", [
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b'{"size": NaN}', "not JSON"),
    (b"[1, 2]", "not an object"),
    (b'{"oslo.version": "3.0", "oslo.message": "{}"}', "unknown oslo.version"),
    (b'{"oslo.version": "2.0", "oslo.message": {"event_type": "image.upload"}}',
     "not a JSON text"),
    (_v2({"oslo.version": "2.0", "oslo.message": "{}"}), "inside an oslo envelope"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"x": "' + b"a" * (2 * 1024 * 1024) + b'"}', "over the limit"),
])
def test_undecodable_bodies_are_rejected_with_a_reason(body, reason):
    with pytest.raises(Rejected) as caught:
        notifications.parse(body, NODES)
    assert reason in caught.value.reason


def test_unknown_events_and_other_priorities_are_ignored_not_rejected():
    assert isinstance(notifications.parse(_v2(_upload(event_type="image.member.create")),
                                          NODES), Ignored)
    assert isinstance(notifications.parse(_v2(_upload(priority="WARN")), NODES), Ignored)
    # An ignored event never has its publisher trusted or checked.
    assert isinstance(notifications.parse(_v2(_upload(event_type="task.run",
                                                      publisher_id="image.evil")),
                                          NODES), Ignored)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)
field_values = st.one_of(
    json_values,
    st.sampled_from(["image.upload", "image.update", "image.delete", "image.activate", "INFO",
                     "image.node1", "image.localhost", "node3", "active",
                     "5f0b5d6c-1c6e-4f5a-9a39-1f4c1e1a7e11", "../../etc/passwd",
                     "c8fc807773e5354afe61636071771906", "; rm -rf / #", "\x00"]),
)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "event_type": field_values, "priority": field_values, "publisher_id": field_values,
        "message_id": field_values, "timestamp": field_values,
        "payload": field_values | st.fixed_dictionaries(
            {}, optional={"id": field_values, "status": field_values,
                          "checksum": field_values, "size": field_values}),
    },
)


def _check_result(result):
    assert isinstance(result, (ImageEvent, Ignored))
    if isinstance(result, ImageEvent):
        assert result.source in (None, *NODES.all)
        # Valid by construction: building it again raises nothing.
        ImageEvent(**result.__dict__)


@settings(max_examples=600, deadline=None)
@given(message_like, st.booleans())
def test_parser_returns_a_valid_result_or_rejects(message, wrap):
    body = _v2(message) if wrap else json.dumps(message).encode()
    try:
        _check_result(notifications.parse(body, NODES))
    except Rejected as exc:
        assert exc.reason


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_parser_never_fails_on_arbitrary_bytes(body):
    try:
        _check_result(notifications.parse(body, NODES))
    except Rejected as exc:
        assert exc.reason
