"""doctor's checks of each peer, over the ssh and rsync the transfers use.

First the peer's kept ssh connection, if any, is retired (``close_master``):
it was authenticated when it was opened, and would hide a key revoked since.
doctor's own commands open connections of their own, never kept.

``ssh``
    ``ssh <user>@<peer> true`` in batch mode, host key checked as configured:
    rrsync answers ``true`` itself, so this works with a restricted key too.
``rsync``
    ``ssh <user>@<peer> rsync --version``: the version, with a key that may
    run anything; rrsync's refusal with a restricted key, whose rsync the
    listings below then show at work.
``remote paths``
    the store listed both ways (``rsync_remote_paths``): as an absolute path
    and relative to where rrsync keeps the key. With rrsync ``-absolute``
    both name the store; with an rrsync without it (rsync before 3.5, such as
    Ubuntu 22.04's and 24.04's 3.2.7) only the relative one does; with a key
    that is not restricted only the absolute one does (the relative one names
    the user's home). PASS when the configured form names the store.
``store``
    the configured form's ``rsync --list-only`` of the store succeeded.
``streams`` (with ``relay``)
    the peer's ``glance-image-sync serve`` answers a stream request for an
    image no store has with "no copy": it can pass images on (``sync.sources``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

from glance_image_sync.admin.checks import failed, passed, skipped
from glance_image_sync.admin.tables import plural
from glance_image_sync.exceptions import TransferFailed
from glance_image_sync.transfer import listing, serve, stream
from glance_image_sync.transfer.masters import close_master
from glance_image_sync.transfer.rsync import first_line, run_rsync, ssh_argv

OTHER = {"absolute": "relative", "relative": "absolute"}


def checks(settings) -> list:
    peers = list(settings.nodes.peers())
    if not peers:
        return [skipped("peers", "api_nodes names no other node")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(peers))) as pool:
        per_peer = list(pool.map(lambda node: peer_checks(settings.transfer, node), peers))
    return [check for found in per_peer for check in found]


def peer_checks(transfer, node: str) -> list:
    closed = close_master(transfer, node)
    fresh = dataclasses.replace(transfer, control_dir=None)
    prefix = f"peer {node}"
    login = f"{transfer.user}@{node}"
    try:
        _ssh(fresh, node, "true")
    except TransferFailed as exc:
        if exc.returncode == 255 or exc.returncode is None:
            return [failed(f"{prefix}: ssh", f"{login}: {first_line(exc.stderr or str(exc))}",
                           ssh_fix(exc.stderr or str(exc), node, transfer.user))] + [
                skipped(f"{prefix}: {what}", "no ssh connection")
                for what in ("rsync", "remote paths", "store", "streams")
                if what != "streams" or transfer.relay]
    note = "; a kept connection was retired first" if closed else ""
    found = [passed(f"{prefix}: ssh", f"{login}: logged in, host key as pinned, batch "
                    f"mode{note}")]
    listings = {form: _list(fresh, node, form) for form in ("absolute", "relative")}
    found.append(rsync_check(prefix, _version(fresh, node), listings))
    found += paths_and_store(prefix, transfer.remote_paths, listings)
    if transfer.relay:
        found.append(stream_check(prefix, fresh, node))
    return found


# An image no store holds: the peer's answer shows whether it serves streams at all.
NO_IMAGE = "00000000-0000-4000-8000-000000000000"


def stream_check(prefix: str, transfer, node: str):
    name = f"{prefix}: streams"
    try:
        run_rsync(stream.stream_argv(transfer, node, NO_IMAGE, 0, 0), f"ssh to {node}",
                  transfer.connect_timeout + transfer.io_timeout)
    except TransferFailed as exc:
        if exc.returncode == serve.NOT_HERE:
            return passed(name, "glance-image-sync serve answers: the relay can pass images "
                          "on through this peer")
        why = first_line(exc.stderr or str(exc))
    else:
        why = "the request was answered as if the image were there"
    return failed(name, f"the peer does not serve streams: {why}",
                  "make the key's forced command 'glance-image-sync serve' on the peer "
                  "('glance-image-sync ssh-keys' prints the line), or set relay = false; "
                  "until then each node fetches from the publisher instead")


def _ssh(transfer, node: str, *command) -> str:
    argv = [*ssh_argv(transfer), "--", f"{transfer.user}@{node}", *command]
    return run_rsync(argv, f"ssh to {node}", transfer.connect_timeout + transfer.io_timeout)


def _version(transfer, node: str):
    """``rsync --version``'s first line, or the TransferFailed that says why not."""
    try:
        return _ssh(transfer, node, "rsync", "--version").splitlines()[0].strip()
    except TransferFailed as exc:
        return exc
    except IndexError:
        return TransferFailed("rsync --version printed nothing", stderr="")


def _list(transfer, node: str, form: str):
    """The listing's text, or the TransferFailed of the attempt."""
    try:
        return run_rsync(listing.list_argv(dataclasses.replace(transfer, remote_paths=form),
                                           node),
                         f"rsync with {node}", transfer.connect_timeout + transfer.io_timeout)
    except TransferFailed as exc:
        return exc


def ssh_fix(stderr: str, node: str, user: str) -> str:
    """What to do about ssh's complaint, in words."""
    if "Host key verification failed" in stderr or "IDENTIFICATION HAS CHANGED" in stderr:
        return (f"{node}'s host key is not the one pinned for it (UserKnownHostsFile of "
                f"ssh_config_file): compare with 'ssh-keygen -lf "
                f"/etc/ssh/ssh_host_ed25519_key.pub' on {node}, then pin the right one "
                "('glance-image-sync ssh-keys' prints the known_hosts lines)")
    if "Permission denied" in stderr:
        return (f"{node} refused this node's key: add it to ~{user}/.ssh/authorized_keys "
                f"on {node} ('glance-image-sync ssh-keys' prints the line)")
    if "Connection refused" in stderr:
        return (f"nothing listens for ssh on {node}: start its sshd, or correct HostName "
                "and Port for it in ssh_config_file")
    if "Could not resolve" in stderr or "timed out" in stderr or "No route" in stderr:
        return (f"{node} cannot be reached: check its name (or HostName in ssh_config_file) "
                "and the network between the nodes")
    return f"run 'ssh -F <ssh_config_file> {user}@{node} true' by hand and fix what it says"


def rsync_check(prefix: str, version, listings: dict):
    name = f"{prefix}: rsync"
    if isinstance(version, str) and version.startswith("rsync"):
        return passed(name, f"{version}; the key may run any command (README: A key that "
                      "can only read the store)")
    errors = [text.stderr for text in (version, *listings.values())
              if isinstance(text, TransferFailed)]
    missing = next((text for text in errors if _no_rsync(text)), None)
    if missing is not None or getattr(version, "returncode", None) == 127:
        return failed(name, f"rsync is not installed there: {first_line(missing or errors[0])}",
                      "install rsync on the peer (apt install rsync; rrsync comes with it)")
    restricted = "rrsync" in getattr(version, "stderr", "")
    if any(isinstance(text, str) for text in listings.values()):
        return passed(name, ("the key is restricted to rrsync, whose " if restricted else "")
                      + "rsync lists the store")
    return skipped(name, "not shown: no listing of the store succeeded (see its check)")


def _no_rsync(text: str) -> bool:
    return ("rsync: command not found" in text or "rsync: not found" in text
            or "No such file or directory: '/usr/bin/rsync'" in text)


def paths_and_store(prefix: str, configured: str, listings: dict) -> list:
    """The ``remote paths`` and ``store`` checks, from both listings of the peer's store."""
    mine, other = listings[configured], listings[OTHER[configured]]
    paths, store = f"{prefix}: remote paths", f"{prefix}: store"
    same = isinstance(mine, str) and isinstance(other, str) and \
        _directory_line(mine) == _directory_line(other)
    if isinstance(mine, str) and (configured == "absolute" or same
                                  or isinstance(other, TransferFailed)):
        also = (f"; so does {OTHER[configured]}" if same else
                f"; {OTHER[configured]} would not name the store")
        count = len(listing.parse_listing(mine))
        return [passed(paths, f"the peer takes rsync_remote_paths = {configured}{also}"),
                passed(store, f"listed: {plural(count, 'image')}")]
    if configured == "relative" and isinstance(mine, str):
        return [failed(paths, "a relative path names another directory than "
                       "the store there: the key is not restricted to it with rrsync",
                       "restrict the key on the peer ('glance-image-sync ssh-keys' prints "
                       "the line), or set rsync_remote_paths = absolute"),
                passed(store, "listed, as an absolute path")]
    if isinstance(other, str):
        if configured == "absolute":
            fix = ("set rsync_remote_paths = relative on every node (it works with every "
                   "rrsync), or add -absolute to the peer's rrsync line if its rsync is 3.5 "
                   "or later")
            why = "its rrsync refuses absolute paths (no -absolute)"
        else:
            fix = "set rsync_remote_paths = absolute, or restrict the key with rrsync"
            why = "it does not take relative paths"
        return [failed(paths, f"{why}: {first_line(mine.stderr)}", fix),
                passed(store, f"listed with rsync_remote_paths = {OTHER[configured]}")]
    return [skipped(paths, "the store could not be listed either way"),
            failed(store, first_line(mine.stderr),
                   "let rsync_user read the store on the peer (a directory it can list "
                   "and enter); the message is the peer's")]


def _directory_line(text: str) -> str | None:
    """The listing's own line for the directory listed (``.``): mode, size, mtime."""
    for line in text.splitlines():
        if line.endswith(" ."):
            return line
    return None
