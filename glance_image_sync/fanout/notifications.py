"""Glance's notifications, as they arrive, turned into ImageEvents.

Three formats reach the notification queue:

* legacy (Essex to Grizzly, ``notifier_strategy = rabbit``): flat JSON,
  ``publisher_id`` the bare host name;
* oslo.messaging v1 (driver ``messaging``): flat JSON with ``_unique_id``,
  ``publisher_id`` ``image.<host>``;
* oslo.messaging v2 (driver ``messagingv2``): ``{"oslo.version": "2.0",
  "oslo.message": "<the v1 message as JSON text>"}``.

Which event means what (doc/architecture.rst, README): ``image.upload`` and ``image.activate``
ensure the image is present, ``image.update`` does when the image is active,
``image.delete`` ensures it is absent (whatever the payload's status says;
Essex sent only the id; the size and md5 a later Glance's payload carries go
along, for the trash's record, when they are well-formed). Everything else,
and any priority but INFO, is ignored. Nothing else about a message is
trusted: ``parse`` either returns a validated result or raises ``Rejected``
with the reason.
"""

from __future__ import annotations

from oslo_log import log as logging

from glance_image_sync import events
from glance_image_sync import nodes as nodes_mod
from glance_image_sync.events import Action, Ignored, ImageEvent, show
from glance_image_sync.exceptions import Rejected

LOG = logging.getLogger(__name__)
_ACTIONS = {
    "image.upload": Action.PRESENT,
    "image.activate": Action.PRESENT,
    "image.update": Action.PRESENT,
    "image.delete": Action.ABSENT,
}


def parse(body, nodes) -> ImageEvent | Ignored:
    """The event in a notification body, Ignored, or raise Rejected."""
    message = _unwrap(events.load_json(body))
    event_type = _text_field(message, "event_type")
    priority = _text_field(message, "priority")
    publisher_id = _text_field(message, "publisher_id")
    message_id = events.optional_text(message.get("message_id"), "message_id") or None
    timestamp = events.optional_text(message.get("timestamp"), "timestamp") or None
    payload = message.get("payload")

    if priority.upper() != "INFO":
        return Ignored(f"{event_type} at priority {priority}")
    action = _ACTIONS.get(event_type)
    if action is None:
        return Ignored(f"{event_type} needs no action")

    source = publisher_node(publisher_id, nodes)
    common = dict(event_type=event_type, source=source, message_id=message_id,
                  timestamp=timestamp, publisher=publisher_id)
    if action is Action.ABSENT:
        return ImageEvent(Action.ABSENT, image_id=_deleted_image_id(payload),
                          **_deleted_size_and_md5(payload), **common)

    if not isinstance(payload, dict):
        raise Rejected(f"{event_type} payload is {type(payload).__name__}, not an image")
    image_id = events.image_id(payload.get("id"))
    status = payload.get("status")
    if event_type == "image.update" and status != "active":
        return Ignored(f"image.update of {image_id} in status {show(status)}")
    if payload.get("checksum") is None or payload.get("size") is None:
        # Essex sent image.upload before the data was stored; the
        # image.update that follows carries the checksum.
        return Ignored(f"{event_type} of {image_id} carries no checksum and size yet")
    return ImageEvent(
        Action.PRESENT,
        image_id=image_id,
        checksum=events.checksum(payload.get("checksum")),
        size=events.size(payload.get("size")),
        **common,
    )


def publisher_node(publisher_id: str, nodes) -> str | None:
    """The node that published, or None when it names no node of ``api_nodes``.

    None for Glance's default ``image.localhost``, and for a well-formed host
    name that is not (or no longer, or not yet) in ``api_nodes``, as during a
    rolling change of the list: the image is then fetched from the peers,
    never from a host outside ``api_nodes``. Raises Rejected for a publisher
    that is not a host name at all (look-alike letters, shell characters...).
    """
    host = publisher_id[len("image."):] if publisher_id.startswith("image.") else publisher_id
    canonical = nodes_mod.normalize_hostname(host)
    if canonical is None:
        raise Rejected(f"publisher_id {show(publisher_id)} does not name a host")
    if canonical == nodes_mod.UNKNOWN_PUBLISHER_HOST:
        return None
    node = nodes.resolve(canonical)
    if node is None:
        LOG.warning("publisher %s is not in api_nodes (%s): the image is fetched from the "
                    "peers", canonical, ", ".join(nodes.all))
    return node


def _unwrap(doc: object) -> dict:
    """The notification itself, out of an oslo.messaging v2 envelope if any."""
    if isinstance(doc, dict) and ("oslo.message" in doc or "oslo.version" in doc):
        if doc.get("oslo.version") != "2.0":
            raise Rejected(f"unknown oslo.version {show(doc.get('oslo.version'))}")
        inner = doc.get("oslo.message")
        if not isinstance(inner, str):
            raise Rejected("oslo.message is not a JSON text")
        doc = events.load_json(inner)
        if isinstance(doc, dict) and ("oslo.message" in doc or "oslo.version" in doc):
            raise Rejected("an oslo envelope inside an oslo envelope")
    if not isinstance(doc, dict):
        raise Rejected(f"notification is a JSON {type(doc).__name__}, not an object")
    return doc


def _text_field(message: dict, name: str) -> str:
    value = message.get(name)
    if value is None:
        raise Rejected(f"notification has no {name}")
    text = events.optional_text(value, name)
    if not text:
        raise Rejected(f"{name} is empty")
    return text


def _deleted_size_and_md5(payload: object) -> dict:
    """The size and md5 a delete's payload gives, each only if well-formed.

    Only a record of what Glance said, never a reason to act or not: a delete
    is applied whatever they are, so one that is malformed is dropped, not
    rejected with the delete.
    """
    found = {}
    if not isinstance(payload, dict):
        return found
    for name, check in (("checksum", events.checksum), ("size", events.size)):
        try:
            found[name] = check(payload.get(name))
        except Rejected:
            pass
    return found


def _deleted_image_id(payload: object) -> str:
    if isinstance(payload, str):  # Essex: the id and nothing else
        return events.image_id(payload)
    if isinstance(payload, dict):
        return events.image_id(payload.get("id"))
    raise Rejected(f"image.delete payload is {type(payload).__name__}, not an image")
