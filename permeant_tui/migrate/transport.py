"""The source's connection to a target: signed requests (protocol.py) over one pinned TLS
connection (tls.py), re-made after a failure. Used by source.py; tests drive it directly."""

from __future__ import annotations

import hashlib
import http.client
import json
import secrets
import time

from .protocol import (
    H_DIGEST,
    H_KEY,
    H_NONCE,
    H_SIG,
    H_TS,
    MigrationError,
    RemoteRefused,
    Unauthorized,
    b64,
    signing_message,
)
from .tls import PinnedConnection


class TransportError(MigrationError):
    """The connection failed (refused, reset, timed out): worth a retry."""


class MigrationClient:
    """Signed requests to one target over one pinned TLS connection (re-made after a failure)."""

    def __init__(self, host: str, port: int, pin: str, keys, timeout: float = 60.0):
        self.host, self.port, self.pin, self.keys, self.timeout = host, port, pin, keys, timeout
        self._conn: PinnedConnection | None = None
        self.cut_chunks: set[int] = set()  # tests: cut the connection mid-body, once per index
        self.requests = 0
        self.chunk_puts: list[int] = []

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> PinnedConnection:
        if self._conn is None:
            self._conn = PinnedConnection(self.host, self.port, self.pin, self.timeout)
        return self._conn

    def sign_headers(self, method: str, path: str, body: bytes,
                     now: float | None = None) -> dict[str, str]:
        digest = hashlib.sha256(body).hexdigest()
        ts, nonce = str(int(time.time() if now is None else now)), secrets.token_hex(16)
        sig = self.keys.sign(signing_message(method, path, ts, nonce, digest, self.pin))
        return {H_KEY: self.keys.key_id, H_TS: ts, H_NONCE: nonce, H_DIGEST: digest,
                H_SIG: b64(sig)}

    def raw(self, method: str, path: str, body: bytes = b"", *, timeout: float | None = None,
            content_type: str = "application/octet-stream") -> tuple[int, dict]:
        headers = self.sign_headers(method, path, body)
        if body:
            headers["Content-Type"] = content_type
        conn = self._connection()
        self.requests += 1
        try:
            if conn.sock is None:
                conn.connect()  # the pin is checked here, before any request byte
            conn.sock.settimeout(timeout or self.timeout)
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except MigrationError:
            self.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TransportError(f"{method} {path}: connection to {self.host}:{self.port} "
                                 f"failed ({type(exc).__name__}: {exc})") from None
        if (resp.getheader("connection") or "").lower() == "close":
            self.close()
        try:
            obj = json.loads(data) if data else {}
            if not isinstance(obj, dict):
                obj = {"error": "bad-response"}
        except ValueError:
            obj = {"error": "bad-response", "detail": data[:200].decode("latin-1")}
        return resp.status, obj

    def call(self, method: str, path: str, body: bytes = b"", ok=(200, 201), **kw) -> dict:
        status, obj = self.raw(method, path, body, **kw)
        if status == 401:
            raise Unauthorized(
                f"{self.host}:{self.port} does not accept this workspace's key "
                f"{self.keys.key_id} (or this clock is off by minutes). On the target run: "
                f"permeant keys trust {self.keys.public_key_text}")
        if status not in ok:
            raise RemoteRefused(status, str(obj.get("error", "error")), str(obj.get("detail", "")),
                                obj)
        return obj

    # ---- the stages ----
    def capabilities(self) -> dict:
        return self.call("GET", "/capabilities")

    def open(self, request: dict) -> dict:
        return self.call("POST", "/migrations", json.dumps(request).encode(),
                         content_type="application/json", timeout=max(self.timeout, 120))

    def status(self, mid: str) -> dict:
        return self.call("GET", f"/migrations/{mid}")

    def put_chunk(self, mid: str, n: int, data: bytes) -> dict:
        self.chunk_puts.append(n)
        path = f"/migrations/{mid}/chunks/{n}"
        if n in self.cut_chunks:
            self.cut_chunks.discard(n)
            self._cut(path, data)
        return self.call("PUT", path, data)

    def _cut(self, path: str, data: bytes) -> None:
        """Send the headers and half the body, then drop the connection (a network cut)."""
        conn = self._connection()
        if conn.sock is None:
            conn.connect()
        conn.putrequest("PUT", path, skip_accept_encoding=True)
        for k, v in {**self.sign_headers("PUT", path, data),
                     "Content-Length": str(len(data))}.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(data[:len(data) // 2])
        self.close()
        raise TransportError(f"PUT {path}: connection cut mid-body (test)")

    def prepare(self, mid: str) -> dict:
        return self.call("POST", f"/migrations/{mid}/prepare", timeout=max(self.timeout, 600))

    def commit(self, mid: str) -> dict:
        return self.call("POST", f"/migrations/{mid}/commit", timeout=max(self.timeout, 600))

    def abort(self, mid: str) -> dict:
        return self.call("DELETE", f"/migrations/{mid}")
