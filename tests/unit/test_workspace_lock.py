"""One writer per workspace (issue 14 item 3): a second writer is refused naming the holder; the
lock dies with its holder, SIGKILL included; reading who holds it never blocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from permeant_tui.engine.errors import WorkspaceBusy
from permeant_tui.engine.lock import WorkspaceLock, holder

HOLD = ("import sys, time; from permeant_tui.engine.lock import WorkspaceLock; "
        "WorkspaceLock(sys.argv[1], 'test holder').acquire(); print('held', flush=True); "
        "time.sleep(120)")


def _hold(folder):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    p = _hold(tmp_path)
    try:
        with pytest.raises(WorkspaceBusy) as e:
            WorkspaceLock(tmp_path, "chat").acquire()
        msg = str(e.value)
        assert f"pid {p.pid}" in msg and "test holder" in msg and "\n" not in msg
        info = holder(tmp_path)
        assert info and info["pid"] == p.pid
    finally:
        p.kill()
        p.wait()


def test_lock_dies_with_a_killed_holder(tmp_path):
    p = _hold(tmp_path)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 10
    while holder(tmp_path) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    with WorkspaceLock(tmp_path, "after crash") as lock:
        assert lock.held
        assert holder(tmp_path) is None or holder(tmp_path)["pid"] == os.getpid()
    assert holder(tmp_path) is None


def test_same_process_reacquire_and_release(tmp_path):
    a = WorkspaceLock(tmp_path, "tui").acquire()
    assert a.acquire() is a  # idempotent
    with pytest.raises(WorkspaceBusy):  # a second handle in the same process is a second writer
        WorkspaceLock(tmp_path, "other").acquire()
    a.release()
    WorkspaceLock(tmp_path, "other").acquire().release()


def test_hostile_holder_text_is_not_echoed_raw(tmp_path):
    p = _hold(tmp_path)
    try:
        (tmp_path / ".lock").write_text('{"purpose": "\\u001b]0;evil\\u0007", "pid": 1}')
        with pytest.raises(WorkspaceBusy) as e:
            WorkspaceLock(tmp_path, "chat").acquire()
        assert "\x1b" not in str(e.value) and "\x07" not in str(e.value)
    finally:
        p.kill()
        p.wait()
