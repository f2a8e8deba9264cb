"""``glance-image-sync reconcile``: this node's store against its peers', image by image.

Every peer's store is listed over the same ssh and rsync as the transfers
(``listing``), and each image that is not on every node with one size is
reported as:

missing here
    a peer has it, this node does not (an image older than the tool, or a
    lost event);
here only
    this node has it, no peer that answered does;
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
fetched back.

``--prune`` removes an image that is here only, and only when every peer
answered and none has it, when the copy is older than ``--min-age``, and when
no event waits in any node's queues or in Glance's notification queue (an
upload not yet replicated is "here only" too). Nothing else is ever removed.

Files changed less than ``--min-age`` seconds ago are reported but left to
the events: Glance writes an upload straight into ``<datadir>/<id>``.
Safe beside a running daemon: installs are atomic and verified, removals
idempotent.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

from oslo_log import log as logging

from glance_image_sync.admin.tables import plural, table
from glance_image_sync.broker import queues as queuestats
from glance_image_sync.exceptions import (
    EXIT_FAILED,
    EXIT_OK,
    BrokerUnavailable,
    ConfigError,
    StoreError,
    TransferFailed,
)
from glance_image_sync.state.tombstones import Tombstones
from glance_image_sync.store.images import ImageStore
from glance_image_sync.transfer import listing
from glance_image_sync.transfer.listing import Entry
from glance_image_sync.transfer.sessions import Rsync

LOG = logging.getLogger(__name__)

MISSING, HERE_ONLY, SIZE_MISMATCH = "missing here", "here only", "size mismatch"
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
                 progress=None, now=time.time):
        self.settings = settings
        self.nodes = settings.nodes
        self.store = store
        self.rsync = rsync
        self.tombstones = tombstones
        self.min_age = min_age
        self.progress = progress
        self.now = now

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
                if (fix and f.kind in (MISSING, SIZE_MISMATCH)) or (prune and f.kind == HERE_ONLY)]
        prune_refusal = self._prune_refusal(survey) if prune and any(
            f.kind == HERE_ONLY for f in todo) else None
        for index, finding in enumerate(todo, 1):
            if self.progress:
                self.progress.start(index, len(todo), finding)
            if finding.kind == HERE_ONLY:
                self._prune(finding, prune_refusal)
            else:
                self._fetch(finding)
            if self.progress:
                self.progress.finish(index, len(todo), finding)
        if self.progress:
            self.progress.close()

    def _leave(self, finding: Finding, why: str) -> None:
        finding.action = why

    def _age(self, mtime: float) -> float:
        return self.now() - mtime

    def _fetch(self, finding: Finding) -> None:
        image_id = finding.image_id
        if finding.kind == MISSING and image_id in self.tombstones:
            return self._leave(finding, "deleted here earlier; not fetched back")
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

    def _prune_refusal(self, survey: Survey) -> str | None:
        """Why nothing may be pruned now, or None."""
        if not self.nodes.peers():
            return "no peer to agree that it is gone"
        if survey.unreachable:
            return "not every peer answered (" + ", ".join(survey.unreachable) + ")"
        try:
            overview = queuestats.overview(self.settings)
        except BrokerUnavailable as exc:
            return f"cannot check the queues for events on the way: {exc}"
        waiting = [f"{q.name}: {q.messages}" for q in overview.all_queues()
                   if q.messages and q is not overview.dead_letter]
        if waiting:
            return "events are still queued (" + ", ".join(waiting) + "); apply them first"
        return None

    def _prune(self, finding: Finding, refusal: str | None) -> None:
        if refusal:
            return self._leave(finding, f"not pruned: {refusal}")
        if self._age(finding.here.mtime) < self.min_age:
            return self._leave(finding, "not pruned: changed here recently")
        try:
            removed = self.store.remove(finding.image_id)
        except StoreError as exc:
            return self._leave(finding, f"not pruned: {exc}")
        finding.action = "removed: no peer has it" if removed else "was already gone"
        finding.resolved = True
        LOG.info("image %s: reconcile removed it from %s (no peer has it)", finding.image_id,
                 self.nodes.this)
        return None


def _sizes(entries: dict) -> str:
    return ", ".join(f"{node} {entry.size}" for node, entry in entries.items())


# -- showing it --------------------------------------------------------------


class Progress:
    """A bar on a terminal; one line per image otherwise (logs, cron mail)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def start(self, index, total, finding) -> None:
        if self.tty:
            verb = "removing" if finding.kind == HERE_ONLY else "fetching"
            self._bar(index - 1, total, f"{verb} {finding.image_id}")

    def finish(self, index, total, finding) -> None:
        if self.tty:
            self._bar(index, total, finding.image_id)
        else:
            self.stream.write(f"[{index}/{total}] {finding.image_id} {finding.kind}: "
                              f"{finding.action}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _bar(self, done, total, text) -> None:
        width = shutil.get_terminal_size().columns
        filled = int(20 * done / total) if total else 20
        line = f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{total} {text}"
        self.stream.write("\r\033[K" + line[:width - 1])
        self.stream.flush()


def render_table(survey: Survey) -> str:
    peers = list(survey.listed) + list(survey.unreachable)
    lines = [f"{survey.node}: {plural(len(survey.here), 'image')} here; compared with "
             f"{', '.join(survey.listed) or 'no peer'}"]
    for peer, reason in survey.unreachable.items():
        lines.append(f"  {peer}: unreachable ({reason})")
    if survey.findings:
        columns = ["image", "finding", "here", *peers, "action"]
        rows = [[f.image_id, f.kind, _size(f.here), *(_size(f.peers.get(p)) for p in peers),
                 f.action or "-"] for f in survey.findings]
        lines.append("")
        lines += table([columns, *rows])
    lines.append("")
    lines.append(summary(survey))
    return "\n".join(lines) + "\n"


def summary(survey: Survey) -> str:
    if not survey.findings:
        text = "the stores agree" if survey.listed else "nothing to compare with"
    else:
        counts = {kind: sum(f.kind == kind for f in survey.findings)
                  for kind in (MISSING, HERE_ONLY, SIZE_MISMATCH)}
        fixed = sum(f.resolved for f in survey.findings)
        text = (f"{plural(len(survey.findings), 'difference')} ("
                + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
                + f"); {fixed} resolved, {len(survey.findings) - fixed} left")
    if survey.unreachable:
        text += f"; {plural(len(survey.unreachable), 'peer')} unreachable"
    return text


def render_json(survey: Survey) -> str:
    doc = {
        "node": survey.node,
        "images_here": len(survey.here),
        "peers": {
            **{peer: {"reachable": True, "images": len(entries), "error": None}
               for peer, entries in survey.listed.items()},
            **{peer: {"reachable": False, "images": None, "error": reason}
               for peer, reason in survey.unreachable.items()},
        },
        "findings": [{
            "image_id": f.image_id,
            "finding": f.kind,
            "here_size": f.here.size if f.here else None,
            "peer_sizes": {node: entry.size for node, entry in f.peers.items()},
            "action": f.action or None,
            "resolved": f.resolved,
        } for f in survey.findings],
        "summary": summary(survey),
        "ok": survey.ok,
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _size(entry) -> str:
    return str(entry.size) if entry else "-"


def main(args, settings, out=None) -> int:
    """The command: 0 when the stores agree (after any fixes), 1 otherwise."""
    out = out or sys.stdout
    if args.min_age < 0:
        raise ConfigError("--min-age must be 0 or more seconds")
    try:
        store = ImageStore(settings.store)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    rsync = Rsync(settings.transfer)
    try:
        tombstones = Tombstones(settings.store.state_dir, settings.store.deleted_memory)
        acting = args.fix or args.prune
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
