"""llama.cpp's per-sequence state blob: parse it, build it, size it, and move K between RoPE
layouts. Pure numpy: no llama.cpp, no MLX.

The sequence-state blob (`llama_state_seq_get_data` / `llama_state_seq_set_data`) as written by
llama.cpp vendored in llama-cpp-python 0.3.36 (src/llama-context.cpp state_seq_get_data,
src/llama-kv-cache.cpp state_write / state_write_meta / state_write_data,
src/llama-kv-cache-iswa.cpp state_write), all little-endian:

    u32 magic = 0xAF143CD8
    i32 seq_id                      the source sequence (ignored on read: the target seq is used)
    one KV-cache sub-state per cache of the model, each:
      u32 n_stream                  1 with a unified KV cache (llama-cpp-python's default)
      per stream:
        u32 cell_count              0 for a stream not holding the sequence (then nothing else)
        cell_count x { i32 pos; u32 n_seq_id; n_seq_id x i32 seq_id }
                                    (a per-seq blob has n_seq_id == 1; a llama.cpp reader
                                    rejects anything else. Models with M-RoPE / PLE also write
                                    a cell "ext" struct: not supported here)
        u32 v_trans                 1 when flash attention is off (V stored transposed)
        u32 n_layer                 the layers of this cache
        n_layer x { i32 k_type; u64 k_row_bytes; cell_count rows of n_kv_heads*head_dim }
        if not v_trans:
          n_layer x { i32 v_type; u64 v_row_bytes; cell_count rows of n_kv_heads*head_dim }
        else:
          n_layer x { i32 v_type; u32 v_elem_bytes; u32 n_embd_v_gqa;
                      n_embd_v_gqa x (cell_count elements): for each channel, every cell }

A model without sliding-window layers has one cache (all layers). A model with them (Gemma 3:
five of every six layers slide over 512 positions) has llama.cpp's iSWA cache: two sub-states,
the base cache (the full-attention layers, every position) and then the SWA cache (the sliding
layers), whose cells are only those the last position still sees: positions p with
pos_max - p < n_swa, i.e. the last min(n, window) positions, each cell with its position.
`cells.py` maps model layers to these caches.

A K (or V) row is one cell (token): n_kv_heads heads of head_dim each, head-major. K is stored
after RoPE. ggml types: 0 = f32, 1 = f16, 30 = bf16 (quantized KV types, which also switch on
llama.cpp's Hadamard "attn_rot", are refused). llama.cpp checks magic, n_stream, n_layer,
v_trans, the types and row sizes against the target context; a mismatch fails the load (the
set call returns 0).

One serializer, two writers: as llama.cpp's `state_write_data` writes through
`llama_io_write_dummy` (counts), `llama_io_write_buffer` or `llama_io_write_file`, here
`write_seq_state_caches` writes through a `SeqStateWriter`: `CountingWriter` gives the size
without touching a tensor, `BufferWriter` fills a bytearray of exactly that size. So the size
and the bytes cannot disagree.

RoPE layout: llama.cpp rotates K with the architecture's rope type: NORM for llama ("interleaved"
pairs (x0,x1),(x2,x3)...; the GGUF converter permutes llama's Q/K rows for it), NEOX for qwen2,
qwen3 and gemma3 ("half-split", no permutation). An MLX model loaded from the same GGUF
(permeant_tui.engine.gguf) runs with the same layout (its identity's `rope_layout` says which),
so its cache goes in as it is. K in the other layout goes through `permute_k_heads` first.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import PermeantError
from .writers import (
    ELEM_BYTES,
    GGML_TYPE_BF16,
    KV_TYPES,
    NAME_OF,
    NP_STORE,
    BufferWriter,
    CountingWriter,
    SeqStateWriter,
)

SEQ_STATE_MAGIC = 0xAF143CD8

MAX_CACHES = 2  # a unified cache, or iSWA's base + SWA


class SeqStateError(PermeantError, ValueError):
    """A llama.cpp sequence-state blob that this module cannot read or that does not fit."""


class SlidingWindowUnsupported(SeqStateError):
    """A sliding-window layout that cannot move between MLX and llama.cpp: a sliding layer that
    keeps leading tokens (attention sinks), or sliding layers with different windows."""

    def __init__(self, what: str, why: str = "its sliding-window layout has no llama.cpp form"):
        super().__init__(f"{what}: {why}")


@dataclass
class CacheCells:
    """The cells one llama.cpp KV cache holds for the sequence: `positions` in the blob's cell
    order, and per layer of that cache K and V shaped (n_kv_heads, n_cells, head_dim) in the
    same order (float32 after parsing; any float dtype to build)."""

    positions: Sequence[int]
    keys: Sequence[np.ndarray]
    values: Sequence[np.ndarray]


@dataclass
class CacheInfo:
    """One KV cache's sub-state, without its tensors."""

    n_stream: int
    stream: int  # index of the stream holding the cells
    n_cells: int
    n_layer: int  # 0 when the cache holds no cell (then it is not written)
    positions: list[int] = field(default_factory=list)
    cell_seq_ids: list[list[int]] = field(default_factory=list)
    n_embd_k: int = 0
    n_embd_v: int = 0


@dataclass
class SeqStateInfo:
    """Everything in a sequence-state blob besides the tensors (what `build_seq_state_caches`
    needs to reproduce it byte for byte). The flat fields describe the first cache (the only one
    of a unified state); `caches` holds every sub-state."""

    seq_id: int
    v_trans: bool
    kv_dtype: str  # "f32" | "f16" | "bf16" (K and V)
    caches: list[CacheInfo]
    nbytes: int = 0

    @property
    def n_stream(self) -> int:
        return self.caches[0].n_stream

    @property
    def stream(self) -> int:
        return self.caches[0].stream

    @property
    def n_cells(self) -> int:
        return self.caches[0].n_cells

    @property
    def n_layer(self) -> int:
        return self.caches[0].n_layer

    @property
    def positions(self) -> list[int]:
        return self.caches[0].positions

    @property
    def cell_seq_ids(self) -> list[list[int]]:
        return self.caches[0].cell_seq_ids

    @property
    def n_embd_k(self) -> int:
        return self.caches[0].n_embd_k

    @property
    def n_embd_v(self) -> int:
        return self.caches[0].n_embd_v

    @property
    def n_past(self) -> int:
        """The position after the highest cell of any cache (where decoding continues)."""
        return max((max(c.positions) + 1 for c in self.caches if c.positions), default=0)


# --- parsing --------------------------------------------------------------------------------

class _Reader:
    def __init__(self, blob):
        self.mv = memoryview(blob).cast("B")
        self.off = 0

    def left(self) -> int:
        return len(self.mv) - self.off

    def unpack(self, fmt: str):
        try:
            vals = struct.unpack_from(fmt, self.mv, self.off)
        except struct.error as exc:
            raise SeqStateError(f"truncated llama.cpp sequence state at byte {self.off}") from exc
        self.off += struct.calcsize(fmt)
        return vals

    def take(self, n: int) -> memoryview:
        if self.off + n > len(self.mv):
            raise SeqStateError(
                f"truncated llama.cpp sequence state: need {n} bytes at {self.off}, "
                f"have {len(self.mv) - self.off}")
        out = self.mv[self.off:self.off + n]
        self.off += n
        return out


def _to_f32(raw: memoryview, ggml_type: int, count: int) -> np.ndarray:
    arr = np.frombuffer(raw, dtype=NP_STORE[ggml_type], count=count)
    if ggml_type == GGML_TYPE_BF16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def _kv_type(t: int, what: str) -> int:
    if t not in ELEM_BYTES:
        raise SeqStateError(
            f"{what} type {t} is not supported (f32=0, f16=1, bf16=30; quantized KV caches are "
            f"not migrated)")
    return t


class _Types:
    """K/V types and V layout seen so far: one of each across every layer of every cache."""

    def __init__(self) -> None:
        self.k: int | None = None
        self.v: int | None = None
        self.v_trans: bool | None = None

    def same(self, attr: str, val, what: str):
        old = getattr(self, attr)
        if old is not None and old != val:
            raise SeqStateError(f"{what} differs between layers or caches")
        setattr(self, attr, val)
        return val


def _parse_cache(r: _Reader, types: _Types, want: bool):
    """One KV cache's sub-state -> (CacheInfo, flat K arrays, flat V arrays)."""
    (n_stream,) = r.unpack("<I")
    found: CacheInfo | None = None
    keys: list[np.ndarray] = []
    values: list[np.ndarray] = []
    for s in range(n_stream):
        (n_cells,) = r.unpack("<I")
        if n_cells == 0:
            continue
        if found is not None:
            raise SeqStateError("sequence state holds cells in more than one stream")
        positions, cell_seq = [], []
        for _ in range(n_cells):
            pos, n_sid = r.unpack("<iI")
            positions.append(pos)
            cell_seq.append(list(r.unpack(f"<{n_sid}i")) if n_sid else [])
        v_trans, n_layer = r.unpack("<II")
        types.same("v_trans", bool(v_trans), "V layout (v_trans)")
        n_embd_k = n_embd_v = 0
        for _ in range(n_layer):
            (t, row) = r.unpack("<iQ")
            t = types.same("k", _kv_type(t, "K"), "K type")
            n_embd_k = row // ELEM_BYTES[t]
            raw = r.take(row * n_cells)
            if want:
                keys.append(_to_f32(raw, t, n_embd_k * n_cells))
        for _ in range(n_layer):
            if v_trans:
                t, el, n_embd = r.unpack("<iII")
                t = _kv_type(t, "V")
                if el != ELEM_BYTES[t]:
                    raise SeqStateError(f"V element size {el} does not fit type {t}")
            else:
                t, row = r.unpack("<iQ")
                t = _kv_type(t, "V")
                n_embd = row // ELEM_BYTES[t]
            types.same("v", t, "V type")
            n_embd_v = n_embd
            raw = r.take(n_embd * n_cells * ELEM_BYTES[t])
            if want:
                values.append(_to_f32(raw, t, n_embd * n_cells))
        found = CacheInfo(n_stream=n_stream, stream=s, n_cells=n_cells, n_layer=n_layer,
                          positions=positions, cell_seq_ids=cell_seq, n_embd_k=n_embd_k,
                          n_embd_v=n_embd_v)
    if found is None:
        found = CacheInfo(n_stream=n_stream, stream=0, n_cells=0, n_layer=0)
    return found, keys, values


def _parse(blob, n_kv_heads: int | None, head_dim: int | None, want: bool,
           max_caches: int = MAX_CACHES):
    r = _Reader(blob)
    magic, seq_id = r.unpack("<Ii")
    if magic != SEQ_STATE_MAGIC:
        raise SeqStateError(f"not a llama.cpp sequence state (magic {magic:#x})")
    types = _Types()
    infos: list[CacheInfo] = []
    flat: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
    while True:
        info, ks, vs = _parse_cache(r, types, want)
        infos.append(info)
        flat.append((ks, vs))
        if r.left() < 8 or len(infos) == max_caches:  # 8: the least a cache sub-state takes
            break
    if r.left():
        raise SeqStateError(f"{r.left()} trailing bytes after the sequence state")
    if types.k is not None and types.k != types.v:
        raise SeqStateError(f"K type {types.k} and V type {types.v} differ (not supported)")
    state = SeqStateInfo(seq_id=seq_id, v_trans=bool(types.v_trans),
                         kv_dtype=NAME_OF[types.k] if types.k is not None else "f16",
                         caches=infos, nbytes=len(r.mv))
    if not want:
        return state, []
    hk = n_kv_heads
    if hk is None or head_dim is None:
        raise ValueError("n_kv_heads and head_dim are needed to shape the tensors")
    out = []
    for info, (ks, vs) in zip(infos, flat, strict=True):
        n = info.n_cells
        if n and (info.n_embd_k != hk * head_dim or info.n_embd_v != hk * head_dim):
            raise SeqStateError(
                f"state rows hold K {info.n_embd_k} / V {info.n_embd_v} values, expected "
                f"{hk} kv heads x {head_dim} = {hk * head_dim}")
        k3 = [np.ascontiguousarray(k.reshape(n, hk, head_dim).transpose(1, 0, 2)) for k in ks]
        if state.v_trans:
            v3 = [np.ascontiguousarray(v.reshape(hk, head_dim, n).transpose(0, 2, 1))
                  for v in vs]
        else:
            v3 = [np.ascontiguousarray(v.reshape(n, hk, head_dim).transpose(1, 0, 2))
                  for v in vs]
        out.append(CacheCells(info.positions, k3, v3))
    return state, out


def seq_state_info(blob) -> SeqStateInfo:
    """Header facts of a blob (every cache's positions, dtype, v_trans, ...) without decoding
    the tensors."""
    info, _ = _parse(blob, None, None, want=False)
    return info


def parse_seq_state_caches(blob, n_kv_heads: int, head_dim: int
                           ) -> tuple[SeqStateInfo, list[CacheCells]]:
    """A llama.cpp per-sequence state -> (info, one CacheCells per KV cache): one for a
    unified cache, two (base, then SWA) for an iSWA one. K/V float32 (f16 / bf16 widened
    exactly), cells in the blob's order; K post-RoPE in the architecture's layout."""
    return _parse(blob, n_kv_heads, head_dim, want=True)


def parse_seq_state(blob, n_layers: int, n_kv_heads: int, head_dim: int
                    ) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """A unified-cache state -> (positions, keys, values), one (n_kv_heads, n_cells, head_dim)
    float32 array per layer in the order of `positions`. An iSWA state (two caches) is refused:
    `parse_seq_state_caches` reads it."""
    info, caches = _parse(blob, n_kv_heads, head_dim, want=True, max_caches=1)
    c = caches[0]
    if c.keys and len(c.keys) != n_layers:
        raise SeqStateError(f"state has {len(c.keys)} layers, expected {n_layers}")
    return list(c.positions), list(c.keys), list(c.values)


# --- writing: one serializer, a counting writer and a buffer writer -------------------------

def _as_heads(t, what: str, i: int) -> np.ndarray:
    a = t if isinstance(t, np.ndarray) else np.asarray(t)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{what}[{i}] must be (n_kv_heads, seq, head_dim), got {a.shape}")
    return a


def _write_cache(w: SeqStateWriter, c: CacheCells, t: int, v_trans: bool, seq_id: int,
                 n_stream: int, stream: int) -> None:
    el = ELEM_BYTES[t]
    n = len(c.positions)
    if len(c.keys) != len(c.values):
        raise ValueError(f"{len(c.keys)} K layers but {len(c.values)} V layers")
    w.write(struct.pack("<I", n_stream))
    for _ in range(stream):
        w.write(struct.pack("<I", 0))
    w.write(struct.pack("<I", n))
    if n:
        cells = np.empty((n, 3), dtype="<i4")
        cells[:, 0] = np.asarray(c.positions, dtype=np.int64)
        cells[:, 1] = 1
        cells[:, 2] = seq_id
        w.write(cells.tobytes())
        w.write(struct.pack("<II", 1 if v_trans else 0, len(c.keys)))
        for i, k in enumerate(c.keys):
            k = _as_heads(k, "keys", i)
            hk, sk, d = k.shape
            if sk != n:
                raise ValueError(f"keys[{i}] holds {sk} positions, positions has {n}")
            w.write(struct.pack("<iQ", t, hk * d * el))
            w.write_tensor(k.transpose(1, 0, 2), t)  # rows = cells
        for i, v in enumerate(c.values):
            v = _as_heads(v, "values", i)
            hv, sv, d = v.shape
            if sv != n:
                raise ValueError(f"values[{i}] holds {sv} positions, positions has {n}")
            if v_trans:
                w.write(struct.pack("<iII", t, el, hv * d))
                w.write_tensor(v.transpose(0, 2, 1), t)  # rows = channels, each across cells
            else:
                w.write(struct.pack("<iQ", t, hv * d * el))
                w.write_tensor(v.transpose(1, 0, 2), t)
    for _ in range(stream + 1, n_stream):
        w.write(struct.pack("<I", 0))


def write_seq_state_caches(w: SeqStateWriter, caches: Sequence[CacheCells], *, kv_dtype: str,
                           v_trans: bool, seq_id: int = 0, n_stream: int = 1,
                           stream: int = 0) -> int:
    """The one serializer (the layout in this module's docstring): magic, seq_id, then each
    cache's sub-state in order. Validates the shapes, writes through `w`, returns the bytes
    written. See `build_seq_state_caches` for the arguments."""
    if kv_dtype not in KV_TYPES:
        raise ValueError(f"kv_dtype must be one of {sorted(KV_TYPES)}, got {kv_dtype!r}")
    if not 0 <= stream < n_stream:
        raise ValueError(f"stream {stream} outside n_stream {n_stream}")
    if not 1 <= len(caches) <= MAX_CACHES:
        raise ValueError(f"{len(caches)} KV caches; llama.cpp writes 1 (unified) or 2 (iSWA)")
    start = w.n_bytes()
    w.write(struct.pack("<Ii", SEQ_STATE_MAGIC, seq_id))
    for c in caches:
        _write_cache(w, c, KV_TYPES[kv_dtype], v_trans, seq_id, n_stream, stream)
    return w.n_bytes() - start


def write_seq_state(w: SeqStateWriter, positions: Sequence[int], keys: Sequence[np.ndarray],
                    values: Sequence[np.ndarray], *, kv_dtype: str, v_trans: bool,
                    seq_id: int = 0, n_stream: int = 1, stream: int = 0) -> int:
    """`write_seq_state_caches` for a unified cache (one sub-state)."""
    return write_seq_state_caches(w, [CacheCells(positions, keys, values)], kv_dtype=kv_dtype,
                                  v_trans=v_trans, seq_id=seq_id, n_stream=n_stream,
                                  stream=stream)


def build_seq_state_caches(caches: Sequence[CacheCells], *, kv_dtype: str = "f16",
                           v_trans: bool, seq_id: int = 0, n_stream: int = 1,
                           stream: int = 0) -> bytearray:
    """The exact inverse of `parse_seq_state_caches`: a blob `llama_state_seq_set_data`
    accepts, one sub-state per cache (the model's: 1 unified, 2 for iSWA, base then SWA).

    keys / values per layer of each cache: (n_kv_heads, n_cells, head_dim) (a leading batch
    axis of 1 is dropped), any float dtype; K post-RoPE in the layout llama.cpp uses for the
    architecture. `kv_dtype` and `v_trans` must match the target context (its type_k / type_v,
    and v_trans = flash attention off), or llama.cpp refuses the blob. `n_stream` / `stream`:
    the target's stream count and the stream of the target sequence (1 / 0 unified).

    Returns a bytearray (compares equal to the bytes llama.cpp writes; `bytes(blob)` for an
    immutable copy), sized by a counting pass of the same serializer."""
    kw = {"kv_dtype": kv_dtype, "v_trans": v_trans, "seq_id": seq_id, "n_stream": n_stream,
          "stream": stream}
    size = write_seq_state_caches(CountingWriter(), caches, **kw)
    out = bytearray(size)
    w = BufferWriter(out)
    write_seq_state_caches(w, caches, **kw)
    assert w.n_bytes() == size
    return out


def build_seq_state(positions: Sequence[int], keys: Sequence[np.ndarray],
                    values: Sequence[np.ndarray], *, kv_dtype: str = "f16", v_trans: bool,
                    seq_id: int = 0, n_stream: int = 1, stream: int = 0) -> bytearray:
    """`build_seq_state_caches` for a unified cache: the inverse of `parse_seq_state`."""
    return build_seq_state_caches([CacheCells(positions, keys, values)], kv_dtype=kv_dtype,
                                  v_trans=v_trans, seq_id=seq_id, n_stream=n_stream,
                                  stream=stream)


def seq_state_nbytes(n_cells: int, n_layers: int, n_embd_k: int, n_embd_v: int,
                     kv_dtype: str = "f16", n_stream: int = 1) -> int:
    """Size of a unified single-sequence blob (for cost models and progress bars): the
    serializer run with a counting writer over zero-cost placeholders of the right shapes."""
    k = np.broadcast_to(np.float32(0), (1, n_cells, n_embd_k))
    v = np.broadcast_to(np.float32(0), (1, n_cells, n_embd_v))
    return write_seq_state(CountingWriter(), range(n_cells), [k] * n_layers, [v] * n_layers,
                           kv_dtype=kv_dtype, v_trans=True, n_stream=n_stream)


# --- RoPE layout ----------------------------------------------------------------------------

def permute_k_heads(k: np.ndarray, src_layout: str, dst_layout: str,
                    rotary_dim: int | None = None) -> np.ndarray:
    """K heads (..., head_dim) from one RoPE layout ("interleaved" | "half-split") to the other.

    Delegates to usxf.layout.convert_rope_layout (the one definition of the permutation)."""
    from ..usxf.layout import convert_rope_layout

    return convert_rope_layout(np.asarray(k), src_layout, dst_layout, rotary_dim)
