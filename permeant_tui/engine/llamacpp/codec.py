"""llama.cpp's per-sequence state blob: parse it, build it, size it, and move K between RoPE
layouts. Pure numpy: no llama.cpp, no MLX.

The sequence-state blob (`llama_state_seq_get_data` / `llama_state_seq_set_data`) as written by
llama.cpp vendored in llama-cpp-python 0.3.36 (src/llama-context.cpp state_seq_get_data,
src/llama-kv-cache.cpp state_write / state_write_meta / state_write_data), all little-endian:

    u32 magic = 0xAF143CD8
    i32 seq_id                      the source sequence (ignored on read: the target seq is used)
    u32 n_stream                    1 with a unified KV cache (llama-cpp-python's default)
    per stream:
      u32 cell_count                0 for a stream not holding the sequence (then nothing else)
      cell_count x { i32 pos; u32 n_seq_id; n_seq_id x i32 seq_id }
                                    (a per-seq blob has n_seq_id == 1; a llama.cpp reader
                                    rejects anything else. Models with M-RoPE / PLE also write a
                                    cell "ext" struct: not supported here)
      u32 v_trans                   1 when flash attention is off (V stored transposed)
      u32 n_layer
      n_layer x { i32 k_type; u64 k_row_bytes; cell_count rows of n_kv_heads*head_dim elements }
      if not v_trans:
        n_layer x { i32 v_type; u64 v_row_bytes; cell_count rows of n_kv_heads*head_dim }
      else:
        n_layer x { i32 v_type; u32 v_elem_bytes; u32 n_embd_v_gqa;
                    n_embd_v_gqa x (cell_count elements): for each channel, every cell }

A K (or V) row is one cell (token): n_kv_heads heads of head_dim each, head-major. K is stored
after RoPE. ggml types: 0 = f32, 1 = f16, 30 = bf16 (quantized KV types, which also switch on
llama.cpp's Hadamard "attn_rot", are refused). llama.cpp checks magic, n_stream, n_layer,
v_trans, the types and row sizes against the target context; a mismatch fails the load (the
set call returns 0). A sliding-window model's state (llama.cpp's iSWA cache: two sub-states,
global layers then sliding layers) is not this layout and is refused before it gets here.

One serializer, two writers: as llama.cpp's `state_write_data` writes through
`llama_io_write_dummy` (counts), `llama_io_write_buffer` or `llama_io_write_file`, here
`write_seq_state` writes through a `SeqStateWriter`: `CountingWriter` gives the size without
touching a tensor, `BufferWriter` fills a bytearray of exactly that size. So the size and the
bytes cannot disagree.

RoPE layout: llama.cpp rotates the GGUF llama K rows with rope type NORM, i.e. "interleaved"
pairs (x0,x1),(x2,x3)... An MLX mlx_lm llama model loaded from the same GGUF with
rope_traditional=True (permeant_tui.engine.gguf) produces the same post-RoPE K layout, so its
cache goes in as it is. K from an MLX model loaded from HF safetensors (rope_traditional=False,
"half-split") must go through `permute_k_heads(k, "half-split", "interleaved")` first.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import PermeantError

SEQ_STATE_MAGIC = 0xAF143CD8

# ggml_type ids (ggml.h) of the KV types this module reads and writes
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_BF16 = 30
KV_TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "bf16": GGML_TYPE_BF16}
_NAME_OF = {v: k for k, v in KV_TYPES.items()}
_ELEM_BYTES = {GGML_TYPE_F32: 4, GGML_TYPE_F16: 2, GGML_TYPE_BF16: 2}
_NP_STORE = {GGML_TYPE_F32: "<f4", GGML_TYPE_F16: "<f2", GGML_TYPE_BF16: "<u2"}


class SeqStateError(PermeantError, ValueError):
    """A llama.cpp sequence-state blob that this module cannot read or that does not fit."""


class SlidingWindowUnsupported(SeqStateError):
    """A model with sliding-window attention: llama.cpp keeps its state as two sub-states
    (global layers, then sliding layers holding only the last window of cells), which this
    codec neither reads nor writes yet."""

    def __init__(self, what: str):
        super().__init__(
            f"{what} uses sliding-window attention; moving its KV state to or from llama.cpp "
            f"is not supported yet (llama.cpp keeps such a state as two sub-states)")


@dataclass
class SeqStateInfo:
    """Everything in a sequence-state blob besides the tensors (what `build_seq_state` needs
    to reproduce it byte for byte)."""

    seq_id: int
    n_stream: int
    stream: int  # index of the stream holding the cells
    n_cells: int
    n_layer: int
    v_trans: bool
    kv_dtype: str  # "f32" | "f16" | "bf16" (K and V)
    positions: list[int] = field(default_factory=list)
    cell_seq_ids: list[list[int]] = field(default_factory=list)
    n_embd_k: int = 0
    n_embd_v: int = 0
    nbytes: int = 0


# --- parsing --------------------------------------------------------------------------------

class _Reader:
    def __init__(self, blob):
        self.mv = memoryview(blob).cast("B")
        self.off = 0

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
    arr = np.frombuffer(raw, dtype=_NP_STORE[ggml_type], count=count)
    if ggml_type == GGML_TYPE_BF16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def _kv_type(t: int, what: str) -> int:
    if t not in _ELEM_BYTES:
        raise SeqStateError(
            f"{what} type {t} is not supported (f32=0, f16=1, bf16=30; quantized KV caches are "
            f"not migrated)")
    return t


def _parse(blob, n_layers: int | None, n_kv_heads: int | None, head_dim: int | None,
           want_tensors: bool):
    r = _Reader(blob)
    magic, seq_id, n_stream = r.unpack("<IiI")
    if magic != SEQ_STATE_MAGIC:
        raise SeqStateError(f"not a llama.cpp sequence state (magic {magic:#x})")
    found = None
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
        if n_layers is not None and n_layer != n_layers:
            raise SeqStateError(f"state has {n_layer} layers, expected {n_layers}")
        k_type = v_type = None
        n_embd_k = n_embd_v = 0
        for _ in range(n_layer):
            (t, row) = r.unpack("<iQ")
            t = _kv_type(t, "K")
            if k_type is not None and t != k_type:
                raise SeqStateError("K type differs between layers")
            k_type = t
            n_embd_k = row // _ELEM_BYTES[t]
            raw = r.take(row * n_cells)
            if want_tensors:
                keys.append(_to_f32(raw, t, n_embd_k * n_cells))
        for _ in range(n_layer):
            if v_trans:
                t, el, n_embd = r.unpack("<iII")
                t = _kv_type(t, "V")
                if el != _ELEM_BYTES[t]:
                    raise SeqStateError(f"V element size {el} does not fit type {t}")
            else:
                t, row = r.unpack("<iQ")
                t = _kv_type(t, "V")
                n_embd = row // _ELEM_BYTES[t]
            if v_type is not None and t != v_type:
                raise SeqStateError("V type differs between layers")
            v_type = t
            n_embd_v = n_embd
            raw = r.take(n_embd * n_cells * _ELEM_BYTES[t])
            if want_tensors:
                values.append(_to_f32(raw, t, n_embd * n_cells))
        if k_type != v_type:
            raise SeqStateError(f"K type {k_type} and V type {v_type} differ (not supported)")
        found = SeqStateInfo(
            seq_id=seq_id, n_stream=n_stream, stream=s, n_cells=n_cells, n_layer=n_layer,
            v_trans=bool(v_trans), kv_dtype=_NAME_OF[k_type], positions=positions,
            cell_seq_ids=cell_seq, n_embd_k=n_embd_k, n_embd_v=n_embd_v,
        )
    if r.off != len(r.mv):
        raise SeqStateError(f"{len(r.mv) - r.off} trailing bytes after the sequence state")
    if found is None:
        found = SeqStateInfo(seq_id=seq_id, n_stream=n_stream, stream=0, n_cells=0, n_layer=0,
                             v_trans=False, kv_dtype="f16")
    found.nbytes = len(r.mv)
    if not want_tensors:
        return found, [], []
    hk = n_kv_heads
    if hk is None or head_dim is None:
        raise ValueError("n_kv_heads and head_dim are needed to shape the tensors")
    n = found.n_cells
    if n and (found.n_embd_k != hk * head_dim or found.n_embd_v != hk * head_dim):
        raise SeqStateError(
            f"state rows hold K {found.n_embd_k} / V {found.n_embd_v} values, expected "
            f"{hk} kv heads x {head_dim} = {hk * head_dim}")
    ks = [np.ascontiguousarray(k.reshape(n, hk, head_dim).transpose(1, 0, 2)) for k in keys]
    if found.v_trans:
        vs = [np.ascontiguousarray(v.reshape(hk, head_dim, n).transpose(0, 2, 1)) for v in values]
    else:
        vs = [np.ascontiguousarray(v.reshape(n, hk, head_dim).transpose(1, 0, 2)) for v in values]
    return found, ks, vs


def seq_state_info(blob) -> SeqStateInfo:
    """Header facts of a blob (positions, dtype, v_trans, ...) without decoding the tensors."""
    info, _, _ = _parse(blob, None, None, None, want_tensors=False)
    return info


def parse_seq_state(blob, n_layers: int, n_kv_heads: int, head_dim: int
                    ) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """A llama.cpp per-sequence state -> (positions, keys, values).

    keys / values: one float32 array per layer shaped (n_kv_heads, n_cells, head_dim), cells in
    the blob's order (the order of `positions`); f16 / bf16 are widened exactly. K is post-RoPE
    in llama.cpp's (interleaved) layout. `seq_state_info(blob)` gives the rest (dtype, v_trans)."""
    info, ks, vs = _parse(blob, n_layers, n_kv_heads, head_dim, want_tensors=True)
    return info.positions, ks, vs


# --- writing: one serializer, a counting writer and a buffer writer -------------------------

class SeqStateWriter(Protocol):
    """Where `write_seq_state` puts its output (llama.cpp's `llama_io_write_i`)."""

    def write(self, data: bytes) -> None:
        """Raw header bytes."""

    def write_tensor(self, x: np.ndarray, ggml_type: int) -> None:
        """A float array, converted to `ggml_type` and written in x's index order (C order of
        the possibly transposed view)."""

    def n_bytes(self) -> int:
        """Bytes written so far."""


class CountingWriter:
    """Counts what would be written (llama.cpp's `llama_io_write_dummy`); reads no tensor data,
    so zero-stride broadcast placeholders size a blob for free."""

    def __init__(self) -> None:
        self._n = 0

    def write(self, data: bytes) -> None:
        self._n += len(data)

    def write_tensor(self, x: np.ndarray, ggml_type: int) -> None:
        self._n += x.size * _ELEM_BYTES[ggml_type]

    def n_bytes(self) -> int:
        return self._n


class BufferWriter:
    """Writes into a preallocated buffer (llama.cpp's `llama_io_write_buffer`): each tensor is
    converted straight into place, one pass, no concatenation; overflow raises."""

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        self._n = 0

    def _room(self, n: int) -> None:
        if self._n + n > len(self.buf):
            raise ValueError(f"sequence state overflows its buffer of {len(self.buf)} bytes")

    def write(self, data: bytes) -> None:
        self._room(len(data))
        self.buf[self._n:self._n + len(data)] = data
        self._n += len(data)

    def write_tensor(self, x: np.ndarray, ggml_type: int) -> None:
        nbytes = x.size * _ELEM_BYTES[ggml_type]
        self._room(nbytes)
        dst = np.frombuffer(self.buf, dtype=_NP_STORE[ggml_type], count=x.size,
                            offset=self._n).reshape(x.shape)
        if ggml_type == GGML_TYPE_BF16:
            dst[...] = _bf16_bits(np.asarray(x, dtype=np.float32))
        else:
            dst[...] = x  # numpy's cast: round to nearest even for f16
        self._n += nbytes

    def n_bytes(self) -> int:
        return self._n


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (quiet NaN kept NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(x)
    out = rounded.astype("<u2")
    if nan.any():
        out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype("<u2")
    return out


def _as_heads(t, what: str, i: int) -> np.ndarray:
    a = t if isinstance(t, np.ndarray) else np.asarray(t)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{what}[{i}] must be (n_kv_heads, seq, head_dim), got {a.shape}")
    return a


def write_seq_state(w: SeqStateWriter, positions: Sequence[int], keys: Sequence[np.ndarray],
                    values: Sequence[np.ndarray], *, kv_dtype: str, v_trans: bool,
                    seq_id: int = 0, n_stream: int = 1, stream: int = 0) -> int:
    """The one serializer of a single-sequence blob (the layout in this module's docstring).
    Validates the shapes, writes through `w`, returns the bytes written. See `build_seq_state`
    for the arguments."""
    if kv_dtype not in KV_TYPES:
        raise ValueError(f"kv_dtype must be one of {sorted(KV_TYPES)}, got {kv_dtype!r}")
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} K layers but {len(values)} V layers")
    if not 0 <= stream < n_stream:
        raise ValueError(f"stream {stream} outside n_stream {n_stream}")
    t = KV_TYPES[kv_dtype]
    el = _ELEM_BYTES[t]
    n = len(positions)
    start = w.n_bytes()
    w.write(struct.pack("<IiI", SEQ_STATE_MAGIC, seq_id, n_stream))
    for _ in range(stream):
        w.write(struct.pack("<I", 0))
    w.write(struct.pack("<I", n))
    if n:
        cells = np.empty((n, 3), dtype="<i4")
        cells[:, 0] = np.asarray(positions, dtype=np.int64)
        cells[:, 1] = 1
        cells[:, 2] = seq_id
        w.write(cells.tobytes())
        w.write(struct.pack("<II", 1 if v_trans else 0, len(keys)))
        for i, k in enumerate(keys):
            k = _as_heads(k, "keys", i)
            hk, sk, d = k.shape
            if sk != n:
                raise ValueError(f"keys[{i}] holds {sk} positions, positions has {n}")
            w.write(struct.pack("<iQ", t, hk * d * el))
            w.write_tensor(k.transpose(1, 0, 2), t)  # rows = cells
        for i, v in enumerate(values):
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
    return w.n_bytes() - start


def build_seq_state(positions: Sequence[int], keys: Sequence[np.ndarray],
                    values: Sequence[np.ndarray], *, kv_dtype: str = "f16", v_trans: bool,
                    seq_id: int = 0, n_stream: int = 1, stream: int = 0) -> bytearray:
    """The exact inverse of `parse_seq_state`: a blob `llama_state_seq_set_data` accepts.

    keys / values: per layer (n_kv_heads, seq, head_dim) (a leading batch axis of 1 is
    dropped), any float dtype; K post-RoPE in llama.cpp's interleaved layout. `kv_dtype` and
    `v_trans` must match the target context (its type_k / type_v, and v_trans = flash attention
    off), or llama.cpp refuses the blob. `n_stream` / `stream`: the target's stream count and
    the stream of the target sequence (1 / 0 with a unified KV cache).

    Returns a bytearray (compares equal to the bytes llama.cpp writes; `bytes(blob)` for an
    immutable copy), sized by a counting pass of the same serializer."""
    kw = {"kv_dtype": kv_dtype, "v_trans": v_trans, "seq_id": seq_id, "n_stream": n_stream,
          "stream": stream}
    size = write_seq_state(CountingWriter(), positions, keys, values, **kw)
    out = bytearray(size)
    w = BufferWriter(out)
    write_seq_state(w, positions, keys, values, **kw)
    assert w.n_bytes() == size
    return out


def seq_state_nbytes(n_cells: int, n_layers: int, n_embd_k: int, n_embd_v: int,
                     kv_dtype: str = "f16", n_stream: int = 1) -> int:
    """Size of a single-sequence blob (for cost models and progress bars): the serializer run
    with a counting writer over zero-cost placeholders of the right shapes."""
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
