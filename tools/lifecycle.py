"""What the test harness's started things share: ``with`` starts them, and stops them
however the block ends, a start that failed half-way included."""

from __future__ import annotations


class Started:
    """A context manager for a class with ``start()`` (returning itself) and ``stop()``."""

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
