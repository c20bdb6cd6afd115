"""Fault injection shared by tests: a file object that fails midway as a full disk would."""

from __future__ import annotations


class HalfThenFull:
    """Wraps an open file: ``write`` writes half of the data, flushes it, then raises
    ENOSPC, as a full disk would."""

    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        raise OSError(28, "No space left on device")
