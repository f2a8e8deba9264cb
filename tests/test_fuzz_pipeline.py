"""Hostile messages, generated: the parser, and the whole way from a message to an action.

Anyone who can publish to the broker can write to Glance's notification queue and to every
node's own queue. Hypothesis generates well over 10,000 such messages: valid Glance
notifications with up to three fields made hostile (path traversal, NUL bytes, Unicode
look-alikes of UUIDs and host names, shell metacharacters, option-like strings, huge values,
wrong types), in every envelope (legacy, oslo v1, v2, nested and broken ones), forged events
for a node queue, and plain garbage. Each message goes the way the daemon sends it:
``notifications.parse`` (the fan-out), ``to_wire``/``from_wire`` (the node queue) and
``ImageSync.apply`` on a real ``ImageStore`` in a temporary directory, with real
``Tombstones`` and the real ``Rsync``, whose ``subprocess.Popen`` is replaced by a recorder that
plays the peer: no program ever runs here, and every one that would have run is known.

What must hold for every message:

* nothing but ``Rejected`` (with a one-line printable reason) escapes the parsers, and
  nothing at all escapes ``apply``;
* a rejected or ignored message runs no program and changes no file anywhere;
* an accepted one carries exactly the fields of the message, each valid: the id a canonical
  UUID, the source a node of ``api_nodes`` (ASCII only), the checksum 32 hex digits, the size
  a non-negative integer;
* every program it runs is ``rsync`` with an argument list, options before ``--``, the
  remote ``<user>@<peer>:<datadir>/<id>`` and the local temporary copy as its only operands,
  a timeout and a minimal environment;
* no file outside the store changes; in the store only entries named by an accepted event's
  id change, no temporary file is left, and a file installed under an id holds that image's
  bytes, with the configured mode and the store's owner.
"""

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glance_image_sync import events
from glance_image_sync.events import Action, Ignored, ImageEvent
from glance_image_sync.exceptions import Rejected
from glance_image_sync.fanout import notifications
from glance_image_sync.nodes import Nodes
from glance_image_sync.settings import StoreSettings, TransferSettings
from glance_image_sync.state.tombstones import Tombstones
from glance_image_sync.store.images import TEMP_PREFIX, ImageStore
from glance_image_sync.store.trash import TRASH_DIR, Trash
from glance_image_sync.sync.apply import ImageSync, Outcome
from glance_image_sync.transfer.sessions import Rsync

NODES = Nodes(["node1", "kube2.example.com", "node3"], "kube2")
PEERS = ("node1", "node3")
RSYNC_USER = "glance"
SSH_CONFIG = "/etc/glance/glance-image-sync-ssh_config"
FILE_MODE = 0o640
STORE_OWNER = 4242  # with root, the store belongs to this id (as to glance on a real node)
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MD5_RE = re.compile(r"[0-9a-fA-F]{32}")
MESSAGES_WANTED = 10_000
md5_texts = st.binary(min_size=16, max_size=16).map(bytes.hex)


def _image(seed: int) -> tuple:
    data = hashlib.sha512(b"image %d" % seed).digest() * (seed + 1)
    return str(uuid.UUID(int=seed * 0x1F2E3D4C5B6A7988 + 0x4000_8000_0000_0000_0000)), data


# Images the peers hold. Locally, at the start of every example: IN_PLACE is installed and
# verified, MISSING is not there, CORRUPT has the right size but wrong bytes, SYMLINK is a
# symlink to a file outside the store, DELETED was deleted earlier (a tombstone), and NOWHERE
# is on no peer at all.
IN_PLACE, MISSING, CORRUPT, SYMLINK, DELETED, NOWHERE = (_image(seed) for seed in range(6))
POOL = {image_id: data for image_id, data in (IN_PLACE, MISSING, CORRUPT, SYMLINK, DELETED)}
ALL_IDS = [image[0] for image in (IN_PLACE, MISSING, CORRUPT, SYMLINK, DELETED, NOWHERE)]


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# -- hostile values ---------------------------------------------------------------------

# Characters that look like (or fold onto, or parse as) those of a UUID, an md5 or a host name.
CONFUSABLES = {
    "a": "\u0430\uff41\u0251", "b": "\u0184\uff42", "c": "\u0441\u217d", "d": "\u0501\u217e",
    "e": "\u0435\uff45", "f": "\uff46", "i": "\u0456\u0131", "k": "\u212a\u043a", "l": "\u217c",
    "m": "\u217f", "n": "\u0578\uff4e", "o": "\u043e\u03bf", "s": "\u017f", "u": "\u057d",
    "x": "\u0445", "-": "\u2010\u2011\u2212\uff0d\u00ad", ".": "\uff0e\u3002\u2024",
    **{digit: chr(0xFF10 + int(digit)) + chr(0x0660 + int(digit)) + chr(0x1D7CE + int(digit))
       for digit in "0123456789"},
}
INVISIBLE = ["\u200b", "\u200d", "\u2060", "\ufeff", "\u0301", "\x00", "\n", " "]


@st.composite
def look_alikes(draw, text: str):
    """``text`` with one character swapped for a look-alike, or an invisible one added."""
    positions = [i for i, c in enumerate(text) if c.lower() in CONFUSABLES]
    if positions and draw(st.integers(min_value=0, max_value=3)):
        i = draw(st.sampled_from(positions))
        return text[:i] + draw(st.sampled_from(CONFUSABLES[text[i].lower()])) + text[i + 1:]
    i = draw(st.integers(min_value=0, max_value=len(text)))
    return text[:i] + draw(st.sampled_from(INVISIBLE)) + text[i:]


def _id_variants(image_id: str) -> list:
    """Spellings of an id that must never name a file: each is rejected."""
    return [
        image_id.upper(), "{" + image_id + "}", "urn:uuid:" + image_id, image_id.replace("-", ""),
        image_id + "\x00", "\x00" + image_id[1:], image_id[:35] + "\x00",
        "../" + image_id, "../" + image_id[3:], "../../../../etc/passwd"[:36].ljust(36, "/"),
        image_id[:33] + "/..", "/var/lib/glance/images/" + image_id, "./" + image_id[2:],
        image_id + "/", image_id[:35] + "*", image_id[:35] + ";", " " + image_id[1:],
        image_id[:8] + "/" + image_id[9:], image_id.replace("-", "/"), image_id[:8] + "\x00" +
        image_id[9:], "-" + image_id[1:], "--delete" + image_id[8:], image_id[:35] + "\u0301",
    ]


HOSTILE_TEXT = [
    "", " ", ".", "..", "../", "../../etc/passwd", "/etc/passwd", "/", "//", "~root", "*", "?",
    "[a-z]*", "\x00", "a\x00b", "\n", "\r\nX-Injected: yes", "\u2028", "\u202e", "\ufeff",
    "$(touch /tmp/pwned)", "`touch /tmp/pwned`", "; rm -rf / #", "| sh", "&& reboot", "> /etc/x",
    "-rf", "--delete", "-e sh -c id", "-oProxyCommand=touch /tmp/pwned", "--rsh=sh",
    "\uff0fetc\uff0fpasswd", "\u2215etc\u2215passwd", "..\u2215..\u2215etc", "%2e%2e%2fetc",
    "..\\..\\etc", "\ud800", "A" * 300, "\u0430" * 256,
]
HOSTILE_HOSTS = [
    "localhost", "image.", "image.localhost.localdomain", "image.image.node1", "image.evil",
    "image.node1;id", "image.node1 node3", "image.node1/../node3", "image.-node1",
    "image.node1.evil.org", "image.node4", "image.node", "image.xn--node1-", "node1@evil",
    "image.-oProxyCommand=sh", "image.node1:22", "image.[::1]", "image.127.0.0.11",
    "image.node1..", "image.*", "image.node?", "image.kube2.example.com.evil",
]

# JSON scalars and containers of the wrong kind for any field.
wrong_types = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.sampled_from([[[[[[["deep"]]]]]], {"id": {"id": {"id": "x"}}}, 2**63, -1, 1e308, "42",
                     "0x10", "1e3", " 1"]),
)
# Strings and numbers past every limit: 2 MiB texts are over the body limit, 5000-digit
# integers over Python's own limit for int().
huge = st.one_of(
    st.integers(min_value=8, max_value=21).map(lambda bits: "x" * (1 << bits)),
    st.just(events.MAX_SIZE + 1), st.just(2**64), st.just("HUGE-INT"),
)
hostile_text = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=24))
hostile = st.one_of(hostile_text, hostile_text, wrong_types, huge)

image_ids = st.one_of(st.sampled_from(ALL_IDS), st.sampled_from(ALL_IDS), st.uuids().map(str))
publishers = st.sampled_from([
    "image.node1", "node1", "image.NODE3", "image.node3.", "image.node1.example.com",
    "image.kube2", "image.kube2.example.com", "image.localhost", "localhost",
])
sources = st.sampled_from(["node1", "node3", "kube2", "NODE1.example.com", "localhost"])
hostile_ids = st.one_of(image_ids.flatmap(look_alikes),
                        image_ids.flatmap(lambda i: st.sampled_from(_id_variants(i))))
# What replaces a field: mostly values aimed at what the field means, else anything.
HOSTILE_FOR = {
    "publisher_id": st.one_of(publishers.flatmap(look_alikes), st.sampled_from(HOSTILE_HOSTS)),
    "source": st.one_of(sources.flatmap(look_alikes),
                        st.sampled_from(HOSTILE_HOSTS).map(lambda h: h[len("image."):])),
    "id": hostile_ids, "image_id": hostile_ids, "payload": hostile_ids,
    "checksum": st.one_of(md5_texts.flatmap(look_alikes), md5_texts.map(lambda h: h[:31]),
                          md5_texts.map(lambda h: h + "0"), md5_texts.map(lambda h: " " + h)),
    "size": wrong_types,
    "event_type": st.sampled_from(["image.upload", "image.delete"]).flatmap(look_alikes),
    "priority": st.sampled_from(["INFO"]).flatmap(look_alikes),
    "action": st.sampled_from(["present", "absent"]).flatmap(look_alikes),
}


def hostile_for(field: str):
    aimed = HOSTILE_FOR.get(field)
    return hostile if aimed is None else st.one_of(aimed, aimed, hostile)


def _encode(doc, ascii_only=True) -> bytes:
    """JSON bytes; the marker "HUGE-INT" becomes a 5000-digit number (json.dumps refuses)."""
    text = json.dumps(doc, ensure_ascii=ascii_only)
    return text.replace('"HUGE-INT"', "9" * 5000).encode("utf-8", "surrogatepass")


# -- messages --------------------------------------------------------------------------


@st.composite
def glance_payloads(draw, image_id):
    data = POOL.get(image_id)
    if data is not None and draw(st.booleans()):  # what the peers hold, so it installs
        checksum = draw(st.sampled_from([_md5(data), _md5(data).upper()]))
        size = len(data)
    else:
        checksum = draw(md5_texts)
        size = draw(st.sampled_from([0, 1, 21430272])
                    | st.integers(min_value=0, max_value=events.MAX_SIZE))
    return {
        "id": image_id, "status": draw(st.sampled_from(["active", "active", "saving", "deleted"])),
        "checksum": checksum, "size": size, "name": draw(st.text(max_size=8)),
        "container_format": "bare", "disk_format": "qcow2", "properties": {}, "tags": [],
    }


@st.composite
def glance_notifications(draw):
    """A well-formed Glance notification (not necessarily one that asks for action)."""
    image_id = draw(image_ids)
    event_type = draw(st.sampled_from([
        "image.upload", "image.activate", "image.update", "image.delete", "image.upload",
        "image.delete", "image.create", "image.send", "image.member.create", "task.run"]))
    payload = draw(glance_payloads(image_id))
    if event_type == "image.delete" and draw(st.booleans()):
        payload = image_id  # Essex sent the id alone
    return {
        "message_id": str(draw(st.uuids())), "publisher_id": draw(publishers),
        "event_type": event_type, "priority": draw(st.sampled_from(["INFO", "INFO", "info",
                                                                    "WARN", "ERROR"])),
        "payload": payload, "timestamp": "2024-05-01 10:42:07.123456",
    }


# The fields that decide what runs and where come up more often.
NOTIFICATION_FIELDS = ["event_type", "priority", "publisher_id", "publisher_id", "message_id",
                       "timestamp", "payload"]
PAYLOAD_FIELDS = ["id", "id", "status", "checksum", "size"]
WIRE_FIELDS = ["version", "action", "image_id", "image_id", "source", "source", "checksum",
               "size", "event_type", "message_id", "timestamp"]


@st.composite
def mutated(draw, doc, fields, nested=None):
    """``doc`` with up to three fields replaced by hostile values, or dropped."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        where = doc
        if nested and isinstance(doc.get(nested), dict) and draw(st.booleans()):
            where, name = doc[nested], draw(st.sampled_from(PAYLOAD_FIELDS))
        else:
            name = draw(st.sampled_from(fields))
        if draw(st.integers(min_value=0, max_value=9)) == 0:
            where.pop(name, None)
        else:
            # A copy: sampled_from hands out one shared object, which a later mutation
            # would change, in every example, and could put inside itself.
            where[name] = copy.deepcopy(draw(hostile_for(name)))
    return doc


# Half of them arrive intact, as Glance sends them.
ENVELOPES = ["legacy", "v1", "v2"] * 4 + ["v2-in-v2", "v2-version", "v2-dict", "v2-junk",
             "list", "payload-v2", "utf-16", "bom", "truncated", "trailing", "raw-utf8"]


def _v2(message) -> dict:
    return {"oslo.version": "2.0", "oslo.message": json.dumps(message)}


@st.composite
def enveloped(draw, message):
    """The notification as bytes on the wire; the message too when it arrives intact."""
    kind = draw(st.sampled_from(ENVELOPES))
    if kind == "legacy":
        return _encode(message), message
    if kind == "v1":
        return _encode({**message, "_unique_id": uuid.uuid4().hex}), message
    if kind == "v2":
        return _encode(_v2(message)), message
    if kind == "raw-utf8":  # unescaped UTF-8, lone surrogates included
        return _encode(message, ascii_only=False), None
    if kind == "v2-in-v2":
        return _encode(_v2(_v2(message))), None
    if kind == "v2-version":
        version = draw(st.sampled_from(["1.0", "2", 2, 2.0, None, "2.0 ", "\uff12.0"]))
        return _encode({"oslo.version": version, "oslo.message": json.dumps(message)}), None
    if kind == "v2-dict":
        return _encode({"oslo.version": "2.0", "oslo.message": message}), None
    if kind == "v2-junk":
        return _encode({"oslo.version": "2.0", "oslo.message": draw(hostile)}), None
    if kind == "list":
        return _encode([message]), None
    if kind == "payload-v2":
        return _encode(_v2({**message, "payload": _v2(message.get("payload"))})), None
    body = _encode(_v2(message))
    if kind == "utf-16":
        return body.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass"), None
    if kind == "bom":
        return b"\xef\xbb\xbf" + body, None
    if kind == "truncated":
        return body[: draw(st.integers(min_value=0, max_value=len(body) - 1))], None
    return body + draw(st.sampled_from([b"}", b" x", b"\x00", b"{}", b"\n\n[]"])), None


@st.composite
def wire_events(draw):
    """A forged message for a node's own queue, past the fan-out."""
    image_id = draw(image_ids)
    data = POOL.get(image_id, b"")
    doc = {
        "version": 1, "action": draw(st.sampled_from(["present", "absent"])),
        "image_id": image_id, "source": draw(st.none() | sources),
        "checksum": _md5(data), "size": len(data), "event_type": "image.upload",
        "message_id": None, "timestamp": None,
    }
    doc = draw(mutated(doc, WIRE_FIELDS))
    if draw(st.integers(min_value=0, max_value=4)) == 0:
        doc["version"] = draw(st.sampled_from([True, 1.0, "1", 2, 0, None]))
    return _encode(doc), doc


@st.composite
def deliveries(draw):
    """(queue, body, the decoded document when it reached the parser intact, or None)."""
    kind = draw(st.sampled_from(["notification"] * 6 + ["wire"] * 3 + ["bytes"]))
    if kind == "notification":
        message = draw(mutated(draw(glance_notifications()), NOTIFICATION_FIELDS, "payload"))
        body, intact = draw(enveloped(message))
        return "notifications", body, intact
    if kind == "wire":
        body, doc = draw(wire_events())
        return "node", body, doc
    return draw(st.sampled_from(["notifications", "node"])), draw(st.binary(max_size=200)), None


peer_behaviours = st.fixed_dictionaries(
    {peer: st.sampled_from(["serves", "serves", "fails", "wrong bytes"]) for peer in PEERS})


# -- the node under test ----------------------------------------------------------------


class Peers:
    """Stands in for ``subprocess.Popen``: records each command and plays the peer it names.

    A peer that ``serves`` writes the image it holds into the destination, as rsync does
    (bytes, then the source's mode); ``wrong bytes`` writes as many bytes of something
    else; ``fails`` exits 23 like rsync on a file the sender does not have.
    """

    def __init__(self):
        self.launches = []
        self.behaviour = {}
        self.datadir = None

    def __call__(self, argv, **kwargs):
        launch = {"argv": list(argv), "kwargs": kwargs, "dest_stat": None, "timeout": []}
        self.launches.append(launch)
        return _FakeRsync(self, launch)


class _FakeRsync:
    pid = None  # os.killpg(None) would raise: no timeout path may kill a real group

    def __init__(self, peers, launch):
        self.peers, self.launch, self.returncode = peers, launch, None

    def communicate(self, timeout=None):
        self.launch["timeout"].append(timeout)
        argv = self.launch["argv"]
        remote, dest = argv[argv.index("--") + 1:]
        node, _, path = remote.partition("@")[2].partition(":")
        image_id = os.path.basename(path)
        if os.path.dirname(dest) == self.peers.datadir:
            self.launch["dest_stat"] = os.lstat(dest)
        behaviour = self.peers.behaviour.get(node, "fails")
        data = POOL.get(image_id)
        if behaviour == "fails" or data is None:
            self.returncode = 23
            return b"", f'rsync: link_stat "{path}" failed: No such file (2)\n'.encode()
        if behaviour == "wrong bytes":
            data = bytes(reversed(data))
        fd = os.open(dest, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.write(fd, data)
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        self.returncode = 0
        return f"{_md5(data)} {len(data)}\n".encode(), b""


def _refuse(*args, **kwargs):
    raise AssertionError(f"a program was started outside transfer.Rsync: {args!r}")


class Node:
    """One glance-api node's state on disk; ``reset`` brings it back for every example."""

    def __init__(self, root: Path, peers: Peers):
        self.root = root
        self.images = self.root / "images"
        self.state = self.root / "state"
        self.outside = self.root / "outside"
        for path in (self.images, self.state, self.outside / "etc"):
            path.mkdir(parents=True)
        if os.geteuid() == 0:  # installed files must get the store's owner, not ours
            os.chown(self.images, STORE_OWNER, STORE_OWNER)
        (self.outside / "secret").write_bytes(b"never read, moved or removed")
        (self.outside / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
        (self.outside / MISSING[0]).write_bytes(MISSING[1])  # a decoy, one level up
        self.rsync = Rsync(TransferSettings(user=RSYNC_USER, ssh_config_file=SSH_CONFIG,
                                            connect_timeout=5, io_timeout=30, total_timeout=60,
                                            bwlimit=0, remote_datadir=str(self.images)))
        self.store = None
        peers.datadir = str(self.images)

    def reset(self):
        """The store and the record of deletions as at the start of every example."""
        for directory in (self.images, self.state / "deleted"):
            if directory.exists():
                for entry in os.scandir(directory):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
        self._install(IN_PLACE[0], IN_PLACE[1])
        self._install(CORRUPT[0], bytes(len(CORRUPT[1])))
        os.symlink("../outside/secret", self.images / SYMLINK[0])
        (self.images / ".glance-own-file").write_bytes(b"not ours")
        self.close()
        # A new store each time: its cache of verified files must not outlive the files.
        self.store = ImageStore(StoreSettings(datadir=str(self.images), file_mode=FILE_MODE,
                                              state_dir=str(self.state), deleted_memory=3600))
        self.tombstones = Tombstones(str(self.state), 3600)
        (self.state / "deleted" / DELETED[0]).touch()
        self.sync = ImageSync(NODES, self.store, self.rsync, self.tombstones,
                              trash=Trash(self.store))
        return self

    def _install(self, image_id, data):
        path = self.images / image_id
        path.write_bytes(data)
        path.chmod(FILE_MODE)

    def close(self):
        if self.store is not None:
            self.store.close()
            self.store = None


def snapshot(root: Path) -> dict:
    """Every entry under ``root``: what it is, its metadata and its content."""
    found = {}
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content = "-> " + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = _md5(f.read())
            else:
                content = None
            # A directory's own times change with its entries, which are compared anyway.
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            found[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode),
                                                  stat.S_IMODE(st.st_mode), st.st_uid,
                                                  st.st_gid, st.st_size, mtime, content)
    return found


class LogLines(logging.Handler):
    """Every record of the package, formatted (so a bad format string fails the test)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def guarded(monkeypatch):
    """Popen replaced by the recording peers; every other way to start a program refused."""
    peers = Peers()
    monkeypatch.setattr(subprocess, "Popen", peers)
    for name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execvp", "execvpe",
                 "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp",
                 "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn",
                 "posix_spawnp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse)
    return peers


@contextlib.contextmanager
def package_log_lines():
    """Every line the package logs, at every level, kept here and not in pytest's report.

    Entered in the test itself: pytest attaches its own handler to loggers that do not
    propagate when a test starts, and only then.
    """
    log = LogLines()
    logger = logging.getLogger("glance_image_sync")
    saved = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(log)
    try:
        yield log
    finally:
        logger.removeHandler(log)
        logger.setLevel(saved[0])  # not .level =: setLevel also clears the loggers' caches
        logger.propagate = saved[1]


# -- checks -----------------------------------------------------------------------------


def check_reason(reason: str) -> None:
    """A reason goes into a log line and a message header: one printable line."""
    assert reason and reason.isprintable() and len(reason) < 2000, reason


def check_accepted_notification(event: ImageEvent, message) -> None:
    """An event carries exactly what the notification said, and only valid values."""
    if message is None:
        return
    payload = message["payload"]
    raw_id = payload if isinstance(payload, str) else payload["id"]
    assert raw_id == event.image_id and UUID_RE.fullmatch(raw_id)
    publisher = message["publisher_id"]
    host = publisher[len("image."):] if publisher.startswith("image.") else publisher
    assert host.isascii() and NODES.canonical(host) is not None, publisher
    # A host name that is not in api_nodes (Glance's "localhost", or a node this one does
    # not know) names no source: the image then comes from the peers.
    assert NODES.resolve(host) == event.source, publisher
    assert message["event_type"] == event.event_type
    if event.action is Action.PRESENT:
        assert event.event_type != "image.delete"
        assert MD5_RE.fullmatch(payload["checksum"])
        assert event.checksum == payload["checksum"].lower()
        assert type(payload["size"]) is int and event.size == payload["size"] >= 0
    else:
        assert event.event_type == "image.delete"


def check_accepted_wire(event: ImageEvent, doc) -> None:
    assert doc["image_id"] == event.image_id and UUID_RE.fullmatch(event.image_id)
    assert event.action.value == doc["action"]
    if doc.get("source") is None:
        assert event.source is None
    else:
        assert doc["source"].isascii() and NODES.canonical(doc["source"]) is not None
        assert NODES.resolve(doc["source"]) == event.source
    if event.action is Action.PRESENT:
        assert MD5_RE.fullmatch(doc["checksum"]) and event.checksum == doc["checksum"].lower()
        assert type(doc["size"]) is int and event.size == doc["size"] >= 0


def check_valid_event(event: ImageEvent) -> None:
    assert UUID_RE.fullmatch(event.image_id)
    assert event.source is None or event.source in NODES.all
    if event.action is Action.PRESENT:
        assert re.fullmatch(r"[0-9a-f]{32}", event.checksum)
        assert type(event.size) is int and 0 <= event.size <= events.MAX_SIZE
    for text in (event.event_type, event.message_id or "", event.timestamp or ""):
        assert text.isprintable() and len(text) <= 255


def check_launch(launch, event: ImageEvent, datadir: str) -> None:
    """The one program a present event may start: rsync, safely, from a peer."""
    argv, kwargs = launch["argv"], launch["kwargs"]
    assert all(isinstance(arg, str) and "\x00" not in arg for arg in argv), argv
    assert argv[0] == "rsync"
    assert not kwargs.get("shell") and not kwargs.get("executable")
    assert set(kwargs["env"]) <= {"PATH", "LC_ALL", "HOME"}
    assert kwargs["stdin"] == subprocess.DEVNULL and kwargs["close_fds"]
    assert launch["timeout"] and all(t and t > 0 for t in launch["timeout"])
    dashes = argv.index("--")
    options, operands = argv[1:dashes], argv[dashes + 1:]
    ssh = argv[argv.index("-e") + 1]
    assert ssh == f"ssh -o BatchMode=yes -o ConnectTimeout=5 -F {SSH_CONFIG}"
    assert all(arg.startswith("--") or arg in ("-e", ssh) for arg in options), options
    assert "StrictHostKeyChecking" not in " ".join(argv)
    assert len(operands) == 2
    remote, dest = operands
    match = re.fullmatch(rf"{RSYNC_USER}@([a-z0-9.-]+):{re.escape(datadir)}/(.+)", remote)
    assert match, remote
    assert match.group(1) in PEERS and match.group(1) in NODES.sources_for(event.source)
    assert match.group(2) == event.image_id and UUID_RE.fullmatch(match.group(2))
    assert os.path.dirname(dest) == datadir
    # <id>.<owner: pid-random>.<random>: only this process removes it while it runs.
    assert re.fullmatch(rf"{re.escape(TEMP_PREFIX)}{event.image_id}\.{os.getpid()}-[0-9a-f]{{8}}"
                        r"\.[0-9a-f]{8}", os.path.basename(dest)), dest
    # Created by the store, before rsync runs: a private regular file, not a link.
    st = launch["dest_stat"]
    assert st is not None, f"{dest} is not in the store"
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, st


def check_store_after(before: dict, after: dict, node: Node, image_id: str) -> None:
    """Only the entries of the event's image changed, each as the store promises."""
    images = os.path.relpath(node.images, node.root)
    owner = (os.stat(node.images).st_uid, os.stat(node.images).st_gid)
    for path in set(before) | set(after):
        if before.get(path) == after.get(path):
            continue
        top, _, name = path.partition(os.sep)
        if top == "state":  # a tombstone, added or refreshed by a delete
            tombstone = name[len("deleted" + os.sep):]
            assert name == os.path.join("deleted", tombstone) and tombstone == image_id, path
            continue
        assert top == images, f"{path} changed outside the store"
        trashed = os.path.join(TRASH_DIR, image_id)
        if name in (TRASH_DIR, trashed, trashed + ".json"):  # a delete: moved to the trash
            if name == trashed and path in after:
                moved = before.get(os.path.join(images, image_id))
                assert moved is not None and after[path][6] == moved[6], path
            continue
        assert os.sep not in name, f"{path} changed in a directory of the store"
        assert name == image_id, f"{path} changed, but the event named {image_id}"
        if path in after:
            kind, mode, uid, gid, size, _, content = after[path]
            assert kind == stat.S_IFREG, path
            assert content == _md5(POOL[name]), f"{path}: foreign bytes under an image name"
            assert mode == FILE_MODE and (uid, gid) == owner, path
    assert not [p for p in after if os.path.basename(p).startswith(TEMP_PREFIX)], after


# -- the tests --------------------------------------------------------------------------


def test_the_whole_path_from_message_to_action_survives_hostile_input(tmp_path, guarded):
    peers = guarded
    stats = {"messages": 0, "rejected": 0, "ignored": 0, "applied": 0, "launches": 0,
             "installed": 0}
    started = time.monotonic()
    node = Node(tmp_path, peers)

    @settings(max_examples=5_000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(st.lists(deliveries(), min_size=1, max_size=5), peer_behaviours)
    def run(messages, behaviour):
        peers.behaviour = behaviour
        node.reset()
        after = snapshot(node.root)
        for queue, body, intact in messages:
            stats["messages"] += 1
            before = after
            del peers.launches[:]
            del log.lines[:]
            event = deliver(queue, body, intact, stats)
            after = snapshot(node.root)
            if event is None:  # rejected or ignored: nothing at all happened
                assert peers.launches == []
                assert after == before
                continue
            deleted_before = event.image_id in node.tombstones
            outcome = node.sync.apply(event)
            after = snapshot(node.root)
            assert isinstance(outcome, Outcome)
            stats["applied"] += 1
            stats["launches"] += len(peers.launches)
            if event.action is Action.ABSENT or deleted_before:
                assert peers.launches == [], "a delete, or an upload after it, ran rsync"
            for launch in peers.launches:
                check_launch(launch, event, str(node.images))
            assert len(peers.launches) <= len(PEERS)
            check_store_after(before, after, node, event.image_id)
            if outcome.ok and event.action is Action.PRESENT and not deleted_before:
                assert node.store.verify(event.image_id, event.size, event.checksum)
                stats["installed"] += bool(peers.launches)
            if event.action is Action.ABSENT:
                assert event.image_id in node.tombstones
                assert not (node.images / event.image_id).is_file() or \
                    (node.images / event.image_id).is_symlink()
            assert (node.outside / "secret").read_bytes() == b"never read, moved or removed"
            for line in log.lines:
                assert line.isprintable(), line

    try:
        with package_log_lines() as log:
            run()
    finally:
        node.close()
    elapsed = time.monotonic() - started
    print(f"\nfuzzed message -> action: {stats} in {elapsed:.1f} s")
    assert stats["messages"] >= MESSAGES_WANTED, stats
    # The generator reaches every path, not only the rejections.
    assert stats["applied"] > 1000 and stats["installed"] > 100 and stats["ignored"] > 100


def deliver(queue, body, intact, stats):
    """What the fan-out and the sync worker make of one message: an event, or None."""
    wire = body
    if queue == "notifications":
        try:
            result = notifications.parse(body, NODES)
        except Rejected as exc:
            check_reason(exc.reason)
            stats["rejected"] += 1
            return None
        if isinstance(result, Ignored):
            check_reason(result.reason)
            stats["ignored"] += 1
            return None
        check_valid_event(result)
        check_accepted_notification(result, intact)
        wire = result.to_wire()
    try:
        event = events.from_wire(wire, NODES)
    except Rejected as exc:
        assert queue == "node", f"the fan-out's own event was refused: {exc.reason}"
        check_reason(exc.reason)
        stats["rejected"] += 1
        return None
    check_valid_event(event)
    if queue == "node" and intact is not None:
        check_accepted_wire(event, intact)
    if queue == "notifications":
        assert event == result
    return event


# The whole path above already parses every message it sends (over 10,000); this one
# only adds messages the parser sees alone.
@settings(max_examples=2_000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(deliveries())
def test_the_parsers_return_a_valid_event_or_a_reason_for_any_message(delivery):
    queue, body, intact = delivery
    parse = notifications.parse if queue == "notifications" else events.from_wire
    try:
        result = parse(body, NODES)
    except Rejected as exc:
        check_reason(exc.reason)
        return
    if isinstance(result, Ignored):
        check_reason(result.reason)
        return
    check_valid_event(result)
    if queue == "notifications":
        check_accepted_notification(result, intact)
        assert events.from_wire(result.to_wire(), NODES) == result
    elif intact is not None:
        check_accepted_wire(result, intact)


@settings(max_examples=1_500, deadline=None, database=None)
@given(publishers.flatmap(look_alikes), sources.flatmap(look_alikes))
def test_a_host_name_with_a_look_alike_character_names_no_node(publisher, source):
    message = {"event_type": "image.upload", "priority": "INFO", "publisher_id": publisher,
               "payload": {"id": IN_PLACE[0], "status": "active", "checksum": "0" * 32,
                           "size": 1}}
    with pytest.raises(Rejected, match="publisher"):
        notifications.parse(_encode(_v2(message)), NODES)
    forged = {"version": 1, "action": "absent", "image_id": IN_PLACE[0], "source": source}
    with pytest.raises(Rejected, match="source"):
        events.from_wire(_encode(forged), NODES)


@pytest.mark.parametrize("publisher", [
    "image.\u212aube2",  # KELVIN SIGN, which lower() folds onto "k"
    "image.nod\u04351",  # Cyrillic e
    "image.node\uff11",  # fullwidth 1
    "image.node1\u200b",  # zero-width space
    "image.node1/../node3", "image.node1;id", "image.-node1", "image.node1 node3",
])
def test_look_alike_and_hostile_publishers_are_rejected(publisher):
    message = {"event_type": "image.upload", "priority": "INFO", "publisher_id": publisher,
               "payload": {"id": IN_PLACE[0], "status": "active", "checksum": "0" * 32,
                           "size": 1}}
    with pytest.raises(Rejected, match="publisher"):
        notifications.parse(_encode(_v2(message)), NODES)
    forged = {"version": 1, "action": "absent", "image_id": IN_PLACE[0],
              "source": publisher[len("image."):]}
    with pytest.raises(Rejected, match="is not a host name"):
        events.from_wire(_encode(forged), NODES)
