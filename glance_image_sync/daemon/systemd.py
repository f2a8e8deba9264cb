"""Telling systemd how the daemon is (sd_notify(3), through sdnotify).

READY=1 once both consumers consume, STATUS in words for ``systemctl status``,
WATCHDOG=1 only while both show progress, STOPPING=1 on the way out. Outside
systemd (no ``NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import os

import sdnotify


class SystemdNotifier:
    def __init__(self):
        # The socket is opened here: create this object only after
        # daemonizing, or python-daemon closes it.
        self._notifier = sdnotify.SystemdNotifier()
        self._status = None

    def ready(self) -> None:
        self._notifier.notify("READY=1")

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self._notifier.notify(f"STATUS={text}")

    def watchdog(self) -> None:
        self._notifier.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self._notifier.notify("STOPPING=1")

    def reloading(self) -> None:
        self._notifier.notify("RELOADING=1")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None.

    As sd_watchdog_enabled(3): WATCHDOG_USEC is ours only when WATCHDOG_PID
    is unset or names this process.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        return None
    return seconds / 2 if seconds > 0 else None
