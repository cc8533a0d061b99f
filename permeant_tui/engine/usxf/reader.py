"""Reading and verifying USXF files: whole-file (read_usxf), bounded-memory (verify_usxf), and a
streaming verifier fed bytes as they arrive (StreamVerifier). docs/USXF.md section 8.

Every failure is a UsxfInvalid with a check name; no other exception leaves this module for any
input bytes. Lengths are checked against limits (and the file size) before anything is allocated,
and the manifest is not decoded before its signature verifies.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsxfInvalid
from ..identity import ModelIdentity
from . import layout, quant
from .header import Header, check_magic, check_signature, check_size, parse_header
from .keys import TrustedKeys, public_key_text, trusted_raw_keys
from .manifest import Parsed, decode_manifest, parse_manifest
from .spec import (
    CHECK_BOUNDS,
    CHECK_CHUNK,
    CHECK_DIGEST,
    CHECK_IO,
    CHECK_MALFORMED,
    CHECK_PADDING,
    CHECK_TRAILING,
    CHECK_TRUNCATED,
    HEADER_SIZE,
    TENSOR_ALIGN,
    AgentRecord,
    Fidelity,
    KVPayload,
)

READ_SIZE = 4 << 20


@dataclass(frozen=True)
class UsxfFile:
    """A verified USXF file (or a just-written one). `load_kv()` returns the KV in the source dtype."""

    path: Path | None
    size: int
    digest: str  # payload digest, hex
    key_id: str
    public_key: bytes = field(repr=False)
    signer_trusted: bool  # False when read with trusted=None (signature checked, trust not)
    manifest: dict = field(repr=False)
    identity: ModelIdentity = field(repr=False)
    token_ids: list[int] = field(repr=False)
    agent: AgentRecord = field(repr=False)
    fidelity: Fidelity | None = field(repr=False)
    quant: str = "none"
    _parsed: Parsed | None = field(default=None, repr=False, compare=False)
    _payload: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def public_key_text(self) -> str:
        return public_key_text(self.public_key)

    def load_kv(self) -> KVPayload:
        """The KV tensors, dequantized to the source dtype. Only verified bytes are used: a result
        without its payload in memory re-reads the file with every check and the same digest."""
        if self._payload is None or self._parsed is None:
            if self.path is None:
                raise UsxfInvalid(CHECK_IO, "this result holds no payload: verify the stream "
                                            "with keep_payload=True, or read the file with read_usxf")
            trust = {self.key_id: self.public_key} if self.signer_trusted else None
            again = read_usxf(self.path, trusted=trust, expected_identity=self.identity)
            if again.digest != self.digest:
                raise UsxfInvalid(CHECK_DIGEST, "the file changed since it was verified", str(self.path))
            return again.load_kv()
        p = self._parsed
        buf = self._payload
        keys: list[np.ndarray] = []
        values: list[np.ndarray] = []
        for t in p.tensors:
            if t.kivi is not None:
                arr = quant.from_float32(quant.kivi.load(buf, t.offset, t.shape, t.kind, t.kivi),
                                         p.source_dtype)
                (keys if t.kind == "k" else values).append(arr)
                continue
            data = np.frombuffer(buf, quant.numpy_dtype(t.dtype), math.prod(t.shape), t.offset)
            data = data.reshape(t.shape)
            scales = None
            if t.scales_shape is not None:
                scales = np.frombuffer(buf, "<f4", math.prod(t.scales_shape), t.scales_offset)
                scales = scales.reshape(t.scales_shape)
            arr = quant.decode(data, scales, p.source_dtype, p.quant, p.group_size)
            (keys if t.kind == "k" else values).append(arr)
        return KVPayload(keys=keys, values=values, dtype=p.source_dtype)


# ---------------------------------------------------------------- the three readers


@contextmanager
def _guard(path: str | None) -> Iterator[None]:
    """The contract: UsxfInvalid or nothing. Unexpected exceptions become check `malformed`."""
    try:
        yield
    except UsxfInvalid:
        raise
    except OSError as e:
        raise UsxfInvalid(CHECK_IO, f"cannot read: {e.strerror or e}", path) from None
    except MemoryError:
        raise UsxfInvalid(CHECK_BOUNDS, "not enough memory to hold this file", path) from None
    except Exception as e:
        detail = " ".join(f"unexpected {type(e).__name__}: {e}".split())[:300]
        raise UsxfInvalid(CHECK_MALFORMED, detail, path) from e


def _read_prefix(f, size: int, trusted: dict[str, bytes] | None, expected_identity: ModelIdentity | None,
                 path: str) -> tuple[Header, Parsed, str, bytes, bool]:
    header = parse_header(f.read(HEADER_SIZE), path)
    check_size(header, size, path)
    prefix = f.read(header.payload_offset - HEADER_SIZE)
    if len(prefix) != header.payload_offset - HEADER_SIZE:
        raise UsxfInvalid(CHECK_TRUNCATED, "the file ended early (it changed while being read)", path)
    manifest_bytes = prefix[:header.manifest_len]
    sig_block = prefix[header.manifest_len:header.prefix_len]
    kid, pub, is_trusted = check_signature(header, manifest_bytes, sig_block, trusted, path)
    parsed = parse_manifest(decode_manifest(manifest_bytes, path), header, kid, path, expected_identity)
    if prefix[header.prefix_len:].count(0) != len(prefix) - header.prefix_len:
        raise UsxfInvalid(CHECK_PADDING, "non-zero bytes between the signature and the payload", path)
    return header, parsed, kid, pub, is_trusted


def _compare_chunks(parsed: Parsed, header: Header, digests, path: str | None) -> str:
    """Check chunk digests in order as they come (an iterator), then the payload digest."""
    got = []
    for i, d in enumerate(digests):
        if d != parsed.chunk_digests[i]:
            a = i * header.chunk_size
            b = min(a + header.chunk_size, header.payload_len)
            raise UsxfInvalid(CHECK_CHUNK, f"chunk {i} (payload bytes {a}..{b}) is corrupt", path)
        got.append(d)
    digest = layout.payload_digest(header.payload_len, header.chunk_size, got)
    if digest != parsed.digest:
        raise UsxfInvalid(CHECK_DIGEST, "the whole-payload digest does not match", path)
    return digest.hex()


def _result(path: Path | None, header: Header, parsed: Parsed, kid: str, pub: bytes, is_trusted: bool,
            digest_hex: str, payload: np.ndarray | None) -> UsxfFile:
    return UsxfFile(
        path=path, size=header.total_size, digest=digest_hex, key_id=kid, public_key=pub,
        signer_trusted=is_trusted, manifest=parsed.manifest, identity=parsed.identity,
        token_ids=parsed.token_ids.tolist(), agent=parsed.agent, fidelity=parsed.fidelity,
        quant=parsed.quant, _parsed=parsed, _payload=payload,
    )


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def read_usxf(path: str | os.PathLike, *, trusted: TrustedKeys,
              expected_identity: ModelIdentity | None = None) -> UsxfFile:
    """Verify everything and keep the payload (one aligned buffer) for load_kv().

    `trusted`: WorkspaceKeys, public keys (or a key-id mapping of them), or None. With None the
    signature is still verified but against the key embedded in the file, so the result proves
    integrity, not origin (result.signer_trusted is False)."""
    spath = str(path)
    trusted_raw = trusted_raw_keys(trusted)
    with _guard(spath), open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        header, parsed, kid, pub, is_trusted = _read_prefix(f, size, trusted_raw, expected_identity, spath)
        length = header.payload_len
        if length > _physical_memory():
            raise UsxfInvalid(CHECK_BOUNDS, f"a {length >> 20} MiB payload does not fit in this "
                                            f"machine's memory; use verify_usxf", spath)
        raw = np.empty(length + TENSOR_ALIGN, np.uint8)
        start = (-raw.ctypes.data) % TENSOR_ALIGN
        buf = raw[start:start + length]
        mv = memoryview(buf)
        with ThreadPoolExecutor(layout.HASH_THREADS) as pool:
            futures = []
            for a, b in layout.chunk_ranges(length, header.chunk_size):
                pos = a
                while pos < b:
                    got = f.readinto(mv[pos:b])
                    if not got:
                        raise UsxfInvalid(CHECK_TRUNCATED, "the file ended early (it changed while "
                                                           "being read)", spath)
                    pos += got
                futures.append(pool.submit(layout.chunk_digest, mv[a:b]))
            digest_hex = _compare_chunks(parsed, header, (fu.result() for fu in futures), spath)
        return _result(Path(path), header, parsed, kid, pub, is_trusted, digest_hex, buf)


def verify_usxf(path: str | os.PathLike, trusted: TrustedKeys, *,
                expected_identity: ModelIdentity | None = None) -> UsxfFile:
    """The same checks as read_usxf in bounded memory; no tensor is materialised."""
    spath = str(path)
    trusted_raw = trusted_raw_keys(trusted)
    with _guard(spath), open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        header, parsed, kid, pub, is_trusted = _read_prefix(f, size, trusted_raw, expected_identity, spath)
        fd = f.fileno()
        base = header.payload_offset

        def digest_of(r: tuple[int, int]) -> bytes:
            h = hashlib.sha256()
            pos = r[0]
            while pos < r[1]:
                data = os.pread(fd, min(READ_SIZE, r[1] - pos), base + pos)
                if not data:
                    raise UsxfInvalid(CHECK_TRUNCATED, "the file ended early (it changed while "
                                                       "being read)", spath)
                h.update(data)
                pos += len(data)
            return h.digest()

        with ThreadPoolExecutor(layout.HASH_THREADS) as pool:
            digests = pool.map(digest_of, layout.chunk_ranges(header.payload_len, header.chunk_size))
            digest_hex = _compare_chunks(parsed, header, digests, spath)
        return _result(Path(path), header, parsed, kid, pub, is_trusted, digest_hex, None)


class StreamVerifier:
    """Verify a USXF file from bytes fed as they arrive (a network upload, a pipe).

    feed() raises UsxfInvalid as soon as the bytes seen so far are known bad: the header at 64
    bytes, signature and manifest when the signature block completes, padding as it arrives,
    each payload chunk the moment its last byte arrives, trailing bytes at once. finish()
    requires the end of the file and checks the payload digest. After a failure every call
    raises the same error."""

    def __init__(self, trusted: TrustedKeys, *, expected_identity: ModelIdentity | None = None,
                 keep_payload: bool = False, name: str | None = None):
        self._trusted = trusted_raw_keys(trusted)
        self._expected = expected_identity
        self._keep = keep_payload
        self._name = name
        self._stage = "header"
        self._buf = bytearray()
        self._error: UsxfInvalid | None = None
        self._result: UsxfFile | None = None
        self.received = 0
        self.chunks_verified = 0
        self.header: Header | None = None
        self._parsed: Parsed | None = None
        self._payload: np.ndarray | None = None
        self._pos = 0  # bytes of the current stage consumed
        self._hasher = hashlib.sha256()
        self._digests: list[bytes] = []
        self._kid, self._pub, self._is_trusted = "", b"", False

    @property
    def expected_size(self) -> int | None:
        return self.header.total_size if self.header else None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        try:
            with _guard(self._name):
                self._feed(memoryview(data).cast("B"))
        except UsxfInvalid as e:
            self._error = e
            raise

    def finish(self) -> UsxfFile:
        if self._error is not None:
            raise self._error
        if self._result is not None:
            return self._result
        try:
            with _guard(self._name):
                if self._stage != "done":
                    total = self.expected_size
                    of = f" of the {total} declared" if total is not None else ""
                    raise UsxfInvalid(CHECK_TRUNCATED, f"the stream ended after {self.received} "
                                                       f"bytes{of}", self._name)
                h, p = self.header, self._parsed
                assert h is not None and p is not None
                digest_hex = _compare_chunks(p, h, iter(self._digests), self._name)
                self._result = _result(None, h, p, self._kid, self._pub, self._is_trusted,
                                       digest_hex, self._payload)
        except UsxfInvalid as e:
            self._error = e
            raise
        return self._result

    def _feed(self, mv: memoryview) -> None:
        self.received += len(mv)
        while len(mv):
            if self._stage == "header":
                take = min(HEADER_SIZE - len(self._buf), len(mv))
                self._buf += mv[:take]
                mv = mv[take:]
                if len(self._buf) < HEADER_SIZE:
                    check_magic(bytes(self._buf), self._name)  # refuse a non-USXF stream early
                    continue
                self.header = parse_header(bytes(self._buf), self._name)
                self._buf = bytearray()
                self._stage = "prefix"
            elif self._stage == "prefix":
                h = self.header
                assert h is not None
                take = min(h.prefix_len - len(self._buf), len(mv))
                self._buf += mv[:take]
                mv = mv[take:]
                if len(self._buf) < h.prefix_len:
                    continue
                manifest_bytes = bytes(self._buf[:h.manifest_len])
                sig_block = bytes(self._buf[h.manifest_len:])
                self._buf = bytearray()
                self._kid, self._pub, self._is_trusted = check_signature(
                    h, manifest_bytes, sig_block, self._trusted, self._name)
                self._parsed = parse_manifest(decode_manifest(manifest_bytes, self._name), h,
                                              self._kid, self._name, self._expected)
                if self._keep:
                    self._payload = np.empty(h.payload_len, np.uint8)
                self._stage, self._pos = "padding", 0
                self._advance_if_empty()
            elif self._stage == "padding":
                h = self.header
                assert h is not None
                pad = h.payload_offset - HEADER_SIZE - h.prefix_len
                take = min(pad - self._pos, len(mv))
                if bytes(mv[:take]).count(0) != take:
                    raise UsxfInvalid(CHECK_PADDING, "non-zero bytes between the signature and "
                                                     "the payload", self._name)
                mv = mv[take:]
                self._pos += take
                self._advance_if_empty()
            elif self._stage == "payload":
                h, p = self.header, self._parsed
                assert h is not None and p is not None
                i = len(self._digests)
                chunk_end = min((i + 1) * h.chunk_size, h.payload_len)
                take = min(chunk_end - self._pos, len(mv))
                piece = mv[:take]
                self._hasher.update(piece)
                if self._payload is not None:
                    self._payload[self._pos:self._pos + take] = piece
                mv = mv[take:]
                self._pos += take
                if self._pos == chunk_end:
                    d = self._hasher.digest()
                    self._hasher = hashlib.sha256()
                    if d != p.chunk_digests[i]:
                        raise UsxfInvalid(CHECK_CHUNK, f"chunk {i} (payload bytes "
                                                       f"{i * h.chunk_size}..{chunk_end}) is corrupt",
                                          self._name)
                    self._digests.append(d)
                    self.chunks_verified += 1
                    if self._pos == h.payload_len:
                        self._stage = "done"
            else:
                raise UsxfInvalid(CHECK_TRAILING, f"{len(mv)} bytes after the payload's end", self._name)

    def _advance_if_empty(self) -> None:
        h = self.header
        assert h is not None
        if self._stage == "padding" and self._pos == h.payload_offset - HEADER_SIZE - h.prefix_len:
            self._stage, self._pos = "payload", 0
        if self._stage == "payload" and h.payload_len == 0:
            self._stage = "done"
