"""``glance-image-sync reconcile``: this node's store against its peers', image by image.

Every peer's store is listed over the same ssh and rsync as the transfers
(``listing``), and each image that is not on every node with one size is
reported as:

missing here
    a peer has it, this node does not (an image older than the tool, or a
    lost event);
here only
    this node has it, no peer that answered does (a lost upload
    notification, or a delete that reached only the peers);
size mismatch
    this node's copy and a peer's differ in size.

Nothing changes without ``--fix`` or ``--prune``.

``--fix`` fetches what is missing here, and replaces a copy whose size differs
from the one every peer that has the image agrees on, if two or more do.
There is no event, so no checksum from Glance: the peers' own rsync computes
the md5 of their copies at rest, two peers must agree where two have the
image, and the fetched copy must match (``ImageStore.install``: private
temporary file, size and md5 verified, owner and mode set, fsync, rename).
Where only one peer has the image, its md5 is the only one there is; the
report says so. An image this node deleted (it has a tombstone) is never
fetched back; if it is still in this node's trash (``store.trash``), ``--fix``
restores it from there instead (a peer still holding it is the sign of a
delete that should not have been): when Glance's API says the image is still
active, or, without an API that can answer, once it was trashed at least
``--min-age`` ago, checked against the md5 recorded when it was trashed (or a
peer's) and the peers' size. A delete Glance's API confirms stands.

An image that is here only is copied to the peers (``--fix`` or ``--prune``)
unless there is evidence that it is gone, and removed (``--prune``) only on
such evidence: see ``hereonly``.

Files changed less than ``--min-age`` seconds ago are reported but left to
the events: Glance writes an upload straight into ``<datadir>/<id>``.
Safe beside a running daemon: installs are atomic and verified, each process
removes only its own temporary files (``ImageStore``), removals are
idempotent.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from oslo_log import log as logging

from glance_image_sync.admin.hereonly import HereOnly
from glance_image_sync.admin.reconcile_view import (
    HERE_ONLY,
    MISSING,
    SIZE_MISMATCH,
    Progress,
    render_json,
    render_table,
)
from glance_image_sync.admin.restore import put_back
from glance_image_sync.exceptions import (
    EXIT_FAILED,
    EXIT_OK,
    ConfigError,
    StoreError,
    TransferFailed,
    UsageError,
)
from glance_image_sync.glanceapi import GlanceApi, ImageState
from glance_image_sync.state import access
from glance_image_sync.state.tombstones import Tombstones
from glance_image_sync.store.images import ImageStore
from glance_image_sync.store.trash import Trash
from glance_image_sync.store.trashrecord import describe_cause
from glance_image_sync.transfer import listing
from glance_image_sync.transfer.listing import Entry
from glance_image_sync.transfer.sessions import Rsync

LOG = logging.getLogger(__name__)

__all__ = ["HERE_ONLY", "MISSING", "SIZE_MISMATCH", "Progress", "main"]

DEFAULT_MIN_AGE = 600


@dataclass
class Finding:
    image_id: str
    kind: str
    here: Entry | None
    peers: dict  # node -> Entry, for the peers that have it
    action: str = ""  # what --fix or --prune did, or why it left the image alone
    resolved: bool = False


@dataclass
class Survey:
    node: str
    here: dict  # image id -> Entry
    listed: dict  # peer -> {image id: Entry}
    unreachable: dict  # peer -> reason
    findings: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unreachable and all(f.resolved for f in self.findings)


def compare(here: dict, listed: dict) -> list:
    """The findings, by image id, of this node's entries against the peers' that answered."""
    findings = []
    if not listed:
        return findings  # with no peer to compare with, nothing can be said
    ids = set(here).union(*listed.values())
    for image_id in sorted(ids):
        holders = {node: entries[image_id] for node, entries in listed.items()
                   if image_id in entries}
        mine = here.get(image_id)
        if mine is None:
            findings.append(Finding(image_id, MISSING, None, holders))
        elif not holders:
            findings.append(Finding(image_id, HERE_ONLY, mine, holders))
        elif any(entry.size != mine.size for entry in holders.values()):
            findings.append(Finding(image_id, SIZE_MISMATCH, mine, holders))
    return findings


class Reconciler:
    def __init__(self, settings, store, rsync, tombstones, min_age=DEFAULT_MIN_AGE,
                 progress=None, now=time.time, api=None):
        self.settings = settings
        self.nodes = settings.nodes
        self.store = store
        self.rsync = rsync
        self.tombstones = tombstones
        self.min_age = min_age
        self.progress = progress
        self.now = now
        self.trash = Trash(store)
        self.here_only = HereOnly(settings, store, tombstones,
                                  api or GlanceApi(settings.glance_api), trash=self.trash)

    def survey(self) -> Survey:
        listed, unreachable = {}, {}
        for peer in self.nodes.peers():
            try:
                listed[peer] = listing.list_store(self.settings.transfer, peer)
            except TransferFailed as exc:
                unreachable[peer] = str(exc)
        for peer, reason in unreachable.items():
            LOG.warning("reconcile: cannot list %s: %s", peer, reason)
        here = self._list_here()
        return Survey(self.nodes.this, here, listed, unreachable, compare(here, listed))

    def _list_here(self) -> dict:
        entries = {}
        for image_id, size in self.store.list_images().items():
            try:
                st = os.stat(image_id, dir_fd=self.store.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted since the listing
            entries[image_id] = Entry(size, float(int(st.st_mtime)))
        return entries

    # -- acting ------------------------------------------------------------

    def act(self, survey: Survey, fix: bool, prune: bool) -> None:
        """Fix and/or prune what ``survey`` found; each finding records what happened."""
        todo = [f for f in survey.findings
                if (fix and f.kind in (MISSING, SIZE_MISMATCH)) or
                ((fix or prune) and f.kind == HERE_ONLY)]
        if any(f.kind == HERE_ONLY or f.image_id in self.tombstones for f in todo):
            self.here_only.check_api(agreed(survey))
        for index, finding in enumerate(todo, 1):
            if self.progress:
                self.progress.start(index, len(todo), finding)
            if finding.kind == HERE_ONLY:
                self._here_only(finding, prune)
            else:
                self._fetch(finding)
            if self.progress:
                self.progress.finish(index, len(todo), finding)
        if self.progress:
            self.progress.close()

    def _here_only(self, finding: Finding, prune: bool) -> None:
        if self._age(finding.here.mtime) < self.min_age:
            return self._leave(finding, "changed here recently; left to the events")
        self.here_only.handle(finding, prune)
        return None

    def _leave(self, finding: Finding, why: str) -> None:
        finding.action = why

    def _age(self, mtime: float) -> float:
        return self.now() - mtime

    def _fetch(self, finding: Finding) -> None:
        image_id = finding.image_id
        if finding.kind == MISSING and image_id in self.tombstones:
            entry = self.trash.get(image_id)
            if entry is None:
                return self._leave(finding, "deleted here earlier; not fetched back")
            return self._from_trash(finding, entry)
        if finding.here and self._age(finding.here.mtime) < self.min_age:
            return self._leave(finding, "changed here recently; left to the events")
        holders = [node for node in self.nodes.peers() if node in finding.peers]
        sizes = {finding.peers[node].size for node in holders}
        if len(sizes) > 1:
            return self._leave(finding, "peers disagree on its size: " + _sizes(finding.peers))
        newest = max(finding.peers[node].mtime for node in holders)
        if self._age(newest) < self.min_age:
            return self._leave(finding, "changed on a peer recently; left to the events")
        sums, errors = {}, []
        for node in holders:
            if len(sums) == 2:
                break
            try:
                sums[node] = listing.remote_md5(self.settings.transfer, node, image_id)
            except TransferFailed as exc:
                errors.append(f"{node}: {exc}")
        if not sums:
            return self._leave(finding, "no peer could checksum it: " + "; ".join(errors))
        if len(set(sums.values())) > 1:
            return self._leave(finding, "peers disagree on its md5: " + ", ".join(
                f"{node} {md5}" for node, (_, md5) in sums.items()))
        size, md5 = next(iter(sums.values()))
        if size not in sizes:
            return self._leave(finding, "changed on a peer during the check")
        if finding.kind == SIZE_MISMATCH and len(sums) < 2:
            return self._leave(finding, "only one peer has it: which copy is right is "
                                        "unknown; left alone")
        for node in sums:
            try:
                self.store.install(image_id, size, md5,
                                   lambda path, node=node: self.rsync.fetch(node, image_id, path,
                                                                           size))
            except (TransferFailed, StoreError) as exc:
                errors.append(f"{node}: {exc}")
                continue
            agreed = " and ".join(sums) if len(sums) > 1 else f"{node} only"
            finding.action = f"fetched from {node}, md5 {md5} (as computed on {agreed})"
            finding.resolved = True
            LOG.info("image %s: reconcile %s on %s: %s", image_id,
                     "replaced the copy" if finding.here else "installed it",
                     self.nodes.this, finding.action)
            return None
        self._leave(finding, "fetch failed: " + "; ".join(errors))
        LOG.warning("image %s: reconcile could not fetch it to %s: %s", image_id,
                    self.nodes.this, "; ".join(errors))
        return None


    def _from_trash(self, finding: Finding, entry) -> None:
        """Restore an image this node trashed that a peer still holds; see the module."""
        image_id = finding.image_id
        sizes = {peer_entry.size for peer_entry in finding.peers.values()}
        if sizes != {entry.size}:
            return self._leave(finding, f"in this node's trash with {entry.size} bytes; the "
                               f"peers have {_sizes(finding.peers)}: not restored")
        answer = self.here_only.api.image_state(image_id)
        trusted = self.here_only.api_distrusted is None
        if answer.state is ImageState.GONE and trusted:
            return self._leave(finding, f"in this node's trash; not restored: {answer.detail}: "
                               "the delete stands")
        if (answer.state is not ImageState.ACTIVE or not trusted) and \
                self._age(entry.trashed_at) < self.min_age:
            return self._leave(finding, "trashed here recently; left to the events (a delete "
                               "may still be on its way to the peers)")
        md5 = None
        if entry.md5 is None:
            holder = next(iter(finding.peers))
            try:
                _, md5 = listing.remote_md5(self.settings.transfer, holder, image_id)
            except TransferFailed as exc:
                return self._leave(finding, f"in this node's trash, md5 unknown, and {holder} "
                                   f"could not checksum it: {exc}")
        try:
            restored = put_back(self.settings, self.trash, image_id, "reconcile",
                                expect_size=entry.size, expect_md5=md5)
        except StoreError as exc:
            return self._leave(finding, f"in this node's trash; not restored: {exc}")
        why = (answer.detail if answer.state is ImageState.ACTIVE and trusted else
               f"no answer from Glance's API to go by: {answer.detail}")
        finding.action = (f"restored from this node's trash ({restored.checked}, md5 "
                          f"{restored.md5}; {', '.join(finding.peers)} still had it; {why}); "
                          f"it had been {describe_cause(entry)}")
        finding.resolved = True
        LOG.info("image %s: reconcile on %s: %s", image_id, self.nodes.this, finding.action)
        return None


def agreed(survey: Survey) -> set:
    """Ids of the images this node and every peer that answered have, with one size."""
    differing = {f.image_id for f in survey.findings}
    return {image_id for image_id in survey.here if image_id not in differing
            and all(image_id in entries for entries in survey.listed.values())}


def _sizes(entries: dict) -> str:
    return ", ".join(f"{node} {entry.size}" for node, entry in entries.items())


def main(args, settings, out=None) -> int:
    """The command: 0 when the stores agree (after any fixes), 1 otherwise."""
    out = out or sys.stdout
    if args.min_age < 0:
        raise UsageError("--min-age must be 0 or more seconds")
    acting = args.fix or args.prune
    if acting:
        access.check_store(settings.store.datadir)
    try:
        store = ImageStore(settings.store)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    rsync = Rsync(settings.transfer)
    try:
        try:
            tombstones = Tombstones(settings.store.state_dir, settings.store.deleted_memory)
        except OSError as exc:
            raise ConfigError(f"cannot read the deleted images in {settings.store.state_dir}: "
                              f"{exc.strerror}") from None
        reconciler = Reconciler(settings, store, rsync, tombstones,
                                min_age=args.min_age, progress=Progress() if acting else None)
        survey = reconciler.survey()
        if acting:
            reconciler.act(survey, fix=args.fix, prune=args.prune)
    finally:
        rsync.close()  # its ssh connections to peers, and the listings'
        store.close()
    out.write(render_json(survey) if args.format == "json" else render_table(survey))
    return EXIT_OK if survey.ok else EXIT_FAILED
