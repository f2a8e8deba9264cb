"""``glance-image-sync status``: the cluster's queues and this node's last sync.

Read-only: the queues are looked at with passive declarations (``queuestats``),
this node's last success and last error come from its state file
(``nodestate``), written by the daemon and by cron runs. Neither the run lock
nor the store is touched, so it works beside a running daemon.

It says what needs a human, and exits 1 when anything does:

* the broker cannot be reached;
* the broker blocks publishers (a memory or disk alarm: "broker blocked");
* Glance's notification queue, or one of this node's queues, exists with
  other arguments than the settings give it (say which setting differs);
* a node's failed queue holds events (they ran out of attempts);
* the dead-letter queue holds messages (rejected as malformed or hostile);
* this node's queue does not exist, or holds events with no consumer;
* this node's last error is more recent than its last success;
* this node's state file cannot be read;
* queues are left behind: those of a node no longer in ``api_nodes`` (this
  node remembers every node its fan-out declared queues for, ``knownnodes``),
  or the 2013 tool's ``glance_image_sync.<node>.info``.

0 otherwise; 2 for a configuration error (as every command).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from glance_image_sync.admin.tables import agree, iso, plural, table, when
from glance_image_sync.broker import queues as queuestats
from glance_image_sync.exceptions import EXIT_FAILED, EXIT_OK, BrokerUnavailable, NodeStateError
from glance_image_sync.state import knownnodes, nodestate
from glance_image_sync.state.nodestate import Snapshot


@dataclass
class Report:
    node: str
    broker: str  # redacted
    overview: queuestats.Overview | None
    broker_error: str | None
    snapshot: Snapshot
    state_error: str | None
    now: float
    problems: list = field(default_factory=list)
    vhost: str = "/"


def gather(settings, now=None) -> Report:
    try:
        overview = queuestats.overview(settings, knownnodes.load(settings.store.state_dir),
                                       check=True)
        broker_error = None
    except BrokerUnavailable as exc:
        overview, broker_error = None, str(exc)
    try:
        snapshot, state_error = nodestate.load(settings.store.state_dir), None
    except NodeStateError as exc:
        snapshot, state_error = Snapshot(), str(exc)
    report = Report(settings.nodes.this, settings.broker.redacted(), overview, broker_error,
                    snapshot, state_error, time.time() if now is None else now,
                    vhost=settings.broker.vhost)
    report.problems = problems(report)
    return report


def problems(report: Report) -> list:
    """What needs a human, in words; empty when nothing does."""
    found = []
    if report.broker_error:
        found.append(f"the broker cannot be reached: {report.broker_error}")
    overview = report.overview
    if overview is not None:
        if overview.blocked:
            found.append(f"broker blocked: the broker blocks publishers ({overview.blocked}); "
                         "a memory or disk alarm (rabbitmqctl status on each broker node "
                         "shows it), and events wait until it clears")
        found += [str(mismatch) for mismatch in overview.mismatches]
        for node in overview.nodes:
            if node.failed.messages:
                found.append(f"{plural(node.failed.messages, 'event')} of {node.node} ran "
                             f"out of attempts and {agree(node.failed.messages, 'waits', 'wait')}"
                             f" in {node.failed.name} (see "
                             f"'glance-image-sync failed list' on {node.node})")
            if node.node != report.node:
                continue
            if not node.queue.exists:
                found.append(f"{node.queue.name} does not exist: no fan-out has run since "
                             f"api_nodes named {node.node}")
            elif node.queue.messages and not node.queue.consumers:
                found.append(f"{plural(node.queue.messages, 'event')} "
                             f"{agree(node.queue.messages, 'waits', 'wait')} in "
                             f"{node.queue.name} and nothing consumes it (is the daemon "
                             "running?)")
        found += _left_behind(overview, report.vhost)
        if overview.dead_letter.messages:
            dead = overview.dead_letter
            found.append(f"{plural(dead.messages, 'message')} rejected as malformed or "
                         f"hostile {agree(dead.messages, 'waits', 'wait')} in {dead.name} (see "
                         "'glance-image-sync failed list --dead-letter')")
    if report.state_error:
        found.append(report.state_error)
    success, error = report.snapshot.last_success, report.snapshot.last_error
    if error and (success is None or error.time > success.time):
        found.append(f"the last event applied on {report.node} failed "
                     f"({when(error.time, report.now)}, image {error.image_id}: "
                     f"{error.detail})")
    return found


def _left_behind(overview, vhost: str) -> list:
    """Queues of nodes no longer in api_nodes, and of the 2013 tool."""
    found = []
    for node in overview.departed:
        found.append(f"{node.node} is not in api_nodes, but its queues remain "
                     f"({plural(node.messages, 'event')} in {node.queue.name} and its retry "
                     f"and failed queues): if it is gone for good, run 'glance-image-sync "
                     f"forget-node {node.node}'")
    for queue in overview.legacy:
        found.append(f"{queue.name} is left over from the 2013 tool "
                     f"({plural(queue.messages, 'message')}); nothing reads it: remove it with "
                     f"'rabbitmqctl delete_queue -p {vhost} {queue.name}'")
    return found


def exit_status(report: Report) -> int:
    return EXIT_FAILED if report.problems else EXIT_OK


# -- showing it --------------------------------------------------------------


def render_table(report: Report) -> str:
    lines = [f"glance-image-sync on {report.node}, broker {report.broker}", ""]
    overview = report.overview
    if overview is None:
        lines.append("queues: unknown (the broker cannot be reached)")
    else:
        rows = [["node", "queued", "consumers", "retrying", "failed"]]
        for node in overview.nodes:
            rows.append([node.node + (" *" if node.node == report.node else ""),
                         _count(node.queue.messages), _count(node.queue.consumers),
                         str(node.retry_messages), _count(node.failed.messages)])
        for node in overview.departed:
            rows.append([f"{node.node} (not in api_nodes)", _count(node.queue.messages),
                         _count(node.queue.consumers), str(node.retry_messages),
                         _count(node.failed.messages)])
        lines += table(rows, right=range(1, len(rows[0])))
        notifications = overview.notifications
        lines += [
            "",
            f"notifications ({notifications.name}): {_count(notifications.messages)} waiting, "
            f"{_consumers(notifications.consumers)} (fan-out)",
            f"dead letters ({overview.dead_letter.name}): {_count(overview.dead_letter.messages)}",
        ]
    lines += [
        "",
        f"last success: {_record(report.snapshot.last_success, report.now)}",
        f"last error:   {_record(report.snapshot.last_error, report.now)}",
        "",
    ]
    if report.problems:
        lines.append("NEEDS ATTENTION:")
        lines += [f"  - {problem}" for problem in report.problems]
    else:
        lines.append("OK: nothing needs attention")
    return "\n".join(lines) + "\n"


def render_json(report: Report) -> str:
    overview = report.overview
    doc = {
        "node": report.node,
        "broker": {"url": report.broker, "reachable": overview is not None,
                   "error": report.broker_error,
                   "blocked": overview.blocked if overview else None},
        "notifications": _queue(overview.notifications) if overview else None,
        "nodes": [{
            "node": node.node,
            "this": node.node == report.node,
            "queue": _queue(node.queue),
            "retrying": node.retry_messages,
            "failed": _queue(node.failed),
        } for node in overview.nodes] if overview else None,
        "dead_letter": _queue(overview.dead_letter) if overview else None,
        "departed_nodes": [{
            "node": node.node,
            "queue": _queue(node.queue),
            "retrying": node.retry_messages,
            "failed": _queue(node.failed),
        } for node in overview.departed] if overview else None,
        "left_over": [_queue(queue) for queue in overview.legacy] if overview else None,
        "last_success": _record_doc(report.snapshot.last_success),
        "last_error": _record_doc(report.snapshot.last_error),
        "problems": report.problems,
        "ok": not report.problems,
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _queue(queue) -> dict:
    return {"name": queue.name, "exists": queue.exists, "messages": queue.messages,
            "consumers": queue.consumers}


def _record_doc(record) -> dict | None:
    if record is None:
        return None
    return {"time": record.time, "iso": iso(record.time), "image_id": record.image_id,
            "detail": record.detail}


def _record(record, now) -> str:
    if record is None:
        return "never"
    return f"{when(record.time, now)}, image {record.image_id}: {record.detail}"


def _consumers(value) -> str:
    return "- consumers" if value is None else plural(value, "consumer")


def _count(value) -> str:
    return "-" if value is None else str(value)


def main(args, settings, out=None) -> int:
    """The command: print the report, return the exit status."""
    report = gather(settings)
    (out or sys.stdout).write(render_json(report) if args.format == "json"
                              else render_table(report))
    return exit_status(report)
