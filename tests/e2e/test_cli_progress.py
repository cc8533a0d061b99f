"""Long commands show progress on a terminal and nothing extra when piped (issue 15): export,
import, `usxf verify --fidelity` and doctor, each run twice, once with stderr on a
pseudo-terminal (rich draws its progress line there) and once with stderr piped (it must stay
empty). stdout carries the same report both times."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

TIMEOUT = 600


def env_for(home: Path) -> dict:
    env = dict(os.environ, PERMEANT_HOME=str(home), HF_HUB_OFFLINE="1")
    env.pop("PERMEANT_NO_PROGRESS", None)
    return env


def piped(args, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "permeant_tui.cli", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=env_for(home),
                          stdin=subprocess.DEVNULL)


def on_terminal(args, home: Path) -> tuple[int, str, str]:
    """Run with stderr on a pty (100x30) and stdout piped: (exit code, stdout, what the
    terminal received)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "permeant_tui.cli", *args],
                         stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                         env=env_for(home))
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            assert time.monotonic() < deadline, ("no exit within the time limit", args)
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not data:
                    break
                screen += data
            elif p.poll() is not None:
                break
        out = p.stdout.read().decode()
        p.wait(timeout=TIMEOUT)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
    return p.returncode, out, screen.decode(errors="replace")


def shows_progress(screen: str, *words: str) -> None:
    assert "\r" in screen and "\x1b[" in screen, repr(screen[-500:])  # a redrawn line
    assert "━" in screen or any(c in screen for c in "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"), repr(screen[-500:])
    for w in words:
        assert w in screen, (w, repr(screen[-800:]))
    assert "Traceback" not in screen


@pytest.fixture(scope="module")
def chatted(tmp_path_factory):
    home = tmp_path_factory.mktemp("progress") / "ws"
    r = piped(["chat", "technical", "Name one HTTP status code.", "--max-tokens", "6",
               "--temp", "0"], home)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # piped: nothing but the reply
    return home


def test_export_and_import(chatted, tmp_path):
    home = chatted
    r = piped(["export", "technical", "-o", str(tmp_path / "a.usxf")], home)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("exported technical -> ")
    code, out, screen = on_terminal(["export", "technical", "-o", str(tmp_path / "b.usxf")],
                                    home)
    assert code == 0, screen[-800:]
    assert out.startswith("exported technical -> ")
    shows_progress(screen, "loading model", "exporting technical")

    r = piped(["import", str(tmp_path / "a.usxf"), "--as", "copy1"], home)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "imported" in r.stdout
    code, out, screen = on_terminal(["import", str(tmp_path / "b.usxf"), "--as", "copy2"], home)
    assert code == 0, screen[-800:]
    assert "as agent 'copy2'" in out
    shows_progress(screen, "loading model")


def test_verify_fidelity(chatted, tmp_path):
    home = chatted
    f = tmp_path / "v.usxf"
    assert piped(["export", "technical", "-o", str(f)], home).returncode == 0
    r = piped(["usxf", "verify", str(f), "--fidelity"], home)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("ok: ") and "fidelity: exact" in r.stdout, r.stdout
    code, out, screen = on_terminal(["usxf", "verify", str(f), "--fidelity"], home)
    assert code == 0, screen[-800:]
    assert out == r.stdout
    shows_progress(screen, "fidelity")


def test_doctor(chatted):
    r = piped(["doctor"], chatted)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    code, out, screen = on_terminal(["doctor"], chatted)
    assert code == 0, screen[-800:]
    assert [ln.split()[0] for ln in out.splitlines()] == \
        [ln.split()[0] for ln in r.stdout.splitlines()]
    shows_progress(screen, "loading model")
