"""Running work off the connection thread, in order per image.

Jobs run on a bounded thread pool. Jobs with the same key (an image id) never
run at once and run in the order they were submitted, so the events of one
image are applied in order while other images proceed in parallel.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

from oslo_log import log as logging

LOG = logging.getLogger(__name__)


class OrderedDispatcher:
    def __init__(self, max_workers: int):
        self._pool = ThreadPoolExecutor(max_workers=max_workers,
                                        thread_name_prefix="transfer")
        self._lock = threading.Lock()
        self._queues = {}  # key -> deque of jobs waiting behind the running one

    def submit(self, key, job) -> None:
        """Run ``job()`` after every job submitted earlier with the same key."""
        with self._lock:
            waiting = self._queues.get(key)
            if waiting is not None:
                waiting.append(job)
                return
            self._queues[key] = collections.deque()
        self._pool.submit(self._run, key, job)

    def _run(self, key, job) -> None:
        while job is not None:
            try:
                job()
            except Exception:  # noqa: BLE001 - a job's bug must not stall its key
                # Nor may a log handler that fails: WatchedFileHandler raises
                # (instead of reporting) when its file's directory is gone.
                with contextlib.suppress(Exception):
                    LOG.exception("unexpected error in a job for %s", key)
            with self._lock:
                waiting = self._queues[key]
                if waiting:
                    job = waiting.popleft()
                else:
                    del self._queues[key]
                    job = None

    def shutdown(self) -> None:
        """Drop waiting jobs and wait for the running ones to return."""
        with self._lock:
            for waiting in self._queues.values():
                waiting.clear()
        self._pool.shutdown(wait=True)
