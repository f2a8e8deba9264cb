"""``glance-image-sync show IMAGE_ID``: what this node knows of one image.

* on disk: size, owner, mode, and whether its md5 is known to be right: the
  sync worker's record says which version of the file it verified (a file
  changed since is "not verified"); ``--verify`` reads the file now and
  compares its md5 with the one of the last recorded event;
* the last event recorded for it (``state.records``): type, when, attempt,
  outcome;
* whether it waits in one of this node's retry queues or its failed queue:
  those are browsed, every message taken unacked and given back in order
  when the channel closes (as ``failed list`` does); this node's own queue
  is not, since its daemon consumes it;
* whether this node remembers it as deleted (its tombstone), and whether it
  is in the store's trash: when it was trashed, by which event and publisher,
  and when it will be purged.

Read-only, without the run lock: it works beside the daemon. Exit status 1
when something needs a human (the image waits in the failed queue, its md5
does not match, the broker or the state could not be read), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

from glance_image_sync.admin import parked
from glance_image_sync.admin.checks import describe
from glance_image_sync.admin.tables import iso, size_text, span, when
from glance_image_sync.broker import connection as brokers
from glance_image_sync.broker import topology
from glance_image_sync.exceptions import (
    EXIT_FAILED,
    EXIT_OK,
    BrokerUnavailable,
    NodeStateError,
    StoreError,
)
from glance_image_sync.state import records
from glance_image_sync.state.tombstones import TOMBSTONES_DIR
from glance_image_sync.store import checksum
from glance_image_sync.store.images import ImageStore, file_version
from glance_image_sync.store.trash import Trash
from glance_image_sync.store.trashrecord import describe_cause, describe_md5


def image_id_argument(value: str) -> str:
    """argparse's type for an image id: any spelling of a UUID, made canonical."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an image id (a UUID)") from None


def on_disk(datadir: str, image_id: str, record, verify: bool) -> dict | None:
    """The file as it is now, and what is known of its md5."""
    path = os.path.join(datadir, image_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"path": path, "error": exc.strerror}
    try:
        st = os.fstat(fd)
        expected = (record or {}).get("checksum")
        verified = (record or {}).get("verified") or {}
        doc = {"path": path, "size": st.st_size, "uid": st.st_uid, "gid": st.st_gid,
               "mode": f"{st.st_mode & 0o7777:04o}", "mtime": st.st_mtime,
               "described": describe(path, st), "expected_md5": expected,
               "md5": None, "verified": None}
        if verify:
            doc["md5"], doc["verified"] = checksum.md5_of_fd(fd), "now"
        elif verified.get("file") == list(file_version(st)):
            doc["md5"], doc["verified"] = verified.get("md5"), "by the sync worker"
        doc["matches"] = (doc["md5"] == expected) if doc["md5"] and expected else None
        return doc
    finally:
        os.close(fd)


def in_queues(settings, image_id: str) -> dict:
    """Where the image's events wait among this node's retry and failed queues."""
    node = settings.nodes.this
    names = [q.name for q in topology.node_queues(node, settings.topology)[1:]]
    found = {"retrying": [], "failed": [], "error": None}
    try:
        with brokers.connected(settings.broker) as connection:
            for name in names:
                try:
                    messages = parked.browse(connection, name, settings.nodes)
                except connection.channel_errors as exc:
                    if getattr(exc, "code", None) != 404:
                        raise
                    continue  # not declared yet (no fan-out ran): nothing waits there
                for message in messages:
                    if message.image_id == image_id:
                        kind = "failed" if name == topology.failed_queue_name(node) \
                            else "retrying"
                        found[kind].append({"queue": name, "action": message.action,
                                            "event_type": message.event_type,
                                            "attempts": message.attempts,
                                            "error": message.error})
    except BrokerUnavailable as exc:
        found["error"] = str(exc)
    except brokers.ERRORS as exc:
        found["error"] = f"{settings.broker.redacted()}: {brokers.describe(exc)}"
    return found


def tombstone(state_dir: str, image_id: str) -> float | None:
    try:
        return os.stat(os.path.join(state_dir, TOMBSTONES_DIR, image_id)).st_mtime
    except OSError:
        return None


def in_trash(settings, image_id: str) -> dict | None:
    """What the store's trash recorded of the image, and when it will be purged."""
    try:
        store = ImageStore(settings.store)
    except StoreError as exc:
        return {"error": str(exc)}
    try:
        entry = Trash(store).get(image_id)
    except (OSError, StoreError) as exc:
        return {"error": str(exc)}
    finally:
        store.close()
    if entry is None:
        return None
    return {"trashed_at": entry.trashed_at, "purge_at": entry.trashed_at + settings.deletes.grace,
            "event_type": entry.event_type, "message_id": entry.message_id,
            "publisher": entry.publisher, "source": entry.source, "by": entry.by,
            "size": entry.size, "md5": entry.md5, "md5_from": entry.md5_from,
            "described": f"{describe_cause(entry)}; {entry.size} bytes, md5 "
                         f"{describe_md5(entry)}"}


def gather(settings, image_id: str, verify: bool = False) -> dict:
    state_error = None
    try:
        record = records.load(settings.store.state_dir, image_id)
    except NodeStateError as exc:
        record, state_error = None, str(exc)
    doc = {
        "image_id": image_id,
        "node": settings.nodes.this,
        "on_disk": on_disk(settings.store.datadir, image_id, record, verify),
        "last_event": record,
        "state_error": state_error,
        "queues": in_queues(settings, image_id),
        "deleted": tombstone(settings.store.state_dir, image_id),
        "trash": in_trash(settings, image_id),
    }
    doc["problems"] = problems(doc)
    return doc


def problems(doc: dict) -> list:
    found = []
    disk = doc["on_disk"] or {}
    if disk.get("error"):
        found.append(f"cannot read {disk['path']}: {disk['error']}")
    if disk.get("matches") is False:
        found.append(f"the md5 of {disk['path']} is {disk['md5']}, the last event's "
                     f"{disk['expected_md5']}")
    if doc["queues"]["failed"]:
        found.append("an event of it ran out of attempts and waits in the failed queue "
                     "('glance-image-sync failed replay " + doc["image_id"] + "' after a fix)")
    if doc["queues"]["error"]:
        found.append(f"the queues could not be read: {doc['queues']['error']}")
    if doc["state_error"]:
        found.append(doc["state_error"])
    if (doc["trash"] or {}).get("error"):
        found.append(f"the trash could not be read: {doc['trash']['error']}")
    return found


def render_table(doc: dict, now: float) -> str:
    lines = [f"image {doc['image_id']} on {doc['node']}"]
    disk = doc["on_disk"]
    if disk is None:
        lines.append("  on disk:    no such file")
    elif disk.get("error"):
        lines.append(f"  on disk:    {disk['path']}: {disk['error']}")
    else:
        lines.append(f"  on disk:    {size_text(disk['size'])} ({disk['size']} bytes); "
                     f"{disk['described']}; modified {iso(disk['mtime'])}")
        lines.append(f"  md5:        {_md5_text(disk)}")
    record = doc["last_event"]
    if record is None:
        lines.append("  last event: none recorded")
    else:
        outcome = "applied" if record["ok"] else "FAILED"
        lines.append(f"  last event: {record['event_type'] or record['action']} "
                     f"(ensure {record['action']}), {outcome} {when(record['time'], now)}, "
                     f"attempt {record['attempt']}: {record['detail']}")
    queues = doc["queues"]
    if queues["error"]:
        lines.append(f"  queues:     unknown ({queues['error']})")
    elif not queues["retrying"] and not queues["failed"]:
        lines.append("  queues:     in none of this node's retry queues nor its failed queue")
    for kind in ("retrying", "failed"):
        for entry in queues[kind]:
            lines.append(f"  queues:     {kind} in {entry['queue']}: {entry['event_type']}, "
                         f"attempt {entry['attempts']}, last error: {entry['error']}")
    lines.append("  deleted:    " + ("no" if doc["deleted"] is None else
                                     f"yes, remembered since {when(doc['deleted'], now)} "
                                     "(no event brings it back)"))
    lines.append("  trash:      " + _trash_text(doc, now))
    if doc["problems"]:
        lines += ["", "NEEDS ATTENTION:"] + [f"  - {problem}" for problem in doc["problems"]]
    return "\n".join(lines) + "\n"


def _trash_text(doc: dict, now: float) -> str:
    trash = doc["trash"]
    if trash is None:
        return "not in the trash"
    if trash.get("error"):
        return f"unknown ({trash['error']})"
    left = trash["purge_at"] - now
    due = f"in {span(left)}" if left > 0 else "at the next purge"
    return (f"{trash['described']}; purged {iso(trash['purge_at'])} ({due}; sooner if the "
            f"store runs short of space): 'glance-image-sync restore {doc['image_id']}' "
            "puts it back")


def _md5_text(disk: dict) -> str:
    if disk["verified"] is None:
        return ("not verified since the file last changed (or no record of it): --verify "
                "reads it now")
    if disk["matches"] is None:
        return f"{disk['md5']} ({'computed now' if disk['verified'] == 'now' else 'cached'}; " \
               "no event's md5 to compare it with)"
    verdict = "matches" if disk["matches"] else "DOES NOT MATCH"
    how = ("computed now" if disk["verified"] == "now" else
           "verified by the sync worker; the file has not changed since")
    return f"{disk['md5']}, {verdict} the last event's ({how})"


def main(args, settings, out=None, now=None) -> int:
    """The command: print what is known of the image, return the exit status."""
    doc = gather(settings, args.image_id, verify=args.verify)
    (out or sys.stdout).write(json.dumps(doc, indent=2, sort_keys=True) + "\n"
                              if args.format == "json"
                              else render_table(doc, time.time() if now is None else now))
    return EXIT_FAILED if doc["problems"] else EXIT_OK
