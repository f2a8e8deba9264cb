"""The per-image ordered dispatcher and the run lock."""

import os
import signal
import subprocess
import sys
import threading

import pytest

from glance_image_sync.exceptions import AlreadyRunning
from glance_image_sync.state.runlock import RunLock
from glance_image_sync.sync.ordering import OrderedDispatcher


def test_jobs_of_one_key_run_in_order_and_never_at_once():
    dispatcher = OrderedDispatcher(max_workers=8)
    log, running, overlaps = [], set(), []
    lock = threading.Lock()
    done = threading.Event()
    total = 8 * 50

    def job(key, n):
        def run():
            with lock:
                if key in running:
                    overlaps.append(key)
                running.add(key)
            sum(range(20000))  # widen the window in which an overlap would show
            with lock:
                running.discard(key)
                log.append((key, n))
                if len(log) == total:
                    done.set()
        return run

    for n in range(50):
        for key in range(8):
            dispatcher.submit(key, job(key, n))
    assert done.wait(30)
    dispatcher.shutdown()
    assert overlaps == []
    for key in range(8):
        assert [n for k, n in log if k == key] == list(range(50))


def test_a_failing_job_does_not_stall_its_key():
    dispatcher = OrderedDispatcher(max_workers=2)
    ran = threading.Event()

    def boom():
        raise RuntimeError("bug")

    dispatcher.submit("image", boom)
    dispatcher.submit("image", ran.set)
    assert ran.wait(10)
    dispatcher.shutdown()


def test_a_log_handler_that_raises_does_not_stall_a_key(tmp_path):
    import logging.handlers

    directory = tmp_path / "logs"
    directory.mkdir()
    handler = logging.handlers.WatchedFileHandler(str(directory / "x.log"))
    directory.joinpath("x.log").unlink()
    directory.rmdir()  # as when a test's cluster directory is removed
    logger = logging.getLogger("glance_image_sync.dispatch")
    logger.addHandler(handler)
    try:
        dispatcher = OrderedDispatcher(max_workers=1)
        ran = threading.Event()
        dispatcher.submit("image", lambda: 1 / 0)
        dispatcher.submit("image", ran.set)
        assert ran.wait(10)
        dispatcher.shutdown()
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    with RunLock.in_dir(str(tmp_path)):
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
            RunLock.in_dir(str(tmp_path)).acquire()
    with RunLock.in_dir(str(tmp_path)):
        pass


def test_a_killed_holder_does_not_block_the_next_run(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from glance_image_sync.state.runlock import RunLock; "
         f"RunLock.in_dir({str(tmp_path)!r}).acquire(); print('held', flush=True); "
         "time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyRunning):
            RunLock.in_dir(str(tmp_path)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock.in_dir(str(tmp_path)):
        pass
