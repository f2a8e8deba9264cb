"""The connection loop's wake-up pipe, without a broker."""

import os
import threading

from glance_image_sync.broker.loop import ConnectionLoop


def test_a_wake_up_after_close_writes_into_no_file_that_took_the_pipes_number(tmp_path):
    loop = ConnectionLoop("test", component=None, broker_settings=None)
    numbers = {loop._wake_r, loop._wake_w}
    loop.close()
    # POSIX hands out the lowest free numbers: these files get the pipe's.
    files = [os.open(tmp_path / f"image-{n}", os.O_WRONLY | os.O_CREAT, 0o600) for n in range(2)]
    try:
        assert set(files) == numbers
        # A transfer that ends after the loop was closed hands its result back.
        worker = threading.Thread(target=loop.call_soon, args=(lambda: None,))
        worker.start()
        worker.join()
        loop.close()  # a second close is harmless too
    finally:
        for fd in files:
            os.close(fd)
    assert [(tmp_path / f"image-{n}").read_bytes() for n in range(2)] == [b"", b""]
