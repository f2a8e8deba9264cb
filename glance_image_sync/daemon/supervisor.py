"""The daemon: both consumers on their own connections, watched and reported.

The fan-out and the sync worker each run a ``ConnectionLoop`` on a thread of
its own. The main thread only supervises: it handles signals, tells systemd
READY=1 as soon as both loops run (reaching the broker is their business:
STATUS says which broker they wait for, and they retry with backoff, so a
broker that is down at boot causes no start-up timeout and no restart loop),
keeps STATUS current, pings the watchdog while both loops show recent
progress (so a wedged consumer gets the service restarted, while a broker
outage or a blocked broker does not), and reloads ``api_nodes`` and the log
level on SIGHUP.

A broker that refuses the credentials is a configuration error: the daemon
logs one line and exits with EXIT_BROKER_REFUSED (78), which the unit's
RestartPreventExitStatus keeps systemd from restarting on.

On SIGTERM (or SIGINT) it sends STOPPING=1 and stops both loops; running
transfers are killed, their temporary files removed, and their messages left
unacked, so the broker delivers them again after the restart.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time

from oslo_log import log as logging

from glance_image_sync.broker.connection import CONNECT_TIMEOUT
from glance_image_sync.daemon.systemd import SystemdNotifier, watchdog_interval
from glance_image_sync.exceptions import EXIT_BROKER_REFUSED, AlreadyRunning, BrokerRefused
from glance_image_sync.fanout.consumer import fanout_loop
from glance_image_sync.metrics import Exporter
from glance_image_sync.nodes import Nodes
from glance_image_sync.state.runlock import RunLock
from glance_image_sync.sync.session import sync_loop

LOG = logging.getLogger(__name__)

# How often STATUS is refreshed when nothing else wakes the supervisor.
STATUS_EVERY = 5.0
# Grace for stopping: loops return at once; transfers are killed.
STOP_TIMEOUT = 20.0


class Supervisor:
    def __init__(self, conf, settings, notifier=None, handle_signals=True):
        self.conf = conf
        self.settings = settings
        self.notifier = notifier or SystemdNotifier()
        self.handle_signals = handle_signals
        self.stop_event = threading.Event()
        self._attention = threading.Event()
        self._reload_requested = False
        self._failure = None
        self._ready = False  # READY=1 sent
        self._consuming = False  # both loops have consumed ("ready: consuming" logged)
        self._exit_status = 0
        self._stopping = threading.RLock()  # one says why it stops, once (signals too)
        self.loops = []

    # -- signals -------------------------------------------------------------

    def request_stop(self, *_):
        with self._stopping:
            first = not self.stop_event.is_set()
            self.stop_event.set()
        if first:
            self.notifier.stopping()
            LOG.info("stopping: abandoning running transfers (their events stay queued)")
        for loop in self.loops:
            loop.wake()
        self._attention.set()

    def request_reload(self, *_):
        self._reload_requested = True
        self._attention.set()

    # -- running ---------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; 0 after a clean stop, 1 if a consumer failed,
        EXIT_BROKER_REFUSED if the broker refused the credentials."""
        if self.handle_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
            signal.signal(signal.SIGHUP, self.request_reload)
        try:
            lock = RunLock.in_dir(self.settings.store.state_dir)
            lock.acquire()
        except AlreadyRunning as exc:
            LOG.error("not starting: %s", exc)
            return 1
        try:
            with sync_loop(self.settings, self.stop_event) as syncing, \
                    Exporter(self.settings.metrics, syncing.component.metrics.registry):
                self.loops = [fanout_loop(self.settings, self.stop_event), syncing]
                for loop in self.loops:
                    loop.on_change = self._attention.set
                threads = [threading.Thread(target=self._run_loop, args=(loop,),
                                            name=loop.name, daemon=True)
                           for loop in self.loops]
                for thread in threads:
                    thread.start()
                self._supervise()
                for thread in threads:
                    thread.join(STOP_TIMEOUT)
                for loop in self.loops:
                    loop.close()
        finally:
            lock.release()
        LOG.info("stopped")
        return self._exit_status

    def _run_loop(self, loop) -> None:
        try:
            loop.run()
            return
        except BrokerRefused as exc:
            refused = exc
        except Exception as exc:  # noqa: BLE001 - the outer edge: report, then stop all
            LOG.exception("%s: stopped by an unexpected error", loop.name)
            self._failure = f"{loop.name}: {exc}"
            self._exit_status = self._exit_status or 1
            self.request_stop()
            return
        with self._stopping:
            first = self._exit_status != EXIT_BROKER_REFUSED
            self._exit_status = EXIT_BROKER_REFUSED
        if first:  # both loops meet it: one line
            # Logged outside the except block: oslo.log would append the traceback.
            LOG.error("configuration error, stopping: %s", refused)
        self._failure = str(refused)
        self.request_stop()

    def _supervise(self) -> None:
        interval = watchdog_interval()
        while not self.stop_event.is_set():
            self._tick(interval)
            self._attention.wait(min(interval or STATUS_EVERY, STATUS_EVERY))
            self._attention.clear()

    def _tick(self, interval) -> None:
        """One look at the loops: reload if asked, then READY, WATCHDOG and STATUS."""
        if self._reload_requested:
            self._reload_requested = False
            self._reload()
        if not self._ready:
            # Started: the loops run, and reaching the broker is their business
            # (STATUS says which broker they wait for). systemd arms the
            # watchdog from here on.
            self._ready = True
            self.notifier.status(self.status_text())
            self.notifier.ready()
        if not self._consuming and all(loop.connected for loop in self.loops):
            self._consuming = True
            LOG.info("ready: consuming on %s", self.settings.nodes.this)
        healthy = not any(self._stuck_for(loop) for loop in self.loops)
        if interval is not None and healthy:
            self.notifier.watchdog()
        elif interval is not None:
            LOG.error("a consumer shows no progress (%s); not pinging the watchdog",
                      self.status_text())
        self.notifier.status(self.status_text())

    # -- reporting -----------------------------------------------------------

    def _stuck_for(self, loop) -> float:
        """Seconds a loop has gone without progress beyond what is normal, or 0."""
        # A loop wakes at least every heartbeat/4 s, even when idle; trying
        # one broker may take up to three connect timeouts (TCP, TLS, AMQP).
        idle = time.monotonic() - loop.last_progress
        allowed = self.settings.broker.heartbeat / 4 + 5
        if loop.connecting:
            allowed += 3 * CONNECT_TIMEOUT
        return idle if idle > allowed else 0.0

    def _loop_state(self, loop) -> str:
        stuck = self._stuck_for(loop)
        if stuck:
            return f"stuck (no progress for {stuck:.0f} s)"
        if loop.connected and loop.blocked:
            return (f"consuming, broker blocked since {_clock(loop.blocked[0])} "
                    f"({loop.broker_url}: a memory or disk alarm)")
        if loop.connected:
            return "consuming"
        if loop.outage:
            since, reason = loop.outage
            return f"waiting for the broker since {_clock(since)} ({reason[:160]})"
        return f"connecting to {self.settings.broker.redacted()}"

    def status_text(self) -> str:
        fanout, sync = self.loops
        worker = sync.component
        parts = [f"fan-out {self._loop_state(fanout)}", f"sync {self._loop_state(sync)}"]
        running = worker.image_sync.rsync.running
        parts.append(f"{running} transfer{'' if running == 1 else 's'} running")
        if worker.last_success:
            when, image_id, _ = worker.last_success
            parts.append(f"last sync {_clock(when)} ({image_id})")
        if worker.failed_attempts:
            when, image_id, detail = worker.last_error
            parts.append(f"{worker.failed_attempts} failed attempts, last {_clock(when)} "
                         f"({image_id}: {detail[:80]})")
        return "; ".join(parts)

    # -- SIGHUP ----------------------------------------------------------------

    def _reload(self) -> None:
        self.notifier.reloading()
        LOG.info("SIGHUP: reloading the configuration")
        try:
            self.conf.mutate_config_files()  # debug (oslo.log's hook) and api_nodes
            nodes = Nodes(self.conf.api_nodes, self.conf.host)
        except Exception as exc:  # noqa: BLE001 - a bad file must not stop the daemon
            failure = exc
        else:
            failure = None
        if failure is not None:
            LOG.error("reload failed, keeping the running configuration: %s", failure)
        elif nodes.all != self.settings.nodes.all:
            LOG.info("api_nodes is now %s (was %s)", ", ".join(nodes.all),
                     ", ".join(self.settings.nodes.all))
            self.settings = dataclasses.replace(self.settings, nodes=nodes)
            for loop in self.loops:
                loop.call_soon(lambda loop=loop: loop.component.set_nodes(nodes))
        self.notifier.ready()


def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))
