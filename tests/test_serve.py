"""``glance-image-sync serve``: a peer's forced command, streaming a copy as it arrives."""

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import threading
import time

import pytest

from glance_image_sync.store.owner import Owner
from glance_image_sync.transfer import serve

IMAGE = "0b7ef4d4-4b3a-4d3e-9a0e-6c1f7f3a2b10"
SIZE = 3 * 1024 * 1024
DATA = os.urandom(SIZE)


def command(store, *request, forced=None, kibps=0, wait=5, stall=5):
    """``serve`` as a forced command (``forced``: SSH_ORIGINAL_COMMAND) or run directly."""
    env = {"PATH": os.environ["PATH"]}
    argv = [sys.executable, "-m", "glance_image_sync", "serve", "--store", str(store)]
    if forced is not None:
        env["SSH_ORIGINAL_COMMAND"] = forced
    else:
        argv += request or ["stream", IMAGE, str(SIZE), str(wait), str(stall), str(kibps)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


class InProcess:
    """``serve``'s stream request answered in a thread of this process, as a Popen-alike.

    The same behaviour as the command, where coverage can see it: the command
    runs in a process of its own.
    """

    def __init__(self, store, *request, kibps=0, wait=5, stall=5):
        words = request or ("stream", IMAGE, str(SIZE), str(wait), str(stall), str(kibps))
        read_fd, self._write_fd = os.pipe()
        self.stdout = os.fdopen(read_fd, "rb")
        self.returncode = None
        self._err = io.StringIO()
        self._thread = threading.Thread(target=self._run, args=(str(store), list(words)),
                                        daemon=True)
        self._thread.start()

    def _run(self, store, request):
        try:
            with contextlib.redirect_stderr(self._err):
                self.returncode = serve.stream(store, request, out_fd=self._write_fd)
        finally:
            os.close(self._write_fd)

    def wait(self, timeout):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired("serve stream", timeout)
        return self.returncode

    def communicate(self, timeout):
        out = self.stdout.read()  # to the end: the writing side closes when run() returns
        self.wait(timeout)
        self.stdout.close()
        return out, self._err.getvalue().encode()


@pytest.fixture(params=["command", "in_process"])
def start(request):
    """Starts a stream request: as the command, and in this process."""
    return command if request.param == "command" else InProcess


class Writer:
    """A transfer into the store, as ImageStore.install makes one: an owned temporary."""

    def __init__(self, store):
        self.store = store
        self.dir_fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
        self.owner = Owner(self.dir_fd)
        self.owner.hold()
        self.name = self.owner.temp_name(IMAGE)
        self.file = open(store / self.name, "wb", buffering=0)  # noqa: SIM115

    def write(self, data):
        self.file.write(data)

    def install(self, mode=0o640):
        os.chmod(self.store / self.name, mode)
        os.rename(self.store / self.name, self.store / IMAGE)

    def abandon(self):
        os.unlink(self.store / self.name)

    def close(self):
        self.file.close()
        self.owner.release()
        os.close(self.dir_fd)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "images"
    path.mkdir()
    return path


def test_an_installed_image_is_streamed_whole_and_its_mode_named(store, start):
    (store / IMAGE).write_bytes(DATA)
    os.chmod(store / IMAGE, 0o644)
    out, err = start(store).communicate(timeout=30)
    assert out == DATA
    assert f"{serve.MODE_PREFIX}0644" in err.decode()


def test_a_copy_still_arriving_is_followed_and_ends_once_it_is_installed(store, start):
    writer = Writer(store)
    try:
        writer.write(DATA[:SIZE // 3])
        proc = start(store)
        first = proc.stdout.read(SIZE // 3)
        assert first == DATA[:SIZE // 3]  # sent before the rest exists
        writer.write(DATA[SIZE // 3:])
        with pytest.raises(subprocess.TimeoutExpired):  # all sent, but not verified yet
            proc.wait(timeout=0.3)
        writer.install(0o640)
        out, err = proc.communicate(timeout=30)
    finally:
        writer.close()
    assert first + out == DATA
    assert proc.returncode == serve.OK
    assert f"{serve.MODE_PREFIX}0640" in err.decode()


def test_a_copy_abandoned_for_a_newer_one_goes_on_from_the_same_offset(store, start):
    old, new = Writer(store), Writer(store)
    try:
        old.write(DATA[:SIZE // 2])
        proc = start(store)
        assert proc.stdout.read(SIZE // 2) == DATA[:SIZE // 2]
        new.write(DATA[:SIZE // 4])
        old.abandon()  # e.g. its source died; the same writer started again elsewhere
        new.write(DATA[SIZE // 4:])
        new.install()
        rest, _ = proc.communicate(timeout=30)
    finally:
        old.close()
        new.close()
    assert proc.returncode == serve.OK
    assert rest == DATA[SIZE // 2:]


def test_a_copy_that_fails_verification_ends_the_stream_without_success(store, start):
    writer = Writer(store)
    try:
        writer.write(DATA)
        proc = start(store)
        assert proc.stdout.read(SIZE) == DATA
        writer.abandon()  # what ImageStore does with a copy whose md5 is wrong
        _, err = proc.communicate(timeout=30)
    finally:
        writer.close()
    assert proc.returncode == serve.ABANDONED
    assert "abandoned" in err.decode()


def test_a_copy_whose_writer_died_is_abandoned(store, start):
    writer = Writer(store)
    writer.write(DATA[:1000])
    proc = start(store)
    assert proc.stdout.read(1000) == DATA[:1000]
    writer.file.close()
    writer.owner.release()  # the flock goes as a killed process's would; the file stays
    (store / writer.name).write_bytes(DATA[:1000])  # left behind, as by a killed writer
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == serve.ABANDONED, err


def test_no_copy_within_the_wait_and_a_stalled_copy_each_have_their_status(store, start):
    proc = start(store, wait=0)
    assert proc.communicate(timeout=30)[0] == b""
    assert proc.returncode == serve.NOT_HERE
    writer = Writer(store)
    try:
        writer.write(DATA[:10])
        proc = start(store, stall=1)
        _, err = proc.communicate(timeout=30)
    finally:
        writer.close()
    assert proc.returncode == serve.STALLED, err


def test_an_installed_copy_of_another_size_is_no_copy(store, start):
    (store / IMAGE).write_bytes(DATA[:100])
    proc = start(store)
    proc.communicate(timeout=30)
    assert proc.returncode == serve.NOT_HERE


def test_a_forced_stream_request_serves_only_this_store(store, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / IMAGE).write_bytes(DATA)
    (store / IMAGE).write_bytes(DATA[::-1])
    proc = command(store, forced=f"glance-image-sync serve --store {elsewhere} stream {IMAGE} "
                 f"{SIZE} 0 5 0")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == serve.OK
    assert out == DATA[::-1]  # the key's --store, not the requested one


def test_the_forced_request_is_read_by_main_in_process(store, tmp_path, monkeypatch,
                                                       capfdbinary):
    # As the test above, through main() in this process (its stdout is pytest's capture).
    (store / IMAGE).write_bytes(DATA)
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", f"/usr/bin/glance-image-sync serve --store "
                       f"{tmp_path} stream {IMAGE} {SIZE} 0 5 0")
    assert serve.main(["--store", str(store)]) == serve.OK
    captured = capfdbinary.readouterr()
    assert captured.out == DATA
    assert serve.MODE_PREFIX.encode() in captured.err


BAD_REQUESTS = [
    ["stream", "../../etc/passwd", "10", "0", "5", "0"],
    ["stream", IMAGE, "-1", "0", "5", "0"],
    ["stream", IMAGE, "10", "9999", "5", "0"],
    ["stream", IMAGE, "ten", "0", "5", "0"],
    ["stream", IMAGE],
    ["unlink", IMAGE],
]


@pytest.mark.parametrize("request_words", BAD_REQUESTS)
def test_a_bad_request_gets_one_line_and_the_usage_status(store, request_words):
    proc = command(store, *request_words)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == serve.USAGE
    assert out == b""
    assert len(err.decode().strip().splitlines()) == 1
    assert "Traceback" not in err.decode()


@pytest.mark.parametrize("request_words", BAD_REQUESTS)
def test_a_bad_request_in_process_gets_the_usage_status(store, request_words, capfd):
    assert serve.main(["--store", str(store), *request_words]) == serve.USAGE
    captured = capfd.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1


def test_any_other_forced_request_is_rrsync_read_only(store):
    (store / IMAGE).write_bytes(DATA)
    # What an rsync that tries to write into the store sends.
    proc = command(store, forced=f"rsync --server -logDtpre.iLsfxCIvu . {IMAGE}")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "read-only" in err.decode()
    assert hashlib.md5((store / IMAGE).read_bytes()).hexdigest() == \
        hashlib.md5(DATA).hexdigest()


def test_a_paced_stream_sends_no_faster_than_asked(store, start):
    (store / IMAGE).write_bytes(DATA[:512 * 1024])
    started = time.monotonic()
    proc = start(store, "stream", IMAGE, str(512 * 1024), "0", "5", "1024")
    out, _ = proc.communicate(timeout=30)
    assert out == DATA[:512 * 1024]
    # 512 KiB at 1024 KiB/s: at least about half a second, however fast the machine.
    assert time.monotonic() - started >= 0.45
