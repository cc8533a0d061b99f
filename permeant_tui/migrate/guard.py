"""What every request to the target passes before a handler runs, outermost first:

1. `BoundedHttpTools`: uvicorn's httptools protocol with the bounds uvicorn leaves out. httptools
   buffers an unfinished header by concatenation (a 96 MiB header stalled the event loop for
   seconds) and uvicorn's `h11_max_incomplete_event_size` does not apply to it. Here a request
   head (request line + headers) is limited in bytes and in fields, and must arrive within a
   deadline; over any of them the connection gets 431 or 408 and is closed.
2. `AuthMiddleware`: a declared body over the largest accepted size is refused (413) before
   authentication; then every request is authenticated before routing and before its body is
   read. Any authentication failure is the same bare 401: what failed is logged, never told.
3. `read_body` / `read_json` (called by the handlers): the body, bounded in size and time,
   hashing to the signed digest; JSON nested too deeply is a 400, not a RecursionError.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .protocol import EMPTY_SHA256, H_DIGEST, Limits
from .target import Target, say

LENGTH_RE = re.compile(r"[0-9]{1,15}")  # ASCII digits only: str.isdigit() takes "²"


def error_response(status: int, error: str, detail: str = "", **extra):
    from starlette.responses import JSONResponse

    body: dict = {"error": error}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status)


def json_bytes(status: int, obj: dict) -> tuple[bytes, bytes]:
    """(status line + headers, body) of a JSON response that closes the connection."""
    import http

    body = json.dumps(obj, separators=(",", ":")).encode()
    phrase = http.HTTPStatus(status).phrase
    head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head, body


# ---- 1. the request head -------------------------------------------------------------------------

class HeadRefused(Exception):
    def __init__(self, status: int, error: str):
        super().__init__(error)
        self.status, self.error = status, error


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a bounded request head. Bytes are counted as they
    arrive while a head is unfinished (so the parser's buffer stays within max_head_bytes plus
    one read), fields as they are parsed; the deadline runs from the connection (or the first
    byte of a request) to the end of its head. `bounded_protocol(limits)` sets the figures."""

    max_head_bytes = 16 << 10
    max_header_fields = 64
    head_timeout_s = 10.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._fields = 0
        self._in_head = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: HeadRefused | None = None  # answered: the connection is closing
        self._raised: HeadRefused | None = None  # raised from a parser callback

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # refused: the connection is closing
        super().data_received(data)
        if self._in_head and self._refusal is None:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(HeadRefused(431, "request-head-too-large"))

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._fields = True, 0, 0
        self._arm()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > self.max_header_fields:
            self._raised = HeadRefused(431, "too-many-header-fields")
            raise self._raised  # stops the parser at once; uvicorn calls send_400_response
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to any parser error, ours included (raised from a callback)."""
        if self._raised is not None:
            self._refuse(self._raised)
        else:
            super().send_400_response(msg)

    # bounds
    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        self._refuse(HeadRefused(408, "request-head-timeout"))

    def _refuse(self, why: HeadRefused) -> None:
        self._disarm()
        if self._refusal is not None or self.transport is None or self.transport.is_closing():
            return
        self._refusal = why
        client = self.client[0] if self.client else "?"
        say(f"refused a request from {client}: {why.error} ({self._head_bytes} bytes, "
            f"{self._fields} header fields)")
        head, body = json_bytes(why.status, {"error": why.error})
        self.transport.write(head + body)
        self.transport.close()


def bounded_protocol(limits: Limits) -> type[BoundedHttpTools]:
    """The protocol class for uvicorn.Config(http=...), with these limits."""
    return type("BoundedHttpTools", (BoundedHttpTools,), {
        "max_head_bytes": limits.max_request_head_bytes,
        "max_header_fields": limits.max_header_fields,
        "head_timeout_s": limits.request_head_timeout_s,
    })


# ---- 2. the body's declared size, authentication ---------------------------------------------------

class AuthMiddleware:
    """Every HTTP request is authenticated before routing and before its body is read."""

    def __init__(self, app, target: Target):
        self.app, self.target = app, target
        lim = target.limits
        self.max_body = max(lim.max_chunk_bytes, open_body_limit(lim))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for k, v in scope.get("headers", []):
            headers[k.decode("latin-1").lower()] = v.decode("latin-1")
        cl = headers.get("content-length")
        if "transfer-encoding" in headers:
            return await send_json(send, 411, {"error": "length-required"})
        if cl is not None and not (LENGTH_RE.fullmatch(cl) and int(cl) <= self.max_body):
            return await send_json(send, 413, {"error": "too-large"})
        kid, why = self.target.authenticate(scope, headers)
        if kid is None:
            client = scope.get("client") or ("?", 0)
            say(f"unauthorized {scope.get('method')} {scope.get('path')} from {client[0]}: {why}")
            return await send_json(send, 401, {"error": "unauthorized"})
        if scope["method"] in ("GET", "DELETE", "HEAD", "OPTIONS"):
            if (cl or "0") != "0" or headers.get(H_DIGEST) != EMPTY_SHA256:
                return await send_json(send, 400, {"error": "unexpected-body"})
        scope["permeant_key"] = kid
        return await self.app(scope, receive, send)


async def send_json(send, status: int, obj: dict) -> None:
    head, body = json_bytes(status, obj)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ---- 3. the body ------------------------------------------------------------------------------

class BodyError(Exception):
    """Raised by read_body/read_json; the app answers with its response."""

    def __init__(self, response):
        super().__init__(response.status_code)
        self.response = response


def open_body_limit(lim: Limits) -> int:
    """POST /migrations carries the USXF head as base64 in JSON."""
    return lim.max_head_bytes * 4 // 3 + lim.max_json_bytes


def body_digest_ok(request, digest: bytes) -> bool:
    return digest.hex() == request.headers.get(H_DIGEST)


async def read_body(request, limit: int, timeout: float, exact: int | None = None) -> bytes:
    """The whole body, bounded in size and time."""
    from starlette.requests import ClientDisconnect

    cl = request.headers.get("content-length")
    if request.headers.get("transfer-encoding") or cl is None:
        raise BodyError(error_response(411, "length-required"))
    if not LENGTH_RE.fullmatch(cl):
        raise BodyError(error_response(400, "bad-content-length"))
    n = int(cl)
    if n > limit:
        raise BodyError(error_response(413, "too-large", f"{n} bytes > {limit}"))
    if exact is not None and n != exact:
        raise BodyError(error_response(400, "bad-length", f"{n} bytes, expected {exact}"))
    buf = bytearray()

    async def collect():
        async for piece in request.stream():
            buf.extend(piece)
            if len(buf) > n:
                raise BodyError(error_response(400, "bad-length", "more bytes than Content-Length"))

    try:
        await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise BodyError(error_response(408, "timeout", "the body took too long")) from None
    except ClientDisconnect:
        raise BodyError(error_response(400, "disconnected")) from None
    if len(buf) != n:
        raise BodyError(error_response(400, "bad-length", "fewer bytes than Content-Length"))
    return bytes(buf)


async def read_json(request, limit: int, timeout: float) -> dict:
    """A JSON object body hashing to the signed digest."""
    data = await read_body(request, limit, timeout)
    if not body_digest_ok(request, hashlib.sha256(data).digest()):
        raise BodyError(error_response(400, "body-digest",
                                       "the body does not hash to the signed digest"))
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BodyError(error_response(400, "bad-json")) from None
    except RecursionError:
        raise BodyError(error_response(400, "bad-json", "nested too deeply")) from None
    if not isinstance(obj, dict):
        raise BodyError(error_response(400, "bad-json", "expected an object"))
    return obj
