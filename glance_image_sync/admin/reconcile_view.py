"""How ``reconcile`` shows what it found and did: a progress bar or lines, a table, JSON."""

from __future__ import annotations

import json
import shutil
import sys

from glance_image_sync.admin.tables import plural, table

MISSING, HERE_ONLY, SIZE_MISMATCH = "missing here", "here only", "size mismatch"



class Progress:
    """A bar on a terminal; one line per image otherwise (logs, cron mail)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def start(self, index, total, finding) -> None:
        if self.tty:
            verb = "checking" if finding.kind == HERE_ONLY else "fetching"
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


def render_table(survey) -> str:
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


def summary(survey) -> str:
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


def render_json(survey) -> str:
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
