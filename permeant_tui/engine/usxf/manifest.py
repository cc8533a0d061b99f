"""The USXF manifest: typed access to untrusted decoded MessagePack and every check that does not
need the payload bytes (docs/USXF.md 2, 2.1, 4, 7). A 1.1 manifest's per-layer lengths and
starts are checked against `attention.layers`, and those against the identity. Any surprise is
a UsxfInvalid naming the field and the check."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import msgpack
import numpy as np

from ..errors import UsxfInvalid
from ..identity import ModelIdentity
from . import kivi, layout, quant
from .header import Header
from .spec import (
    BLOCK_HASH_NAME,
    CHECK_AGENT,
    CHECK_BLOCKS,
    CHECK_BOUNDS,
    CHECK_FIDELITY,
    CHECK_IDENTITY,
    CHECK_LAYOUT,
    CHECK_MANIFEST,
    CHECK_SIGNATURE,
    CHECK_TOKENS,
    CHUNK_HASH_NAME,
    DIGEST_NAME,
    MAX_BLOCK_SIZE,
    MAX_TOKENS,
    MIN_BLOCK_SIZE,
    PAYLOAD_ALIGN,
    QUANTS,
    ROPE_LAYOUTS,
    SOURCE_DTYPES,
    STORED_DTYPES,
    TENSOR_ALIGN,
    AgentRecord,
    Fidelity,
)


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
    start: int = 0  # logical position of the first stored token (1.1; 0 on full layers)
    kivi: kivi.Regions | None = None  # kivi8: where the tensor's parts lie (kivi.py)


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
LAYER_TYPES = ("full", "sliding")
_LAYER_KINDS = {"type": "str", "window": "int", "rope_theta": "num", "rotary_dim": "int"}


def layer_structure(identity: ModelIdentity) -> list[dict]:
    """`attention.layers` of a 1.1 manifest, derived from the identity's per-layer structure
    (every layer full with the identity's RoPE when it carries none): one map per layer with
    `type`, `window` (0 on full layers), `rope_theta` and `rotary_dim`."""
    out = []
    for x in identity.layers():
        if x.get("keep"):
            raise ValueError("a sliding layer that keeps leading tokens (not in USXF 1.1)")
        rope = x.get("rope") or {}
        sliding = x.get("type") == "sliding"
        base, dims = rope.get("base", identity.rope_theta), rope.get("dims", identity.head_dim)
        out.append({"type": "sliding" if sliding else "full",
                    "window": int(x.get("window") or 0) if sliding else 0,
                    "rope_theta": float(base), "rotary_dim": int(dims)})
    return out


def stored_lengths(layers: list[dict], n: int) -> list[int]:
    """Positions each layer's K/V holds after n tokens: n (full), min(n, window) (sliding)."""
    return [min(n, x["window"]) if x["type"] == "sliding" else n for x in layers]


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

    layers = _parse_layers(s, att, identity, header.minor)

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

    source_dtype, method, group, tensors = _parse_tensors(s, m, identity, n, header, layers)
    chunk_digests, digest = _parse_payload(s, m, header)
    agent = _parse_agent(s, m, n)
    fidelity = _parse_fidelity(s, m, identity.vocab_size)
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


def _parse_layers(s: _Schema, att: dict, identity: ModelIdentity, minor: int) -> list[dict]:
    """1.1: `attention.layers`, typed and equal to the identity's per-layer structure. 1.0 files
    carry none: every layer is full (whatever extra keys they hold)."""
    if minor == 0:
        return [{"type": "full", "window": 0}] * identity.n_layers
    layers = s.get(att, "layers", "list", "attention", CHECK_LAYOUT)
    if len(layers) != identity.n_layers:
        s.fail("attention.layers", f"{len(layers)} entries for {identity.n_layers} layers",
               CHECK_LAYOUT)
    for i, x in enumerate(layers):
        where = f"attention.layers[{i}]"
        s.map(x, where, CHECK_LAYOUT)
        for k, kind in _LAYER_KINDS.items():
            s.get(x, k, kind, where, CHECK_LAYOUT)
        if x["type"] not in LAYER_TYPES:
            s.fail(f"{where}.type", f"{x['type']!r} is not one of {LAYER_TYPES}", CHECK_LAYOUT)
        if (x["type"] == "sliding") != (x["window"] > 0) or not 0 <= x["window"] <= MAX_TOKENS:
            s.fail(f"{where}.window", f"{x['window']} for a {x['type']} layer", CHECK_LAYOUT)
        if not 0 < x["rotary_dim"] <= identity.head_dim:
            s.fail(f"{where}.rotary_dim", f"{x['rotary_dim']} outside 1..{identity.head_dim}",
                   CHECK_LAYOUT)
    try:
        want = layer_structure(identity)
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError, RecursionError):
        s.fail("model.attention", "not a per-layer list of attention maps", CHECK_LAYOUT)
    if len(want) != identity.n_layers:
        s.fail("model.attention", f"{len(want)} layers for {identity.n_layers}", CHECK_LAYOUT)
    for i, (x, w) in enumerate(zip(layers, want, strict=True)):
        got = {k: x[k] for k in _LAYER_KINDS}
        if got != w:
            s.fail(f"attention.layers[{i}]", f"{got} differs from the model's {w}", CHECK_LAYOUT)
    return layers


def _parse_tensors(s: _Schema, m: dict, identity: ModelIdentity, n: int, header: Header,
                   layers: list[dict]):
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
    group, key_group = quant.parse_header(s, q, method, _DIM_MAX)
    stored = quant.stored_dtype(source_dtype, method)
    itemsize = STORED_DTYPES[stored]

    table = s.get(kv, "tensors", "list", "kv")
    if len(table) != 2 * identity.n_layers:
        s.fail("kv.tensors", f"{len(table)} tensors for {identity.n_layers} layers", CHECK_LAYOUT)
    out: list[TensorEntry] = []
    end = 0
    length = header.payload_len
    lengths = stored_lengths(layers, n)
    for i, t in enumerate(table):
        where = f"kv.tensors[{i}]"
        t = s.map(t, where)
        layer, kind = i // 2, "kv"[i % 2]
        stored_n = lengths[layer]
        if s.get(t, "name", "str", where) != f"layers.{layer}.{kind}" or \
                s.get(t, "layer", "int", where) != layer or s.get(t, "kind", "str", where) != kind:
            s.fail(where, f"expected layers.{layer}.{kind} here", CHECK_LAYOUT)
        shape = s.ints(s.get(t, "shape", "list", where), f"{where}.shape", 0, _DIM_MAX * MAX_TOKENS, CHECK_LAYOUT)
        if len(shape) != 3 or shape[0] != identity.n_kv_heads or shape[1] != stored_n or \
                shape[2] < 1 or (kind == "k" and shape[2] != identity.head_dim):
            s.fail(where, f"shape {shape} is not [{identity.n_kv_heads}, {stored_n}, head_dim] "
                          f"(layer {layer}: {layers[layer]['type']}, {n} tokens)", CHECK_LAYOUT)
        start = n - stored_n
        if header.minor >= 1 and s.get(t, "start", "int", where, CHECK_LAYOUT) != start:
            s.fail(f"{where}.start", f"{t['start']}, layer {layer} ({layers[layer]['type']}) "
                                     f"after {n} tokens starts at {start}", CHECK_LAYOUT)
        if s.get(t, "dtype", "str", where) != stored:
            s.fail(f"{where}.dtype", f"{t['dtype']!r}, {method} of {source_dtype} stores {stored}", CHECK_LAYOUT)
        if method == kivi.METHOD:  # codes, scales, zeros, kept positions (kivi.py)
            end, regions = kivi.parse_entry(
                s, t, where, kind, shape, key_group, group,
                lambda r, w, nb, prev: _region(s, r, w, nb, prev, length), end, CHECK_LAYOUT)
            out.append(TensorEntry(layer, kind, tuple(shape), stored, t["offset"], t["nbytes"],
                                   None, 0, 0, start, regions))
            continue
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
                               sshape, soff, snb, start))
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


def _parse_fidelity(s: _Schema, m: dict, vocab_size: int) -> Fidelity | None:
    """The probe's ids are token ids of the file's model: each below its vocabulary (a replay
    feeds them to the model, whose embedding lookup does not bound-check)."""
    f = s.get(m, "fidelity", "map|nil", "manifest", CHECK_FIDELITY)
    if f is None:
        return None
    top = vocab_size - 1 if vocab_size > 0 else 2**32 - 1
    probe = s.ints(s.get(f, "probe_prompt_ids", "list", "fidelity", CHECK_FIDELITY),
                   "fidelity.probe_prompt_ids", 0, top, CHECK_FIDELITY)
    expected = s.ints(s.get(f, "expected_ids", "list", "fidelity", CHECK_FIDELITY),
                      "fidelity.expected_ids", 0, top, CHECK_FIDELITY)
    nn = s.int_in(f, "n", 0, 2**32, "fidelity", CHECK_FIDELITY)
    if nn != len(expected):
        s.fail("fidelity.n", f"{nn} but {len(expected)} expected ids", CHECK_FIDELITY)
    room = s.int_in(f, "context_room", 0, 2**63, "fidelity", CHECK_FIDELITY)
    note = s.get(f, "note", "str", "fidelity", CHECK_FIDELITY)
    margins = None
    if "margins" in f:  # optional: one finite, non-negative number per expected token
        margins = s.get(f, "margins", "list", "fidelity", CHECK_FIDELITY)
        if len(margins) != nn or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                and x >= 0 for x in margins):
            s.fail("fidelity.margins", f"expected {nn} finite numbers >= 0", CHECK_FIDELITY)
        margins = [float(x) for x in margins]
    return Fidelity(probe_prompt_ids=probe, expected_ids=expected, n=nn, context_room=room,
                    note=note, margins=margins)
