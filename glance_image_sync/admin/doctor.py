"""``glance-image-sync doctor``: everything a node needs, checked at once.

What an operator would otherwise find one failure at a time, each check on
one line with PASS, FAIL (and what to do about it) or SKIP (and why):

* this node (``doctor_local``): the image store, ``state_dir``, free space,
  and under systemd the unit's sandbox;
* what protects its images from a delete that should not be (``doctor_deletes``):
  Glance's API, the trash, or nothing;
* the broker and Glance's queue (``doctor_broker``);
* each peer, over ssh and rsync as the transfers reach it (``doctor_peers``).

It changes nothing but a file created and removed in each directory the tool
writes to, and the peers' kept ssh connections, which it retires. It takes no
run lock: it runs beside the daemon. Exit status 1 when any check fails, 0
otherwise; 2 for a configuration error (as every command).
"""

from __future__ import annotations

import json
import sys

from glance_image_sync.admin import doctor_broker, doctor_deletes, doctor_local, doctor_peers
from glance_image_sync.admin.checks import FAIL, PASS, SKIP, running_as
from glance_image_sync.admin.tables import plural
from glance_image_sync.exceptions import EXIT_FAILED, EXIT_OK


def gather(settings, unit=None, environ=None) -> list:
    return (doctor_local.checks(settings, unit, environ)
            + doctor_deletes.checks(settings)
            + doctor_broker.checks(settings)
            + doctor_peers.checks(settings))


def summary(found: list) -> str:
    counts = {status: sum(check.status == status for check in found)
              for status in (PASS, FAIL, SKIP)}
    if counts[FAIL]:
        return (f"{plural(counts[FAIL], 'check')} failed, {counts[PASS]} passed, "
                f"{counts[SKIP]} skipped")
    return f"all {plural(counts[PASS], 'check')} passed, {counts[SKIP]} skipped"


def render_table(node: str, found: list) -> str:
    width = max(len(check.name) for check in found)
    lines = [f"glance-image-sync doctor on {node}, running as {running_as()}", ""]
    for check in found:
        line = f"{check.status}  {check.name.ljust(width)}  {check.detail}"
        if check.fix:
            line += f"  -- fix: {check.fix}"
        lines.append(line)
    lines += ["", summary(found)]
    return "\n".join(lines) + "\n"


def render_json(node: str, found: list) -> str:
    doc = {
        "node": node,
        "user": running_as(),
        "checks": [{"name": c.name, "status": c.status, "detail": c.detail,
                    "fix": c.fix or None} for c in found],
        "ok": not any(check.failed for check in found),
    }
    return json.dumps(doc, indent=2) + "\n"


def main(args, settings, out=None, environ=None) -> int:
    """The command: run every check, print them, return the exit status."""
    found = gather(settings, args.unit, environ)
    node = settings.nodes.this
    (out or sys.stdout).write(render_json(node, found) if args.format == "json"
                              else render_table(node, found))
    return EXIT_FAILED if any(check.failed for check in found) else EXIT_OK
