"""A `permeant serve` subprocess for the migration tests (tests/e2e/test_migrate*.py): started on a
free loopback port, its stdout collected, stopped at the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

PYTHON = sys.executable


class Server:
    """A `permeant serve` subprocess; its stdout is collected by a thread."""

    def __init__(self, workspace: Path, home: Path, ttl: float = 120.0, port: int = 0):
        self.ws, self.home, self.ttl = workspace, home, ttl
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.start(port)

    def env(self) -> dict:
        return {**os.environ, "PERMEANT_HOME": str(self.home / "home"),
                "PERMEANT_CACHE": str(self.home / "cache")}

    def start(self, port: int = 0) -> None:
        self.lines = []
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "permeant_tui.cli", "serve", "--workspace", str(self.ws),
             "--listen", f"127.0.0.1:{port}", "--staging-ttl", str(self.ttl)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env())
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        self.wait_for(r"\] ready$", 120)
        out = "\n".join(self.lines)
        self.port = int(re.search(r"listening on https://127\.0\.0\.1:(\d+)", out).group(1))
        self.fingerprint = re.search(r"--pin ([0-9a-f]{64})", out).group(1)

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(f"server exited {self.proc.returncode}:\n" + "\n".join(self.lines))
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in {timeout} s:\n" + "\n".join(self.lines))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def trusting_server(root: Path, public_key_text: str, ttl: float = 120.0) -> Server:
    """A target in root/ws that trusts `public_key_text` (a source workspace's key)."""
    from permeant_tui.engine.usxf.keys import WorkspaceKeys

    ws = root / "ws"
    keys = WorkspaceKeys(ws / "keys")
    keys.ensure()
    keys.trust(public_key_text)
    return Server(ws, root, ttl=ttl)


def send_raw(server: Server, method: str, path: str, headers: dict, body: bytes = b"") -> tuple[int, bytes]:
    from permeant_tui.migrate.tls import PinnedConnection

    conn = PinnedConnection("127.0.0.1", server.port, server.fingerprint, timeout=30)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()
