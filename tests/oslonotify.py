"""Glance's side: oslo.messaging's real Notifier, configured as Glance configures it.

Run in a process of its own (oslo.messaging still imports eventlet, and a
thread that set up its transport is never reported as ended): ``notify``
publishes image notifications and returns the finished process, whose stderr
holds whatever oslo.messaging logged (a refused publish says "Could not send
notification" there).
"""

import json
import subprocess
import sys

_SCRIPT = r"""
import json, logging, sys
import oslo_messaging
from oslo_config import cfg
args = json.loads(sys.argv[1])
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
conf = cfg.ConfigOpts()
conf([], project="glance")
oslo_messaging.set_transport_defaults("glance")
transport = oslo_messaging.get_notification_transport(conf, url=args["url"])
for name, value in args["rabbit"].items():
    conf.set_override(name, value, group="oslo_messaging_rabbit")
conf.set_override("retry", 2, group="oslo_messaging_notifications")
notifier = oslo_messaging.Notifier(transport, publisher_id="image." + args["publisher"],
                                   driver="messagingv2", topics=["glance_notifications"])
for event_type, payload in args["events"]:
    notifier.info({}, event_type, payload)
transport.cleanup()
"""


def delete_event(image_id):
    """An image.delete as Glance sends it (the fields the tool reads)."""
    return ("image.delete", {"id": image_id, "status": "deleted", "deleted": True,
                             "checksum": None, "size": None})


def upload_event(image_id, checksum="9b8f6225e89197b8d67aafd6f91ce7bf", size=4194304):
    return ("image.upload", {"id": image_id, "status": "active", "checksum": checksum,
                             "size": size})


def notify(url, events, rabbit=None, publisher="node2", timeout=120):
    """Publish ``events`` [(event_type, payload)] with oslo.messaging; the CompletedProcess."""
    args = {"url": url, "events": events, "rabbit": rabbit or {}, "publisher": publisher}
    return subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(args)],
                          capture_output=True, text=True, timeout=timeout, check=False)
