"""``glance-image-sync ssh-keys``: the ssh lines that wire this node to its peers.

From this node's public key (``--public-key``) and the peers' host keys (a
directory of ``<node>.pub`` files, or a known-hosts file), it prints:

* the ``authorized_keys`` line each peer needs for this node's key: with
  ``relay``, the forced command ``glance-image-sync serve`` (which hands
  rsync to rrsync); without it, rrsync itself. rrsync in the form
  ``rsync_remote_paths`` uses: without
  ``-absolute`` for ``relative`` (every rrsync takes it), with it for
  ``absolute`` (rrsync of rsync 3.5 or later only);
* the ``known_hosts`` lines of the peers' host keys, named as ssh will look
  them up: ``ssh -G`` resolves each peer through ``ssh_config_file``
  (``HostName``, ``Port``, ``HostKeyAlias``), so a peer reached on another
  port is written ``[host]:port``. Each is followed by its fingerprint, to
  compare with ``ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`` on that
  peer.

It only reads the files it is given. Exit status 1 when a peer's host key is
missing (the others are printed), 2 when a file given is not what it should be.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys

from glance_image_sync.exceptions import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from glance_image_sync.transfer.environ import subprocess_env
from glance_image_sync.transfer.rsync import first_line

SSH_TIMEOUT = 30
_KEY_TYPE_RE = re.compile(r"(ssh|ecdsa|sk)-[a-z0-9@.-]+")


class KeyFileError(Exception):
    """A file given on the command line is not what it should be; the message says why."""


def public_key(path: str) -> tuple:
    """(type, base64 blob) of the one public key in ``path``."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(64 * 1024)
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    if "PRIVATE KEY" in text:
        raise KeyFileError(f"{path} is a private key: give its .pub")
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and _KEY_TYPE_RE.fullmatch(fields[0]) and _blob(fields[1]):
            return fields[0], fields[1]
    raise KeyFileError(f"{path} holds no ssh public key ('ssh-ed25519 AAAA... comment')")


def _blob(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def fingerprint(blob_b64: str) -> str:
    """``SHA256:...``, as ``ssh-keygen -l`` shows it."""
    digest = hashlib.sha256(base64.b64decode(blob_b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_host_name(transfer, node: str) -> str:
    """The name ssh looks ``node`` up by in known_hosts (``ssh -G``, through ssh_config_file)."""
    argv = ["ssh", "-G"]
    if transfer.ssh_config_file:
        argv += ["-F", transfer.ssh_config_file]
    argv += ["--", f"{transfer.user}@{node}"]
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                env=subprocess_env(), timeout=SSH_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise KeyFileError(f"ssh -G {node}: no answer within {SSH_TIMEOUT} s") from None
    if result.returncode != 0:
        raise KeyFileError(f"ssh -G {node}: "
                           f"{first_line(result.stderr.decode('utf-8', 'replace'))}")
    found = dict(line.split(" ", 1) for line in result.stdout.decode("utf-8", "replace")
                 .splitlines() if " " in line)
    alias = found.get("hostkeyalias", "none")
    if alias != "none":
        return alias
    host, port = found.get("hostname", node), found.get("port", "22")
    return host if port == "22" else f"[{host}]:{port}"


def host_keys_from_dir(directory: str, nodes) -> dict:
    """{node: (type, blob)} from ``<directory>/<node>.pub``, for the nodes that have one."""
    found = {}
    for node in nodes:
        path = os.path.join(directory, f"{node}.pub")
        if os.path.exists(path):
            found[node] = public_key(path)
    return found


def host_keys_from_known_hosts(path: str, names: dict) -> dict:
    """{node: [(type, blob), ...]} of the lines of a known-hosts file that name each node.

    ``names`` is {node: [names it may be listed under]}; hashed entries
    (``|1|salt|hash``, ssh-keyscan -H) are matched too.
    """
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    found = {}
    for line in lines:
        fields = line.split()
        if len(fields) < 3 or fields[0].startswith(("#", "@")):
            continue
        patterns, key_type, blob = fields[0].split(","), fields[1], fields[2]
        if not _KEY_TYPE_RE.fullmatch(key_type) or not _blob(blob):
            continue
        for node, aliases in names.items():
            if any(_matches(pattern, alias) for pattern in patterns for alias in aliases):
                found.setdefault(node, []).append((key_type, blob))
    return found


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        try:
            salt, hashed = (base64.b64decode(part) for part in pattern[3:].split("|", 1))
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(hmac.new(salt, name.encode(), "sha1").digest(), hashed)
    return pattern == name


def restriction(settings) -> str:
    """The authorized_keys options that let a key only read the store, as rsync names it.

    With ``relay``, the forced command is ``glance-image-sync serve``, which
    streams images to peers that relay them and hands rsync to rrsync.
    """
    transfer = settings.transfer
    if transfer.relay:
        absolute = " --absolute" if transfer.remote_paths == "absolute" else ""
        return (f'command="glance-image-sync serve --store {transfer.remote_datadir}'
                f'{absolute}",restrict')
    absolute = "-absolute " if transfer.remote_paths == "absolute" else ""
    return f'command="rrsync -ro {absolute}{transfer.remote_datadir}",restrict'


def gather(settings, public_key_file: str, host_keys: str | None,
           known_hosts: str | None) -> dict:
    key_type, blob = public_key(public_key_file)
    this, peers = settings.nodes.this, settings.nodes.peers()
    line = f"{restriction(settings)} {key_type} {blob} glance-image-sync@{this}"
    names = {node: known_host_name(settings.transfer, node) for node in peers}
    if host_keys:
        keys = {node: [key] for node, key in host_keys_from_dir(host_keys, peers).items()}
    else:
        keys = host_keys_from_known_hosts(known_hosts, {node: sorted({name, node})
                                                        for node, name in names.items()})
    return {
        "node": this,
        "user": settings.transfer.user,
        "remote_paths": settings.transfer.remote_paths,
        "authorized_keys": {node: line for node in peers},
        "known_hosts": {node: [f"{names[node]} {kind} {key}" for kind, key in keys.get(node, [])]
                        for node in peers},
        "fingerprints": {node: [f"{kind} {fingerprint(key)}" for kind, key in keys.get(node, [])]
                         for node in peers},
        "missing": [node for node in peers if not keys.get(node)],
    }


def render_text(doc: dict, settings) -> str:
    peers = list(doc["authorized_keys"])
    lines = [f"# authorized_keys of {doc['user']} on {', '.join(peers)}: "
             f"{doc['node']}'s key, which may only read the store"]
    if settings.transfer.relay:
        lines.append("# (glance-image-sync serve: streams for the relay; rsync goes to "
                     "rrsync -ro" + (" -absolute" if doc["remote_paths"] == "absolute"
                                      else "") + ")")
    if doc["remote_paths"] == "absolute":
        lines.append("# (rrsync -absolute: rsync 3.5 or later on the peer; with "
                     "rsync_remote_paths = relative, any rrsync)")
    lines += sorted(set(doc["authorized_keys"].values()))
    config = settings.transfer.ssh_config_file or "ssh's own configuration"
    lines += ["", f"# known_hosts of {doc['node']} (the UserKnownHostsFile of {config}): "
              "the peers' host keys"]
    for node in peers:
        for entry, print_ in zip(doc["known_hosts"][node], doc["fingerprints"][node]):
            lines += [f"# {node}: {print_}", entry]
    return "\n".join(lines) + "\n"


def main(args, settings, out=None) -> int:
    """The command: print the lines; say which host keys are missing."""
    out = out or sys.stdout
    try:
        doc = gather(settings, args.public_key, args.host_keys, args.known_hosts)
    except KeyFileError as exc:
        print(f"glance-image-sync ssh-keys: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out.write(json.dumps(doc, indent=2) + "\n" if args.format == "json"
              else render_text(doc, settings))
    for node in doc["missing"]:
        where = (os.path.join(args.host_keys, f"{node}.pub") if args.host_keys
                 else f"{args.known_hosts} (as {node})")
        print(f"glance-image-sync ssh-keys: no host key for {node} in {where}", file=sys.stderr)
    return EXIT_FAILED if doc["missing"] else EXIT_OK
