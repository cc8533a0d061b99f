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
from dataclasses import dataclass, field, fields
from pathlib import Path

import msgpack
import numpy as np
import xxhash

from ..errors import UsxfInvalid
from ..identity import ModelIdentity
from . import layout, quant
from .keys import TrustedKeys, key_id_of, public_key_text, trusted_raw_keys, verify_ed25519
from .spec import (
    BLOCK_HASH_NAME,
    CHECK_AGENT,
    CHECK_BLOCKS,
    CHECK_BOUNDS,
    CHECK_CHUNK,
    CHECK_DIGEST,
    CHECK_FIDELITY,
    CHECK_HEADER,
    CHECK_IDENTITY,
    CHECK_IO,
    CHECK_LAYOUT,
    CHECK_MAGIC,
    CHECK_MALFORMED,
    CHECK_MANIFEST,
    CHECK_PADDING,
    CHECK_SIGNATURE,
    CHECK_TOKENS,
    CHECK_TRAILING,
    CHECK_TRUNCATED,
    CHECK_VERSION,
    CHUNK_HASH_NAME,
    DIGEST_NAME,
    ED25519_PUBLIC_LEN,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_BLOCK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_MANIFEST,
    MAX_PAYLOAD,
    MAX_TOKENS,
    MIN_BLOCK_SIZE,
    MIN_CHUNK_SIZE,
    PAYLOAD_ALIGN,
    QUANTS,
    ROPE_LAYOUTS,
    SIG_ALG_ED25519,
    SIG_LEN_ED25519,
    SIGNATURE_DOMAIN,
    SOURCE_DTYPES,
    STORED_DTYPES,
    TENSOR_ALIGN,
    VERSION_MAJOR,
    AgentRecord,
    Fidelity,
    KVPayload,
    UsxfUntrustedKey,
    payload_offset_for,
)

READ_SIZE = 4 << 20


@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    sig_alg: int
    flags: int
    manifest_len: int
    sig_len: int
    chunk_size: int
    payload_offset: int
    payload_len: int
    manifest_xxh3: int
    header_xxh3: int
    raw: bytes = field(repr=False)

    @property
    def prefix_len(self) -> int:
        """Bytes from the end of the header to the end of the signature block."""
        return self.manifest_len + self.sig_len

    @property
    def total_size(self) -> int:
        return self.payload_offset + self.payload_len

    @property
    def n_chunks(self) -> int:
        return -(-self.payload_len // self.chunk_size)


@dataclass(frozen=True)
class TensorEntry:
    layer: int
    kind: str
    shape: tuple[int, int, int]
    dtype: str
    offset: int
    nbytes: int
    scales_shape: tuple[int, ...] | None
    scales_offset: int
    scales_nbytes: int


@dataclass(frozen=True)
class Parsed:
    """A manifest that passed every check that does not need the payload bytes."""

    manifest: dict
    identity: ModelIdentity
    token_ids: np.ndarray
    agent: AgentRecord
    fidelity: Fidelity | None
    source_dtype: str
    quant: str
    group_size: int
    tensors: list[TensorEntry]
    chunk_digests: list[bytes]
    digest: bytes


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
            data = np.frombuffer(buf, quant.numpy_dtype(t.dtype), math.prod(t.shape), t.offset)
            data = data.reshape(t.shape)
            scales = None
            if t.scales_shape is not None:
                scales = np.frombuffer(buf, "<f4", math.prod(t.scales_shape), t.scales_offset)
                scales = scales.reshape(t.scales_shape)
            arr = quant.decode(data, scales, p.source_dtype, p.quant, p.group_size)
            (keys if t.kind == "k" else values).append(arr)
        return KVPayload(keys=keys, values=values, dtype=p.source_dtype)


# ---------------------------------------------------------------- header


def check_magic(raw: bytes, path: str | None = None) -> None:
    """The bytes seen so far (possibly fewer than 8) must begin like the magic."""
    n = min(len(raw), len(MAGIC))
    if raw[:n] != MAGIC[:n]:
        raise UsxfInvalid(CHECK_MAGIC, "not a USXF file (magic bytes differ)", path)


def parse_header(raw: bytes, path: str | None = None) -> Header:
    """Magic, version, header checksum, then every declared length against its limit."""
    check_magic(raw, path)
    if len(raw) < HEADER_SIZE:
        raise UsxfInvalid(CHECK_TRUNCATED, f"{len(raw)} bytes, shorter than the {HEADER_SIZE}-byte header", path)
    raw = bytes(raw[:HEADER_SIZE])
    (_, major, minor, sig_alg, flags, manifest_len, sig_len, chunk_size, payload_offset,
     payload_len, manifest_xxh3, header_xxh3) = HEADER.unpack(raw)
    if major != VERSION_MAJOR:
        raise UsxfInvalid(CHECK_VERSION, f"format version {major}.{minor}; this reader supports "
                                         f"{VERSION_MAJOR}.x", path)
    if xxhash.xxh3_64_intdigest(raw[:56]) != header_xxh3:
        raise UsxfInvalid(CHECK_HEADER, "header checksum mismatch (the header is damaged)", path)
    if sig_alg != SIG_ALG_ED25519:
        raise UsxfInvalid(CHECK_HEADER, f"unknown signature algorithm {sig_alg}", path)
    if flags != 0:
        raise UsxfInvalid(CHECK_HEADER, f"reserved flags {flags:#x} set", path)
    if not 1 <= manifest_len <= MAX_MANIFEST:
        raise UsxfInvalid(CHECK_BOUNDS, f"manifest length {manifest_len} outside 1..{MAX_MANIFEST}", path)
    if sig_len != SIG_LEN_ED25519:
        raise UsxfInvalid(CHECK_BOUNDS, f"signature block of {sig_len} bytes, Ed25519 needs "
                                        f"{SIG_LEN_ED25519}", path)
    if (not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
        raise UsxfInvalid(CHECK_BOUNDS, f"chunk size {chunk_size} is not a power of two in "
                                        f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}", path)
    if payload_offset != payload_offset_for(manifest_len, sig_len):
        raise UsxfInvalid(CHECK_BOUNDS, f"payload offset {payload_offset} is not "
                                        f"{payload_offset_for(manifest_len, sig_len)}", path)
    if payload_len > MAX_PAYLOAD or -(-payload_len // chunk_size) > MAX_CHUNKS:
        raise UsxfInvalid(CHECK_BOUNDS, f"payload length {payload_len} over the limit "
                                        f"({MAX_PAYLOAD} bytes, {MAX_CHUNKS} chunks)", path)
    return Header(major, minor, sig_alg, flags, manifest_len, sig_len, chunk_size, payload_offset,
                  payload_len, manifest_xxh3, header_xxh3, raw)


def check_size(header: Header, size: int, path: str | None = None) -> None:
    if size < header.total_size:
        raise UsxfInvalid(CHECK_TRUNCATED, f"{size} bytes, the header declares {header.total_size}", path)
    if size > header.total_size:
        raise UsxfInvalid(CHECK_TRAILING, f"{size - header.total_size} bytes after the payload's end", path)


def check_signature(header: Header, manifest_bytes: bytes, sig_block: bytes,
                    trusted: dict[str, bytes] | None, path: str | None = None) -> tuple[str, bytes, bool]:
    """(key id, public key, trusted?) or UsxfInvalid; runs before the manifest is decoded."""
    if xxhash.xxh3_64_intdigest(manifest_bytes) != header.manifest_xxh3:
        raise UsxfInvalid(CHECK_MANIFEST, "manifest checksum mismatch (the manifest is damaged)", path)
    pub, sig = bytes(sig_block[:ED25519_PUBLIC_LEN]), bytes(sig_block[ED25519_PUBLIC_LEN:])
    kid = key_id_of(pub)
    message = SIGNATURE_DOMAIN + header.raw + manifest_bytes
    if trusted is not None and kid in trusted:
        if not verify_ed25519(trusted[kid], sig, message):
            raise UsxfInvalid(CHECK_SIGNATURE, f"signature invalid for trusted key {kid}: the file "
                                               f"was altered or not signed by that key", path)
        return kid, trusted[kid], True
    if not verify_ed25519(pub, sig, message):
        raise UsxfInvalid(CHECK_SIGNATURE, f"signature invalid (key {kid}): the file was altered", path)
    if trusted is not None:
        raise UsxfUntrustedKey(kid, public_key_text(pub), path)
    return kid, pub, False


# ---------------------------------------------------------------- manifest


_KINDS = {
    "int": lambda x: isinstance(x, int) and not isinstance(x, bool),
    "num": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
    "str": lambda x: isinstance(x, str),
    "bin": lambda x: isinstance(x, bytes),
    "list": lambda x: isinstance(x, list),
    "map": lambda x: isinstance(x, dict),
    "nil": lambda x: x is None,
}


class _Schema:
    """Typed field access on untrusted decoded data; any surprise is a `manifest` failure."""

    def __init__(self, path: str | None):
        self.path = path

    def fail(self, where: str, what: str, check: str = CHECK_MANIFEST):
        raise UsxfInvalid(check, f"{where}: {what}", self.path)

    def map(self, v, where: str, check: str = CHECK_MANIFEST) -> dict:
        if not isinstance(v, dict):
            self.fail(where, f"expected a map, got {type(v).__name__}", check)
        return v

    def get(self, d: dict, key: str, kind: str, where: str, check: str = CHECK_MANIFEST):
        if key not in d:
            self.fail(f"{where}.{key}", "missing", check)
        v = d[key]
        if not any(_KINDS[k](v) for k in kind.split("|")):
            self.fail(f"{where}.{key}", f"expected {kind}, got {type(v).__name__}", check)
        return v

    def int_in(self, d: dict, key: str, lo: int, hi: int, where: str, check: str = CHECK_MANIFEST) -> int:
        v = self.get(d, key, "int", where, check)
        if not lo <= v <= hi:
            self.fail(f"{where}.{key}", f"{v} outside {lo}..{hi}", check)
        return v

    def ints(self, v: list, where: str, lo: int, hi: int, check: str) -> list[int]:
        for x in v:
            if not (isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi):
                self.fail(where, f"expected integers in {lo}..{hi}", check)
        return v


_IDENTITY_KINDS = {
    "name": "str", "architecture": "str", "n_layers": "int", "n_heads": "int", "n_kv_heads": "int",
    "head_dim": "int", "hidden_size": "int", "vocab_size": "int", "rope_theta": "num",
    "rope_scaling": "str", "rope_layout": "str", "sliding_window": "int", "context_limit": "int",
    "weights_digest": "str", "tokenizer_digest": "str", "kv_dtype": "str",
}
_IDENTITY_OPTIONAL = {"attention": "str"}  # absent for uniform full attention (and older files)
assert set(_IDENTITY_KINDS) | set(_IDENTITY_OPTIONAL) == {f.name for f in fields(ModelIdentity)}
ATTENTION_FIELDS = ("n_layers", "n_heads", "n_kv_heads", "head_dim", "rope_theta", "rope_scaling",
                    "rope_layout", "sliding_window")
_DIM_MAX = 1 << 20


def decode_manifest(manifest_bytes: bytes, path: str | None = None) -> dict:
    try:
        m = msgpack.unpackb(manifest_bytes, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        raise UsxfInvalid(CHECK_MANIFEST, f"undecodable MessagePack ({type(e).__name__})", path) from None
    if not isinstance(m, dict):
        raise UsxfInvalid(CHECK_MANIFEST, "the manifest is not a map", path)
    return m


def parse_manifest(m: dict, header: Header, key_id: str, path: str | None = None,
                   expected_identity: ModelIdentity | None = None) -> Parsed:
    """Every check on the manifest that does not need the payload bytes."""
    s = _Schema(path)
    if s.get(m, "format", "str", "manifest") != "usxf":
        s.fail("manifest.format", "not 'usxf'")
    version = s.get(m, "version", "list", "manifest")
    if version != [header.major, header.minor]:
        s.fail("manifest.version", f"{version!r} differs from the header's {header.major}.{header.minor}")

    sig = s.map(s.get(m, "signature", "map", "manifest"), "signature")
    if s.get(sig, "alg", "str", "signature") != "ed25519":
        s.fail("signature.alg", "not 'ed25519'", CHECK_SIGNATURE)
    if s.get(sig, "key_id", "str", "signature") != key_id:
        s.fail("signature.key_id", f"{sig['key_id']!r} is not the signer's key {key_id}", CHECK_SIGNATURE)

    identity = _parse_identity(s, m)
    if expected_identity is not None:
        diff = expected_identity.differences(identity)
        if diff:
            raise UsxfInvalid(CHECK_IDENTITY, f"made by another model: {', '.join(diff)} differ "
                                              f"(file: {identity.name}, here: {expected_identity.name})", path)

    att = s.get(m, "attention", "map", "manifest")
    for k in ATTENTION_FIELDS:
        if k not in att or att[k] != getattr(identity, k) or type(att[k]) is not type(getattr(identity, k)):
            s.fail(f"attention.{k}", f"{att.get(k)!r} differs from the model's "
                                     f"{getattr(identity, k)!r}", CHECK_LAYOUT)

    seq = s.get(m, "sequence", "map", "manifest")
    n = s.int_in(seq, "length", 0, MAX_TOKENS, "sequence")
    if s.get(seq, "token_dtype", "str", "sequence") != "<u4":
        s.fail("sequence.token_dtype", "not '<u4'")
    raw_ids = s.get(seq, "token_ids", "bin", "sequence")
    if len(raw_ids) != 4 * n:
        s.fail("sequence.token_ids", f"{len(raw_ids)} bytes for {n} tokens")
    tokens = np.frombuffer(raw_ids, "<u4")
    if identity.vocab_size > 0 and n and int(tokens.max()) >= identity.vocab_size:
        bad = int(np.argmax(tokens >= identity.vocab_size))
        raise UsxfInvalid(CHECK_TOKENS, f"token {bad} is {int(tokens[bad])}, outside the "
                                        f"vocabulary of {identity.vocab_size}", path)

    blocks = s.get(m, "blocks", "map", "manifest")
    if s.get(blocks, "hash", "str", "blocks") != BLOCK_HASH_NAME:
        s.fail("blocks.hash", f"not {BLOCK_HASH_NAME!r}")
    if s.get(blocks, "salt", "str", "blocks") != "model.fingerprint":
        s.fail("blocks.salt", "not 'model.fingerprint'")
    bs = s.int_in(blocks, "block_size", MIN_BLOCK_SIZE, MAX_BLOCK_SIZE, "blocks")
    hashes = s.get(blocks, "hashes", "list", "blocks")
    want = layout.block_hashes(raw_ids, identity.fingerprint, bs)
    if len(hashes) != len(want):
        raise UsxfInvalid(CHECK_BLOCKS, f"{len(hashes)} block hashes for {n} tokens in blocks of "
                                        f"{bs} (expected {len(want)})", path)
    for i, (h, w) in enumerate(zip(hashes, want, strict=True)):
        if h != w:
            raise UsxfInvalid(CHECK_BLOCKS, f"block {i} (tokens {i * bs}..{min(n, (i + 1) * bs)}) "
                                            f"does not match the token ids", path)

    source_dtype, method, group, tensors = _parse_tensors(s, m, identity, n, header)
    chunk_digests, digest = _parse_payload(s, m, header)
    agent = _parse_agent(s, m, n)
    fidelity = _parse_fidelity(s, m)
    prov = s.get(m, "provenance", "map", "manifest")
    for k, v in prov.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, (str, int, float, bool))):
            s.fail(f"provenance.{k}", "keys are strings and values scalars")
    return Parsed(m, identity, tokens, agent, fidelity, source_dtype, method, group, tensors,
                  chunk_digests, digest)


def _parse_identity(s: _Schema, m: dict) -> ModelIdentity:
    d = s.get(m, "model", "map", "manifest")
    for k, kind in _IDENTITY_KINDS.items():
        s.get(d, k, kind, "model")
    for k, kind in _IDENTITY_OPTIONAL.items():
        if k in d:
            s.get(d, k, kind, "model")
    for k in ("n_layers", "n_heads", "n_kv_heads", "head_dim"):
        s.int_in(d, k, 1, _DIM_MAX, "model")
    if d["rope_layout"] not in ROPE_LAYOUTS:
        s.fail("model.rope_layout", f"{d['rope_layout']!r} is not one of {ROPE_LAYOUTS}")
    recorded = s.get(d, "fingerprint", "str", "model")
    try:
        identity = ModelIdentity.from_dict(d)
        fp = identity.fingerprint
    except (TypeError, ValueError, OverflowError) as e:  # e.g. a non-finite rope_theta in JSON
        raise UsxfInvalid(CHECK_MANIFEST, f"model: unusable identity ({type(e).__name__})", s.path) from None
    if fp != recorded:
        raise UsxfInvalid(CHECK_IDENTITY, f"recorded fingerprint {recorded[:32]} does not match the "
                                          f"identity fields ({fp})", s.path)
    return identity


def _parse_tensors(s: _Schema, m: dict, identity: ModelIdentity, n: int, header: Header):
    kv = s.get(m, "kv", "map", "manifest")
    source_dtype = s.get(kv, "source_dtype", "str", "kv")
    if source_dtype not in SOURCE_DTYPES:
        s.fail("kv.source_dtype", f"{source_dtype!r} is not one of {SOURCE_DTYPES}")
    q = s.get(m, "quant", "map", "manifest")
    method = s.get(q, "method", "str", "quant")
    if method not in QUANTS:
        s.fail("quant.method", f"{method!r} is not one of {QUANTS}")
    err = s.get(q, "error", "map", "quant")
    for k in ("max_abs", "rms", "source_max_abs", "source_rms"):
        s.get(err, k, "num", "quant.error")
    if method == "int8":
        group = s.int_in(q, "group_size", 1, _DIM_MAX, "quant")
        if s.get(q, "scale_dtype", "str", "quant") != quant.SCALE_DTYPE:
            s.fail("quant.scale_dtype", f"not {quant.SCALE_DTYPE!r}")
    else:
        s.get(q, "group_size", "nil", "quant")
        s.get(q, "scale_dtype", "nil", "quant")
        group = 0
    stored = quant.stored_dtype(source_dtype, method)
    itemsize = STORED_DTYPES[stored]

    table = s.get(kv, "tensors", "list", "kv")
    if len(table) != 2 * identity.n_layers:
        s.fail("kv.tensors", f"{len(table)} tensors for {identity.n_layers} layers", CHECK_LAYOUT)
    out: list[TensorEntry] = []
    end = 0
    length = header.payload_len
    for i, t in enumerate(table):
        where = f"kv.tensors[{i}]"
        t = s.map(t, where)
        layer, kind = i // 2, "kv"[i % 2]
        if s.get(t, "name", "str", where) != f"layers.{layer}.{kind}" or \
                s.get(t, "layer", "int", where) != layer or s.get(t, "kind", "str", where) != kind:
            s.fail(where, f"expected layers.{layer}.{kind} here", CHECK_LAYOUT)
        shape = s.ints(s.get(t, "shape", "list", where), f"{where}.shape", 0, _DIM_MAX * MAX_TOKENS, CHECK_LAYOUT)
        if len(shape) != 3 or shape[0] != identity.n_kv_heads or shape[1] != n or shape[2] < 1 or \
                (kind == "k" and shape[2] != identity.head_dim):
            s.fail(where, f"shape {shape} is not [{identity.n_kv_heads}, {n}, head_dim]", CHECK_LAYOUT)
        if s.get(t, "dtype", "str", where) != stored:
            s.fail(f"{where}.dtype", f"{t['dtype']!r}, {method} of {source_dtype} stores {stored}", CHECK_LAYOUT)
        end = _region(s, t, where, math.prod(shape) * itemsize, end, length)
        sc = s.get(t, "scales", "map|nil", where)
        if (sc is None) != (method != "int8"):
            s.fail(f"{where}.scales", "int8 tensors carry scales, others none", CHECK_LAYOUT)
        sshape: tuple[int, ...] | None = None
        soff = snb = 0
        if sc is not None:
            if shape[2] % group:
                s.fail(where, f"head_dim {shape[2]} is not a multiple of group {group}", CHECK_LAYOUT)
            if s.get(sc, "dtype", "str", f"{where}.scales") != quant.SCALE_DTYPE:
                s.fail(f"{where}.scales.dtype", f"not {quant.SCALE_DTYPE!r}", CHECK_LAYOUT)
            want = [shape[0], shape[1], shape[2] // group]
            if s.get(sc, "shape", "list", f"{where}.scales") != want:
                s.fail(f"{where}.scales.shape", f"not {want}", CHECK_LAYOUT)
            end = _region(s, sc, f"{where}.scales", math.prod(want) * 4, end, length)
            sshape, soff, snb = tuple(want), sc["offset"], sc["nbytes"]
        out.append(TensorEntry(layer, kind, tuple(shape), stored, t["offset"], t["nbytes"],
                               sshape, soff, snb))
    if end != length:
        s.fail("kv.tensors", f"tensors end at {end}, the payload at {length}", CHECK_LAYOUT)
    return source_dtype, method, group, out


def _region(s: _Schema, t: dict, where: str, nbytes: int, prev_end: int, length: int) -> int:
    off = s.get(t, "offset", "int", where)
    nb = s.get(t, "nbytes", "int", where)
    if nb != nbytes:
        s.fail(f"{where}.nbytes", f"{nb}, the shape needs {nbytes}", CHECK_LAYOUT)
    if off % TENSOR_ALIGN or off < prev_end or off + nb > length:
        s.fail(f"{where}.offset", f"{off} is unaligned, overlapping or outside the payload "
                                  f"({length} bytes)", CHECK_LAYOUT)
    return off + nb


def _parse_payload(s: _Schema, m: dict, header: Header) -> tuple[list[bytes], bytes]:
    p = s.get(m, "payload", "map", "manifest")
    expect = {"offset": header.payload_offset, "length": header.payload_len,
              "chunk_size": header.chunk_size, "alignment": PAYLOAD_ALIGN, "tensor_alignment": TENSOR_ALIGN}
    for k, v in expect.items():
        if s.get(p, k, "int", "payload") != v:
            s.fail(f"payload.{k}", f"{p[k]} differs from the header's {v}", CHECK_BOUNDS)
    if s.get(p, "chunk_hash", "str", "payload") != CHUNK_HASH_NAME:
        s.fail("payload.chunk_hash", f"not {CHUNK_HASH_NAME!r}")
    if s.get(p, "digest_alg", "str", "payload") != DIGEST_NAME:
        s.fail("payload.digest_alg", f"not {DIGEST_NAME!r}")
    chunks = s.get(p, "chunks", "list", "payload")
    if len(chunks) != header.n_chunks or not all(isinstance(c, bytes) and len(c) == 32 for c in chunks):
        s.fail("payload.chunks", f"expected {header.n_chunks} digests of 32 bytes")
    digest = s.get(p, "digest", "bin", "payload")
    if len(digest) != 32:
        s.fail("payload.digest", "not 32 bytes")
    return chunks, digest


def _parse_agent(s: _Schema, m: dict, n: int) -> AgentRecord:
    a = s.get(m, "agent", "map", "manifest", CHECK_AGENT)
    vals = {k: s.get(a, k, "str", "agent", CHECK_AGENT) for k in ("agent_id", "role", "title", "system")}
    turns = s.get(a, "turns", "list", "agent", CHECK_AGENT)
    prev = 0
    for i, t in enumerate(turns):
        where = f"agent.turns[{i}]"
        s.map(t, where, CHECK_AGENT)
        s.get(t, "user", "str", where, CHECK_AGENT)
        s.get(t, "reply", "str", where, CHECK_AGENT)
        span = s.ints(s.get(t, "span", "list", where, CHECK_AGENT), f"{where}.span", 0, n, CHECK_AGENT)
        if len(span) != 2 or not prev <= span[0] <= span[1]:
            s.fail(f"{where}.span", f"{span} is not an in-order [start, end) within {n} tokens", CHECK_AGENT)
        prev = span[1]
        for k in t:
            if not isinstance(k, str):
                s.fail(where, "keys must be strings", CHECK_AGENT)
    return AgentRecord(turns=turns, **vals)


def _parse_fidelity(s: _Schema, m: dict) -> Fidelity | None:
    f = s.get(m, "fidelity", "map|nil", "manifest", CHECK_FIDELITY)
    if f is None:
        return None
    probe = s.ints(s.get(f, "probe_prompt_ids", "list", "fidelity", CHECK_FIDELITY),
                   "fidelity.probe_prompt_ids", 0, 2**32 - 1, CHECK_FIDELITY)
    expected = s.ints(s.get(f, "expected_ids", "list", "fidelity", CHECK_FIDELITY),
                      "fidelity.expected_ids", 0, 2**32 - 1, CHECK_FIDELITY)
    nn = s.int_in(f, "n", 0, 2**32, "fidelity", CHECK_FIDELITY)
    if nn != len(expected):
        s.fail("fidelity.n", f"{nn} but {len(expected)} expected ids", CHECK_FIDELITY)
    room = s.int_in(f, "context_room", 0, 2**63, "fidelity", CHECK_FIDELITY)
    note = s.get(f, "note", "str", "fidelity", CHECK_FIDELITY)
    return Fidelity(probe_prompt_ids=probe, expected_ids=expected, n=nn, context_room=room, note=note)


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
