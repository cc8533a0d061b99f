"""The migration protocol's shared pieces: request signing, limits, errors, the cost model.

Every request carries five headers signed with the source workspace's Ed25519 key:

    X-Permeant-Key              key id (16 hex: SHA-256 of the raw public key, first 8 bytes)
    X-Permeant-Timestamp        unix seconds (integer)
    X-Permeant-Nonce            32 hex characters, never reused
    X-Permeant-Content-SHA256   hex SHA-256 of the request body (of b"" when there is none)
    X-Permeant-Signature        base64 Ed25519 signature of signing_message(...)

The signed message binds the method, the path, the timestamp, the nonce, the body digest and
the target's certificate fingerprint (so a request made for one target is worth nothing at
another). The server checks all of it *before* reading the body, then requires the body to
hash to the signed digest. See docs/MIGRATION.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from ..engine.errors import PermeantError

PROTOCOL = "permeant-migrate/1"
AUTH_DOMAIN = b"permeant.migrate.request.v1\x00"

H_KEY = "x-permeant-key"
H_TS = "x-permeant-timestamp"
H_NONCE = "x-permeant-nonce"
H_DIGEST = "x-permeant-content-sha256"
H_SIG = "x-permeant-signature"
AUTH_HEADERS = (H_KEY, H_TS, H_NONCE, H_DIGEST, H_SIG)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
NONCE_RE = re.compile(r"[0-9a-f]{32}")
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
MIGRATION_ID_RE = re.compile(r"[0-9a-f]{32}")

MODES = ("kv", "reprefill")


class MigrationError(PermeantError):
    """A migration could not go on; the source agent is intact (the message says so if not)."""

    exit_code = 7


class CertificateMismatch(MigrationError):
    """The target's TLS certificate is not the pinned one: nothing was sent."""


class Unauthorized(MigrationError):
    """The target refused this workspace's key (not trusted there, or a clock far off)."""


class RemoteRefused(MigrationError):
    """The target answered with an error status."""

    def __init__(self, status: int, error: str, detail: str = "", body: dict | None = None):
        self.status, self.error, self.detail, self.body = status, error, detail, body or {}
        super().__init__(f"target refused ({status} {error})" + (f": {detail}" if detail else ""))


def signing_message(method: str, path: str, timestamp: int | str, nonce: str,
                    body_sha256: str, target_fingerprint: str) -> bytes:
    fields = (method.upper(), path, str(timestamp), nonce, body_sha256, target_fingerprint)
    return AUTH_DOMAIN + "\n".join(fields).encode("utf-8")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, max_len: int) -> bytes | None:
    """Strict base64 with a length bound checked before decoding; None when invalid."""
    if not isinstance(text, str) or len(text) > (max_len + 2) // 3 * 4:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


# ---- certificate fingerprints -----------------------------------------------------------------

def normalize_fingerprint(text: str) -> str:
    """64 lowercase hex from 'SHA256:AB:CD:...', 'ab cd ...', 'abcd...' (any case)."""
    t = text.strip()
    if t.lower().startswith("sha256:"):
        t = t[7:]
    t = re.sub(r"[\s:]", "", t).lower()
    if not DIGEST_RE.fullmatch(t):
        raise MigrationError(f"not a SHA-256 certificate fingerprint: {text[:80]!r} (expected 64 "
                             "hex digits, colons allowed, as `permeant serve` prints it)")
    return t


def format_fingerprint(hex64: str) -> str:
    return "SHA256:" + ":".join(hex64[i:i + 2] for i in range(0, len(hex64), 2)).upper()


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'host:port', '[v6]:port', ':port' or 'port'."""
    t = text.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})", t) or re.fullmatch(r"([^:\s]*):(\d{1,5})", t)
    if m:
        host, port = m.group(1) or default_host, int(m.group(2))
    elif t.isdigit():
        host, port = default_host, int(t)
    else:
        raise MigrationError(f"expected HOST:PORT, got {text!r}")
    if not 0 <= port <= 65535:
        raise MigrationError(f"port {port} out of range")
    return host, port


# ---- limits ------------------------------------------------------------------------------------

MiB = 1 << 20


@dataclass
class Limits:
    """What a target accepts. Every number bounds memory, disk or time."""

    max_head_bytes: int = 32 * MiB  # header + manifest + signature + padding of one USXF file
    max_chunk_bytes: int = 16 * MiB  # one PUT body (= the file's chunk size)
    max_json_bytes: int = 64 << 10  # any other request body
    max_migrations: int = 4  # staged (not yet committed or expired) at once
    max_staged_bytes: int = 64 << 30  # sum of staged files
    disk_reserve_bytes: int = 256 * MiB  # free disk left after staging and importing
    memory_reserve_bytes: int = 256 * MiB  # free memory left after attaching
    ttl_s: float = 600.0  # a staged migration idle this long is removed
    clock_skew_s: float = 120.0  # timestamp window, each side
    max_nonces: int = 200_000  # remembered nonces (each lives 2 x clock_skew_s)
    body_timeout_s: float = 120.0  # to receive one request body
    max_request_head_bytes: int = 16 << 10  # request line + headers of one request
    max_header_fields: int = 64  # header fields of one request
    request_head_timeout_s: float = 10.0  # from connecting (or a request's first byte) to its
    #                                       last header

    def public(self) -> dict:
        return {"max_head_bytes": self.max_head_bytes, "max_chunk_bytes": self.max_chunk_bytes,
                "max_migrations": self.max_migrations, "ttl_s": self.ttl_s,
                "clock_skew_s": self.clock_skew_s}


# ---- ranges of chunk indices ---------------------------------------------------------------------

def to_ranges(flags) -> list[list[int]]:
    """[[start, end), ...] of the indices whose flag is set."""
    out: list[list[int]] = []
    start = None
    for i, f in enumerate(flags):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append([start, i])
            start = None
    if start is not None:
        out.append([start, len(flags)])
    return out


def from_ranges(ranges, n: int) -> list[bool]:
    flags = [False] * n
    for a, b in ranges:
        for i in range(max(0, int(a)), min(n, int(b))):
            flags[i] = True
    return flags


# ---- the cost model --------------------------------------------------------------------------------

DEFAULT_LINK_MB_S = 50.0  # assumed when this source has never measured the link to the target
VERIFY_PASSES = 3  # the target hashes the file at prepare, at import and when attaching it
QUANT_BYTES = {"none": None, "f16": 2.0, "bf16": 2.0, "int8": 1.0}


def kv_bytes_per_token(identity: dict, dtype_size: float) -> float:
    return 2.0 * identity["n_layers"] * identity["n_kv_heads"] * identity["head_dim"] * dtype_size


def dtype_size(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)


def estimate_size(identity: dict, n_tokens: int, quant: str) -> int:
    """USXF file size for n tokens: payload plus the manifest's per-token share (token ids, block
    hashes) and a fixed part (page-aligned head)."""
    per_value = QUANT_BYTES.get(quant) or dtype_size(identity.get("kv_dtype", "float32"))
    if quant == "int8":
        per_value += 4.0 / min(64, identity["head_dim"])
    payload = kv_bytes_per_token(identity, per_value) * n_tokens
    return int(payload + 5 * n_tokens + 8192)


@dataclass(frozen=True)
class Decision:
    mode: str  # "kv" or "reprefill"
    reason: str
    size_bytes: int
    link_mb_s: float
    link_measured: bool
    transfer_s: float
    verify_s: float
    migrate_s: float
    prefill_tok_s: float | None
    reprefill_s: float | None
    forced: bool = False

    def to_json(self) -> dict:
        return dict(self.__dict__)


def decide(n_tokens: int, size_bytes: int, caps: dict, link_mb_s: float | None,
           force: str | None = None) -> Decision:
    """Move the KV state, or let the target rebuild it by prefill, whichever the simple model
    says is faster: bytes / link MB/s + 3 x bytes / target verify MB/s against tokens / target
    prefill tok/s. `force` ("kv" or "reprefill") overrides."""
    measured = link_mb_s is not None
    link = link_mb_s if measured else DEFAULT_LINK_MB_S
    transfer = size_bytes / 1e6 / max(link, 1e-3)
    verify_rate = float(caps.get("verify_mb_s") or 500.0)
    verify = VERIFY_PASSES * size_bytes / 1e6 / max(verify_rate, 1e-3)
    migrate = transfer + verify
    rate = caps.get("prefill_tok_s")
    reprefill = n_tokens / rate if rate else None
    if force in MODES:
        return Decision(force, f"forced ({'--force' if force == 'kv' else '--reprefill'})",
                        size_bytes, link, measured, transfer, verify, migrate, rate, reprefill,
                        forced=True)
    if reprefill is None:
        mode, why = "kv", "the target reports no prefill rate"
    elif migrate <= reprefill:
        mode, why = "kv", f"moving the state is {reprefill / max(migrate, 1e-9):.1f}x faster"
    else:
        mode, why = "reprefill", f"re-prefill on the target is {migrate / max(reprefill, 1e-9):.1f}x faster"
    return Decision(mode, why, size_bytes, link, measured, transfer, verify, migrate, rate,
                    reprefill)
