"""One consumer on one persistent broker connection, event-driven.

``ConnectionLoop`` connects (with bounded, interruptible backoff), lets its
component declare what it needs and start consuming, then sleeps in
``select()`` on two things only: the broker socket and a wake-up pipe. Frames
are read when they arrive; work finished on other threads is handed back
through ``call_soon`` (which writes to the pipe), so acks and publishes always
happen on the connection's own thread, as py-amqp requires. Heartbeats are
sent from the same loop, so a long transfer never starves them. No polling:
when nothing happens, the loop wakes only to keep the heartbeat going.

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
    the end of a turn of the loop (to send what it batched).

A component that finds the topology broken under it (a queue deleted while it
runs) raises ``Reconnect``: the loop then reconnects, which declares it again.
"""

from __future__ import annotations

import collections
import os
import random
import select
import socket
import threading
import time

from oslo_log import log as logging

from glance_image_sync.broker import connection as broker
from glance_image_sync.broker.framereader import FrameReader
from glance_image_sync.exceptions import BrokerUnavailable, Reconnect

LOG = logging.getLogger(__name__)

# Longest wait for the rest of a frame once the socket was readable.
FRAME_WAIT = 0.01
# Frames dispatched before calls, timers and heartbeats get their turn.
MAX_FRAMES_PER_TURN = 3000
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

        From the connection thread itself this defers ``fn`` until the frames
        at hand are dispatched: never run inside a py-amqp callback.
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
                connection = broker.connect(self.broker)
                LOG.info("%s: connected to %s", self.name, connection.as_uri())
                self.component.start(connection, self)
                backoff.reset()
                self._set_connected(True)
                self.outage = None
                if self._serve(connection):
                    return
            except broker.ERRORS + (Reconnect,) as exc:
                error = exc
            finally:
                self._set_connected(False)
                self.component.connection_lost()
                if connection is not None:
                    _close_quietly(connection)
            # Logged outside the except block: oslo.log would append the
            # exception a second time.
            if error is not None:
                self._lost(error, backoff)

    def _set_connected(self, connected: bool) -> None:
        changed = connected != self.connected
        self.connected = connected
        if changed and self.on_change is not None:
            self.on_change()

    def _lost(self, exc, backoff) -> None:
        delay = backoff.next_delay()
        if self.once and backoff.attempt >= ONCE_CONNECT_ATTEMPTS:
            raise BrokerUnavailable(f"{self.broker.redacted()}: {_describe(exc)}")
        if self.outage is None:
            self.outage = (time.time(), _describe(exc))
        LOG.warning("%s: broker connection lost or refused (%s); reconnecting in %.1f s "
                    "(attempt %d)", self.name, _describe(exc), delay, backoff.attempt)
        deadline = time.monotonic() + delay
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            # Waiting is progress too: a broker outage is no reason for the
            # watchdog to restart us.
            self.stop_event.wait(min(1.0, deadline - time.monotonic()))
            self.last_progress = time.monotonic()

    def _serve(self, connection) -> bool:
        """Dispatch frames and calls until stopped; True when done for good."""
        sock = connection.connection.sock
        reader = FrameReader(connection.connection)
        heartbeat_every = max(1.0, self.broker.heartbeat / 4)
        next_heartbeat = time.monotonic() + heartbeat_every
        quiet_since = time.monotonic()
        while not self.stop_event.is_set():
            now = time.monotonic()
            deadline = min(next_heartbeat, self.component.next_deadline() or next_heartbeat)
            if self.once:
                deadline = min(deadline, quiet_since + ONCE_QUIET_SECONDS)
            # Frames already read (a turn stops after MAX_FRAMES_PER_TURN) or
            # decrypted: the socket may never become readable for them.
            buffered = reader.in_hand()
            timeout = 0.0 if buffered or self._calls else max(0.0, deadline - now)
            readable, _, _ = select.select([sock, self._wake_r], [], [], timeout)
            self.last_progress = time.monotonic()
            _cork(sock, True)
            if self._wake_r in readable:
                _empty_pipe(self._wake_r)
            if buffered or sock in readable:
                self._drain(reader, sock)
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
            _cork(sock, False)
            if self.once and now - quiet_since >= ONCE_QUIET_SECONDS:
                if self.component.is_drained():
                    return True
                quiet_since = time.monotonic()
        self.component.flush()
        return True

    def _drain(self, reader, sock) -> None:
        """Read and dispatch what has arrived, without waiting for more.

        py-amqp's drain_events reads until a whole *method* is in, so a lone
        heartbeat frame would make it wait for the next frame (seconds) with
        calls and timers stalled: frames are read one at a time instead, and
        a frame cut short is kept by py-amqp and finished on a later turn.
        """
        for _ in range(MAX_FRAMES_PER_TURN):
            if not reader.in_hand():
                ready, _, _ = select.select([sock], [], [], 0)
                if not ready:
                    return
            try:
                reader.read_frame(timeout=FRAME_WAIT)
            except socket.timeout:
                return
            self._run_calls()  # what the frames deferred, before reading on

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


def _empty_pipe(fd) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _cork(sock, corked: bool) -> None:
    """Hold back partial segments (TCP_CORK) while a turn writes; send them as it ends.

    A turn may publish hundreds of copies and acks, each its own small write;
    corked, they leave in full segments, and the broker reads them in bulk.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if corked else 0)
    except OSError:
        pass  # a socket that has just died: the next read says so


def _close_quietly(connection) -> None:
    try:
        connection.release()
    except Exception:  # noqa: BLE001 - the connection is being thrown away
        LOG.debug("error while closing a broker connection", exc_info=True)


def _describe(exc) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
