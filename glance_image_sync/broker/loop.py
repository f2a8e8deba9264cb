"""One consumer on one persistent broker connection, event-driven.

``ConnectionLoop`` connects (with bounded, interruptible backoff), lets its
component declare what it needs and start consuming, then waits in a
selector on two things only: the broker socket and a wake-up pipe. When the
socket is readable it calls py-amqp's ``drain_events`` until nothing more
has arrived; work finished on other threads is handed back through
``call_soon`` (which writes to the pipe). So acks and publishes always happen
on the connection's own thread, as py-amqp requires, and heartbeats are sent
from the same loop, so a long transfer never starves them. When nothing
happens, the loop wakes only to keep the heartbeat going.

Why a loop of our own rather than kombu's ``ConsumerMixin``: the sync worker's
results come from transfer threads and must be acked as soon as they are
ready; ``ConsumerMixin`` only looks up between ``drain_events`` calls (a
second apart when idle), while a wake-up pipe in the same selector as the
socket hands a result over at once, without polling. The loop also needs
timers (``consumer_timeout``), a way to tell that a one-shot run has drained
its queue, and a reconnect backoff that a stop request interrupts, which
``ConsumerMixin``'s does not while the broker is down.

Every callback py-amqp makes (a delivery, a confirm, a return) only records
what happened; the handlers run once ``drain_events`` has returned. Nothing
publishes, acks or raises inside py-amqp's dispatch of a frame.

A component is an object with:

``start(connection, loop)``
    declare its topology, open its channels, start consuming;
``connection_lost()``
    forget everything tied to the dead connection (its deliveries come back);
``is_drained()``
    (``once`` mode) True when its queue is empty and nothing is in flight;
``next_deadline()``
    the monotonic time it next wants ``on_timer()`` called, or None;
``flush()``
    the end of a turn of the loop (to send what it batched);
``on_unblocked()``
    the broker takes publishes again (see below).

Several brokers (a cluster's nodes) are tried in turn, starting after the one
whose connection was lost, and every line about a failed or lost connection
names the broker (password hidden). A broker that refuses the credentials
raises ``BrokerRefused`` out of ``run``: retrying cannot cure it.

RabbitMQ blocks a publishing connection while a memory or disk alarm lasts:
it stops reading it. The loop records py-amqp's connection.blocked and
connection.unblocked notifications (``blocked``), publishers hold what they
would send meanwhile, and a write that makes no progress still fails within
``connection.WRITE_TIMEOUT`` and reconnects: the loop's thread never waits on
the broker for ever, and goes on serving heartbeats and timers.

A component that finds the topology broken under it (a queue deleted while it
runs) raises ``Reconnect``: the loop then reconnects, which declares it again.
"""

from __future__ import annotations

import collections
import os
import random
import selectors
import socket
import threading
import time

from oslo_log import log as logging

from glance_image_sync.broker import connection as broker
from glance_image_sync.exceptions import BrokerUnavailable, Reconnect
from glance_image_sync.settings import redact_url

LOG = logging.getLogger(__name__)

# Longest wait for the rest of a frame once the socket was readable (py-amqp
# keeps a frame cut short and finishes it on a later turn).
FRAME_WAIT = 0.01
# Messages dispatched before calls, timers and heartbeats get their turn.
MAX_MESSAGES_PER_TURN = 1000
# A one-shot run gives up on an unreachable broker after this many tries.
ONCE_CONNECT_ATTEMPTS = 3
# In once mode, how long the queue must be quiet before asking if it is empty.
ONCE_QUIET_SECONDS = 0.3


class Backoff:
    """Exponential backoff with full jitter, capped."""

    def __init__(self, first=1.0, cap=30.0):
        self.first, self.cap, self.attempt = first, cap, 0

    def next_delay(self) -> float:
        self.attempt += 1
        ceiling = min(self.cap, self.first * 2 ** (self.attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - not crypto

    def reset(self) -> None:
        self.attempt = 0


class ConnectionLoop:
    def __init__(self, name, component, broker_settings, stop_event=None, once=False):
        self.name = name
        self.component = component
        self.broker = broker_settings
        self.stop_event = stop_event or threading.Event()
        self.once = once
        self.connected = False
        self.outage = None  # (since, reason) while the broker cannot be reached
        self.blocked = None  # (since, reason) while the broker blocks our publishes
        self.broker_url = None  # the redacted URL of the broker connected to, if any
        self.connecting = False  # True while a broker is being tried (progress, if slow)
        self._next_broker = 0
        self.last_progress = time.monotonic()
        self.on_change = None  # called (on this loop's thread) when connected changes
        self._thread = None
        self._calls = collections.deque()
        self._pipe_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- for other threads -------------------------------------------------

    def call_soon(self, fn) -> None:
        """Run ``fn()`` on the connection thread, as soon as it can.

        From the connection thread itself this defers ``fn`` until the
        dispatch at hand has returned: never run inside a py-amqp callback.
        """
        self._calls.append(fn)
        if threading.get_ident() != self._thread:
            self.wake()

    def wake(self) -> None:
        # Under the lock: once close() has run, the descriptor's number may
        # belong to another file (an image being written), which must never
        # get this byte.
        with self._pipe_lock:
            if self._wake_w is None:
                return  # closed: nobody is left to wake
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full, so the loop is already due to wake

    def stop(self) -> None:
        self.stop_event.set()
        self.wake()

    # -- the loop ----------------------------------------------------------

    def run(self) -> None:
        """Serve until stopped (or, in once mode, until drained).

        Raises BrokerUnavailable in once mode when the broker cannot be
        reached; in daemon mode it reconnects for as long as it runs.
        """
        self._thread = threading.get_ident()
        backoff = Backoff()
        while not self.stop_event.is_set():
            connection = None
            error = None
            try:
                # Each broker once, without kombu's own (uninterruptible) sleeps:
                # the backoff below waits on the stop event instead.
                self.connecting = True
                connection, index = broker.connect(
                    self.broker, self._next_broker, on_attempt=self._progress,
                    on_blocked=self._on_blocked, on_unblocked=self._on_unblocked)
                # After a loss, the next broker first: this one may be going down.
                self._next_broker = index + 1
                self.broker_url = redact_url(self.broker.urls[index])
                LOG.info("%s: connected to %s", self.name, self.broker_url)
                self.component.start(connection, self)
                self.connecting = False
                backoff.reset()
                self._set_connected(True)
                self.outage = None
                if self._serve(connection):
                    return
            except broker.ERRORS + (Reconnect,) as exc:
                error = f"connection to {self.broker_url} lost ({broker.describe(exc)})"
            except BrokerUnavailable as exc:
                error = f"cannot reach the broker ({exc})"
            finally:
                self.connecting = False
                self._set_connected(False)
                self.component.connection_lost()
                if connection is not None:
                    # A broker that blocks us reads nothing: no close-ok will come.
                    broker.close(connection, graceful=self.blocked is None)
                self.blocked = None
            # Logged outside the except block: oslo.log would append the
            # exception a second time.
            if error is not None:
                self._lost(error, backoff)

    def _set_connected(self, connected: bool) -> None:
        changed = connected != self.connected
        self.connected = connected
        if changed and self.on_change is not None:
            self.on_change()

    def _progress(self) -> None:
        self.last_progress = time.monotonic()

    # py-amqp's callbacks, inside its dispatch of a frame: they only record.

    def _on_blocked(self, reason) -> None:
        self.blocked = (time.time(), reason)
        LOG.warning("%s: the broker %s blocks publishing (%s): a memory or disk alarm; "
                    "publishes wait until it clears", self.name, self.broker_url, reason)
        if self.on_change is not None:
            self.on_change()

    def _on_unblocked(self) -> None:
        self.blocked = None
        LOG.info("%s: the broker %s takes publishes again", self.name, self.broker_url)
        self.call_soon(self.component.on_unblocked)
        if self.on_change is not None:
            self.on_change()

    def _lost(self, error: str, backoff) -> None:
        """``error``: what failed, in words that name the broker."""
        delay = backoff.next_delay()
        self.broker_url = None
        if self.once and backoff.attempt >= ONCE_CONNECT_ATTEMPTS:
            raise BrokerUnavailable(error)
        if self.outage is None:
            self.outage = (time.time(), error)
        LOG.warning("%s: %s; reconnecting in %.1f s (attempt %d)", self.name, error, delay,
                    backoff.attempt)
        deadline = time.monotonic() + delay
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            # Waiting is progress too: a broker outage is no reason for the
            # watchdog to restart us.
            self.stop_event.wait(min(1.0, deadline - time.monotonic()))
            self.last_progress = time.monotonic()

    def _serve(self, connection) -> bool:
        """Dispatch messages and calls until stopped; True when done for good."""
        sock = connection.connection.sock
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            return self._turns(connection, sock, selector)

    def _turns(self, connection, sock, selector) -> bool:
        heartbeat_every = max(1.0, self.broker.heartbeat / 4)
        next_heartbeat = time.monotonic() + heartbeat_every
        quiet_since = time.monotonic()
        while not self.stop_event.is_set():
            now = time.monotonic()
            deadline = min(next_heartbeat, self.component.next_deadline() or next_heartbeat)
            if self.once:
                deadline = min(deadline, quiet_since + ONCE_QUIET_SECONDS)
            # Bytes TLS has decrypted but not handed on: the socket will not
            # signal them.
            in_hand = _tls_pending(sock)
            timeout = 0.0 if in_hand or self._calls else max(0.0, deadline - now)
            ready = {key.fileobj for key, _ in selector.select(timeout)}
            self.last_progress = time.monotonic()
            if self._wake_r in ready:
                _empty_pipe(self._wake_r)
            if in_hand or sock in ready:
                self._drain(connection, sock, selector)
                quiet_since = time.monotonic()
            if self._calls:
                self._run_calls()
                quiet_since = time.monotonic()
            now = time.monotonic()
            if now >= next_heartbeat:
                connection.heartbeat_check()
                next_heartbeat = now + heartbeat_every
            deadline = self.component.next_deadline()
            if deadline is not None and now >= deadline:
                self.component.on_timer()
            self.component.flush()
            if self.once and now - quiet_since >= ONCE_QUIET_SECONDS:
                if self.component.is_drained():
                    return True
                quiet_since = time.monotonic()
        self.component.flush()
        return True

    def _drain(self, connection, sock, selector) -> None:
        """Dispatch what has arrived, without waiting for more than a frame's rest."""
        for _ in range(MAX_MESSAGES_PER_TURN):
            try:
                connection.drain_events(timeout=FRAME_WAIT)
            except socket.timeout:
                return  # a lone heartbeat frame, or a frame cut short: kept by py-amqp
            self._run_calls()  # what the dispatch recorded, before reading on
            if not _tls_pending(sock) and not any(
                    key.fileobj is sock for key, _ in selector.select(0)):
                return

    def _run_calls(self) -> None:
        while self._calls:
            self._calls.popleft()()

    def close(self) -> None:
        """Release the wake-up pipe; transfers still running may call call_soon after."""
        with self._pipe_lock:
            if self._wake_w is None:
                return
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_w = None


def _tls_pending(sock) -> bool:
    pending = getattr(sock, "pending", None)  # ssl.SSLSocket's
    return bool(pending and pending())


def _empty_pipe(fd) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


