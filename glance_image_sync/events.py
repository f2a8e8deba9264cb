"""What a node is told to do with an image, and how that travels between nodes.

An ``ImageEvent`` is the one thing that flows from the fan-out to every node's
queue: ensure an image is present (with the size and md5 to verify it against)
or ensure it is absent. Everything in it has been validated: the id is a
canonical UUID, the source a node from ``api_nodes`` (or None: any peer), the
checksum 32 hex digits, the size a non-negative integer. The same checks run again when a node
reads its queue, because anyone who can publish to the broker can write there.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from dataclasses import dataclass

from glance_image_sync.exceptions import Rejected

# Largest body read as JSON; a Glance notification with every property set
# stays far below it.
MAX_BODY_BYTES = 1024 * 1024
MAX_SIZE = 2**63 - 1  # off_t
# Fields added since (an ensure-absent event's size and md5, the publisher) are
# optional: a node of an older version ignores them, and reads the rest as before.
WIRE_VERSION = 1

_MD5_RE = re.compile(r"[0-9a-f]{32}")
# What str(uuid.UUID(...)) gives: lower-case hex, hyphenated 8-4-4-4-12.
_CANONICAL_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Action(enum.Enum):
    PRESENT = "present"
    ABSENT = "absent"


@dataclass(frozen=True)
class Ignored:
    """A well-formed message with nothing to do (image.create, errors, ...)."""

    reason: str


@dataclass(frozen=True)
class ImageEvent:
    """Ensure one image is present (verified) or absent on a node.

    ``source`` is the node that published the event, or None when the
    publisher named no node (then any peer with a verified copy serves);
    ``publisher`` is the notification's ``publisher_id`` as it came (checked
    text, for the record of who asked). An ensure-absent event may carry the
    size and md5 that Glance's delete notification gave (or None): what the
    trash records when this node never verified the file itself.
    """

    action: Action
    image_id: str
    source: str | None = None
    checksum: str | None = None
    size: int | None = None
    event_type: str = ""
    message_id: str | None = None
    timestamp: str | None = None
    publisher: str | None = None

    def __post_init__(self):
        image_id(self.image_id)
        if self.action is Action.PRESENT or self.checksum is not None:
            checksum(self.checksum)
        if self.action is Action.PRESENT or self.size is not None:
            size(self.size)

    def to_wire(self) -> bytes:
        return json.dumps(
            {
                "version": WIRE_VERSION,
                "action": self.action.value,
                "image_id": self.image_id,
                "source": self.source,
                "checksum": self.checksum,
                "size": self.size,
                "event_type": self.event_type,
                "message_id": self.message_id,
                "timestamp": self.timestamp,
                "publisher": self.publisher,
            },
            sort_keys=True,
        ).encode()


def from_wire(body: bytes, nodes) -> ImageEvent:
    """The ImageEvent in a node queue's message, or Rejected."""
    doc = load_json(body)
    if not isinstance(doc, dict):
        raise Rejected("event is not a JSON object")
    if doc.get("version") != WIRE_VERSION:
        raise Rejected(f"unknown event version {show(doc.get('version'))}")
    try:
        action = Action(doc.get("action"))
    except (ValueError, TypeError):
        raise Rejected(f"unknown action {show(doc.get('action'))}") from None
    source = doc.get("source")
    if source is not None:
        canonical = nodes.canonical(source)
        if canonical is None:
            raise Rejected(f"source {show(source)} is not a host name")
        # A node this one does not know (api_nodes changed on one node before the
        # other): fetched from the peers, never from a host outside api_nodes.
        source = nodes.resolve(canonical)
    # An ensure-absent event's size and md5 are optional (a fan-out before they
    # were carried sends neither); present, they are checked like any other.
    optional = action is Action.ABSENT
    return ImageEvent(
        action=action,
        image_id=image_id(doc.get("image_id")),
        source=source,
        checksum=None if optional and doc.get("checksum") is None
        else checksum(doc.get("checksum")),
        size=None if optional and doc.get("size") is None else size(doc.get("size")),
        event_type=optional_text(doc.get("event_type"), "event_type"),
        message_id=optional_text(doc.get("message_id"), "message_id") or None,
        timestamp=optional_text(doc.get("timestamp"), "timestamp") or None,
        publisher=optional_text(doc.get("publisher"), "publisher") or None,
    )


# -- field checks, shared by both parsers --------------------------------------


def load_json(body) -> object:
    """Decode a message body strictly: UTF-8 JSON, finite numbers, bounded size."""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise Rejected(f"body is {type(body).__name__}, not bytes")
    if len(body) > MAX_BODY_BYTES:
        raise Rejected(f"body of {len(body)} bytes is over the limit of {MAX_BODY_BYTES}")
    try:
        return json.loads(bytes(body).decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise Rejected("body is not UTF-8") from None
    except RecursionError:
        raise Rejected("body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, over-long ints
        raise Rejected(f"body is not JSON: {str(exc)[:120]}") from None


def _no_constant(name):
    raise ValueError(f"{name} is not a number")


def image_id(value: object) -> str:
    """A canonical (lower-case, hyphenated) UUID: safe as a file name."""
    if isinstance(value, str) and _CANONICAL_UUID_RE.fullmatch(value):
        return value
    if isinstance(value, str) and len(value) == 36 and _is_uuid(value):
        raise Rejected(f"image id {show(value)} is not a canonical UUID")
    raise Rejected(f"image id {show(value)} is not a UUID")


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def checksum(value: object) -> str:
    if not isinstance(value, str) or not _MD5_RE.fullmatch(value.lower()):
        raise Rejected(f"checksum {show(value)} is not 32 hex digits")
    return value.lower()


def size(value: object) -> int:
    # bool is an int to Python, never to JSON producers we accept.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SIZE:
        raise Rejected(f"size {show(value)} is not a non-negative integer")
    return value


def optional_text(value: object, name: str, limit: int = 255) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise Rejected(f"{name} {show(value)} is not a short printable string")
    return value


def show(value: object, limit: int = 80) -> str:
    """A value as it may appear in a log line: repr, bounded, one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
