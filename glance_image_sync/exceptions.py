"""The errors glance-image-sync raises on purpose, and the exit statuses they end in.

Every module raises from here, so an entry point or an operator command can
catch one by name without importing the layer that raised it. Each message is
written for an operator: it says what failed and, where it can, what to do.
"""

from __future__ import annotations

# Exit statuses of every command (README: "Exit status").
EXIT_OK = 0
EXIT_FAILED = 1  # something failed or needs a human; it is logged and kept
EXIT_USAGE = 2  # the command line is wrong (argparse's own status)
EXIT_CONFIG = 2  # the configuration cannot work
# The broker refused the credentials of transport_url (sysexits.h's
# EX_CONFIG): systemd's unit does not restart on it (RestartPreventExitStatus).
EXIT_BROKER_REFUSED = 78


class ConfigError(Exception):
    """A configuration value that cannot work; the message says which and why."""


class UsageError(Exception):
    """A command line that cannot work (beyond what argparse checks); exit 2."""


class BrokerUnavailable(Exception):
    """The broker could not be reached (a one-shot run gave up, or a read failed)."""


class BrokerRefused(Exception):
    """The broker refused the credentials (ACCESS_REFUSED); the message names the broker."""


class Reconnect(Exception):
    """Start over on a new broker connection, declaring everything again."""


class Rejected(ValueError):
    """A message that must not be acted on; ``reason`` says why."""

    @property
    def reason(self) -> str:
        return str(self.args[0])


class StoreError(Exception):
    """The image store could not do what was asked; the message says why."""


class VerificationFailed(StoreError):
    """A copy's size or md5 is not the event's."""


class DiskFull(StoreError):
    """No space left for the copy."""


class TransferFailed(Exception):
    """rsync did not bring the file; the message says why, in rsync's words."""

    def __init__(self, message, disk_full=False, what="", returncode=None, stderr=""):
        super().__init__(message)
        self.disk_full = disk_full
        self.what = what  # "rsync from node1"
        self.returncode = returncode  # rsync's, if it ended by itself
        self.stderr = stderr


class TransferCancelled(TransferFailed):
    """The transfer was stopped because the process is shutting down."""


class AlreadyRunning(Exception):
    """Another process holds the run lock; the message names its pid."""


class NodeStateError(Exception):
    """This node's state file exists but cannot be read; the message says why."""
