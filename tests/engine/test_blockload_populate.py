"""Restore faults each new buffer in with one madvise before reading into it
(engine/blockload.py `populate`, Linux's MADV_POPULATE_WRITE)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from permeant_tui.engine.blockload import populate


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb * 1024


def kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's (5.14+)")
def test_populate_faults_a_new_buffer_in_and_keeps_its_bytes():
    """Restore faults each new buffer's pages in with one madvise before reading into it: the
    process's resident memory grows by the buffer at once, and bytes already there stay."""
    assert not populate(0, 0)
    fresh_buffer = np.empty(64 << 20, dtype=np.uint8)  # untouched: not resident yet
    before = rss_bytes()
    done = populate(fresh_buffer.ctypes.data, fresh_buffer.nbytes)
    assert done == kernel_at_least(5, 14)
    if done:
        assert rss_bytes() - before > 60 << 20
    pattern = np.arange(1 << 20, dtype=np.uint32)
    assert populate(pattern.ctypes.data, pattern.nbytes) == done
    assert np.array_equal(pattern, np.arange(1 << 20, dtype=np.uint32))
