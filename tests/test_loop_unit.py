"""The connection loop's machinery, with a stand-in connection over a socket pair:
what arrives is dispatched, calls from other threads run at once, timers fire,
a one-shot run ends when drained, and a lost connection is made again."""

import socket
import threading
import time
from types import SimpleNamespace

import pytest

from glance_image_sync.broker import loop as loop_module
from glance_image_sync.broker.connection import describe
from glance_image_sync.broker.loop import Backoff, ConnectionLoop
from glance_image_sync.exceptions import BrokerUnavailable, Reconnect
from tools.localcluster import wait_for

BROKER = SimpleNamespace(heartbeat=4, urls=("amqp://u:secret@h1:5672/",),
                         redacted=lambda: "amqp://u:****@h1:5672/")


class Connection:
    """Each byte the 'broker' writes is one message; drain_events dispatches it."""

    def __init__(self, on_message):
        self.broker_side, ours = socket.socketpair()
        self.connection = SimpleNamespace(sock=ours)
        self.on_message = on_message
        self.heartbeats = 0
        self.released = False
        self.connected = True

    def drain_events(self, timeout):
        self.connection.sock.settimeout(timeout)
        byte = self.connection.sock.recv(1)  # socket.timeout when nothing came
        if not byte:
            raise ConnectionResetError("the broker closed the connection")
        self.on_message(byte)

    def heartbeat_check(self):
        self.heartbeats += 1

    def as_uri(self):
        return "amqp://u:****@h1:5672/"

    def release(self):
        self.released = True
        self.connection.sock.close()
        self.broker_side.close()


class Component:
    def __init__(self):
        self.received, self.turns, self.timers, self.lost = [], 0, 0, 0
        self.deadline = None
        self.drained = False
        self.loop = None
        self.on_start = None

    def start(self, connection, loop):
        self.loop = loop
        if self.on_start:
            self.on_start(connection)

    def connection_lost(self):
        self.lost += 1

    def is_drained(self):
        return self.drained

    def next_deadline(self):
        return self.deadline

    def on_timer(self):
        self.timers += 1
        self.deadline = None

    def flush(self):
        self.turns += 1

    def on_unblocked(self):
        self.unblocked = getattr(self, "unblocked", 0) + 1


@pytest.fixture
def connections(monkeypatch):
    """Every connection the loop makes, in order; connect() fails while ``refuse`` is set."""
    made = []
    state = SimpleNamespace(refuse=0, component=None, made=made)

    def connect(broker, first=0, on_attempt=None, **callbacks):
        on_attempt()
        state.callbacks = callbacks
        if state.refuse:
            state.refuse -= 1
            raise BrokerUnavailable(f"{broker.redacted()}: ConnectionRefusedError: "
                                    "[Errno 111] Connection refused")
        connection = Connection(lambda byte: state.component.received.append(byte))
        made.append(connection)
        return connection, 0

    monkeypatch.setattr(loop_module.broker, "connect", connect)
    monkeypatch.setattr(loop_module, "Backoff", lambda: Backoff(first=0.01, cap=0.02))
    yield state
    for connection in made:
        if not connection.released:
            connection.release()


def running(loop):
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    wait_for(lambda: loop.connected or not thread.is_alive(), 5, what="the loop to connect")
    return thread


def stop(loop, thread):
    loop.stop()
    thread.join(5)
    assert not thread.is_alive()
    loop.close()


def test_what_arrives_is_dispatched_and_each_turn_ends_with_a_flush(connections):
    component = connections.component = Component()
    loop = ConnectionLoop("test", component, BROKER)
    thread = running(loop)
    connections.made[0].broker_side.sendall(b"abc")
    wait_for(lambda: len(component.received) == 3, 5, what="three messages")
    assert component.received == [b"a", b"b", b"c"] and component.turns >= 1
    stop(loop, thread)
    assert component.lost == 1 and connections.made[0].released


def test_a_call_from_another_thread_runs_at_once_on_the_loops_thread(connections):
    component = connections.component = Component()
    loop = ConnectionLoop("test", component, BROKER)
    thread = running(loop)
    ran_on = []
    started = time.monotonic()
    threading.Thread(target=loop.call_soon,
                     args=(lambda: ran_on.append(threading.get_ident()),)).start()
    wait_for(lambda: ran_on, 5, interval=0.001, what="the call")
    assert ran_on == [thread.ident]
    assert time.monotonic() - started < 0.5  # woken, not found by the next heartbeat
    stop(loop, thread)


def test_a_call_made_inside_a_dispatch_waits_until_the_dispatch_returned(connections):
    order = []
    component = connections.component = Component()
    loop = ConnectionLoop("test", component, BROKER)

    def on_message(byte):
        order.append("dispatch")
        loop.call_soon(lambda: order.append("handler"))
        order.append("dispatch returns")

    component.on_start = lambda connection: setattr(connection, "on_message", on_message)
    thread = running(loop)
    connections.made[0].broker_side.sendall(b"x")
    wait_for(lambda: "handler" in order, 5, what="the handler")
    assert order == ["dispatch", "dispatch returns", "handler"]
    stop(loop, thread)


def test_a_components_timer_fires_when_its_deadline_comes(connections):
    component = connections.component = Component()
    loop = ConnectionLoop("test", component, BROKER)
    thread = running(loop)
    component.deadline = time.monotonic() + 0.05
    loop.wake()
    wait_for(lambda: component.timers == 1, 5, what="the timer")
    stop(loop, thread)


def test_heartbeats_are_kept_going_while_nothing_happens(connections):
    component = connections.component = Component()
    loop = ConnectionLoop("test", component, BROKER)
    thread = running(loop)
    wait_for(lambda: connections.made[0].heartbeats >= 2, 5, what="two heartbeat checks")
    stop(loop, thread)


def test_a_one_shot_run_returns_once_its_component_is_drained(connections):
    component = connections.component = Component()
    component.drained = True
    loop = ConnectionLoop("test", component, BROKER, once=True)
    loop.run()  # returns by itself
    loop.close()
    assert component.lost == 1


def test_reconnect_from_a_handler_makes_a_new_connection(connections):
    component = connections.component = Component()
    loop = ConnectionLoop("test", component, BROKER)
    thread = running(loop)
    changes = []
    loop.on_change = lambda: changes.append(loop.connected)

    def broken():
        raise Reconnect("a queue was deleted")

    loop.call_soon(broken)
    wait_for(lambda: len(connections.made) == 2 and loop.connected, 5, what="a new connection")
    assert connections.made[0].released and component.lost == 1
    assert changes == [False, True]
    stop(loop, thread)


def test_a_broker_that_closes_the_connection_is_connected_to_again(connections):
    component = connections.component = Component()
    loop = ConnectionLoop("test", component, BROKER)
    thread = running(loop)
    connections.made[0].broker_side.close()
    wait_for(lambda: len(connections.made) == 2 and loop.connected, 5, what="a new connection")
    assert loop.outage is None  # it is back
    stop(loop, thread)


def test_while_the_broker_is_down_waiting_counts_as_progress(connections):
    connections.refuse = 10**6
    component = connections.component = Component()
    loop = ConnectionLoop("test", component, BROKER)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    wait_for(lambda: loop.outage is not None, 5, what="the outage to be seen")
    before = loop.last_progress
    wait_for(lambda: loop.last_progress > before, 5, what="progress while waiting")
    assert "Connection refused" in loop.outage[1] and not loop.connected
    stop(loop, thread)  # a stop request ends the backoff at once


def test_a_one_shot_run_gives_up_on_an_unreachable_broker_with_its_name_but_no_password(
        connections):
    connections.refuse = 10**6
    loop = ConnectionLoop("test", Component(), BROKER, once=True)
    with pytest.raises(BrokerUnavailable) as raised:
        loop.run()
    loop.close()
    assert "amqp://u:****@h1:5672/" in str(raised.value)
    assert "secret" not in str(raised.value) and "Connection refused" in str(raised.value)


def test_the_brokers_blocked_and_unblocked_are_recorded_and_the_component_told(connections):
    component = connections.component = Component()
    loop = ConnectionLoop("test", component, BROKER)
    thread = running(loop)
    changes = []
    loop.on_change = lambda: changes.append(loop.blocked)
    assert loop.broker_url == "amqp://u:****@h1:5672/"
    # py-amqp calls these inside its dispatch: on the loop's thread.
    loop.call_soon(lambda: connections.callbacks["on_blocked"]("low on memory"))
    wait_for(lambda: loop.blocked is not None, 5, what="blocked")
    assert loop.blocked[1] == "low on memory" and changes[0] is not None
    loop.call_soon(connections.callbacks["on_unblocked"])
    wait_for(lambda: getattr(component, "unblocked", 0) == 1, 5, what="the component told")
    assert loop.blocked is None and changes[-1] is None
    stop(loop, thread)


def test_a_wake_up_after_close_is_harmless():
    loop = ConnectionLoop("test", Component(), BROKER)
    loop.close()
    loop.wake()
    loop.close()


def test_backoff_doubles_with_jitter_up_to_its_cap_and_starts_over_on_reset():
    backoff = Backoff(first=1.0, cap=8.0)
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, ceiling in zip(delays, [1, 2, 4, 8, 8, 8]):
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_an_exception_is_described_by_its_type_and_message():
    assert describe(ConnectionRefusedError(111, "Connection refused")) == \
        "ConnectionRefusedError: [Errno 111] Connection refused"
    assert describe(socket.timeout()) == "TimeoutError"
