"""llama.cpp side of cross-runtime KV migration (issue 6): read and write llama.cpp's
per-sequence state blob, and a small runtime around llama-cpp-python's low-level API.

No Textual import. `llama_cpp` is imported lazily (inside functions), so this module imports
without the optional extra `permeant-tui[llamacpp]` installed; only the runtime needs it.

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
set call returns 0).

RoPE layout: llama.cpp rotates the GGUF llama K rows with rope type NORM, i.e. "interleaved"
pairs (x0,x1),(x2,x3)... An MLX mlx_lm llama model loaded from the same GGUF with
rope_traditional=True (permeant_tui.engine.gguf) produces the same post-RoPE K layout, so its
cache goes in as it is. K from an MLX model loaded from HF safetensors (rope_traditional=False,
"half-split") must go through `permute_k_heads(k, "half-split", "interleaved")` first.

First continued token after an attach: the per-sequence state holds the KV cells only, never
logits. To continue a conversation of ids[0..n-1], attach the KV of ids[:-1] (positions 0..n-2)
and replay the last token through decode (`greedy(n, from_ids_tail=ids[-1:])` or
`decode([ids[-1]])`): that one-token decode yields the logits of the next token. This is what
llama.cpp's own server does with a cached prompt (it always re-evaluates at least one token).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SEQ_STATE_MAGIC = 0xAF143CD8

# ggml_type ids (ggml.h) of the KV types this module reads and writes
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_BF16 = 30
_TYPE_OF = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "bf16": GGML_TYPE_BF16}
_NAME_OF = {v: k for k, v in _TYPE_OF.items()}
_ELEM_BYTES = {GGML_TYPE_F32: 4, GGML_TYPE_F16: 2, GGML_TYPE_BF16: 2}
_NP_STORE = {GGML_TYPE_F32: "<f4", GGML_TYPE_F16: "<f2", GGML_TYPE_BF16: "<u2"}


class SeqStateError(ValueError):
    """A llama.cpp sequence-state blob that this module cannot read or that does not fit."""


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


# --- blob parsing ---------------------------------------------------------------------------

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


# --- blob building --------------------------------------------------------------------------

def _store(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """float array -> the stored element type (round to nearest even)."""
    if ggml_type == GGML_TYPE_F32:
        return x.astype("<f4", copy=False)
    if ggml_type == GGML_TYPE_F16:
        return x.astype("<f2")
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(x)
    out = rounded.astype("<u2")
    if nan.any():
        out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype("<u2")
    return out


def _as_heads(t, what: str, i: int) -> np.ndarray:
    a = np.asarray(t)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{what}[{i}] must be (n_kv_heads, seq, head_dim), got {a.shape}")
    return a


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
    immutable copy): the tensors are converted straight into it, one pass, no concatenation."""
    if kv_dtype not in _TYPE_OF:
        raise ValueError(f"kv_dtype must be one of {sorted(_TYPE_OF)}, got {kv_dtype!r}")
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} K layers but {len(values)} V layers")
    if not 0 <= stream < n_stream:
        raise ValueError(f"stream {stream} outside n_stream {n_stream}")
    t = _TYPE_OF[kv_dtype]
    el = _ELEM_BYTES[t]
    n = len(positions)
    n_layer = len(keys)
    segs: list = [struct.pack("<IiI", SEQ_STATE_MAGIC, seq_id, n_stream)]
    segs.extend(struct.pack("<I", 0) for _ in range(stream))
    segs.append(struct.pack("<I", n))
    if n:
        cells = np.empty((n, 3), dtype="<i4")
        cells[:, 0] = np.asarray(positions, dtype=np.int64)
        cells[:, 1] = 1
        cells[:, 2] = seq_id
        segs.append(cells.tobytes())
        segs.append(struct.pack("<II", 1 if v_trans else 0, n_layer))
        for i, k in enumerate(keys):
            k = _as_heads(k, "keys", i)
            hk, sk, d = k.shape
            if sk != n:
                raise ValueError(f"keys[{i}] holds {sk} positions, positions has {n}")
            segs.append(struct.pack("<iQ", t, hk * d * el))
            segs.append(k.transpose(1, 0, 2))  # rows = cells
        for i, v in enumerate(values):
            v = _as_heads(v, "values", i)
            hv, sv, d = v.shape
            if sv != n:
                raise ValueError(f"values[{i}] holds {sv} positions, positions has {n}")
            if v_trans:
                segs.append(struct.pack("<iII", t, el, hv * d))
                segs.append(v.transpose(0, 2, 1))  # rows = channels, each across all cells
            else:
                segs.append(struct.pack("<iQ", t, hv * d * el))
                segs.append(v.transpose(1, 0, 2))
    segs.extend(struct.pack("<I", 0) for _ in range(stream + 1, n_stream))
    total = sum(len(x) if isinstance(x, bytes) else x.size * el for x in segs)
    out = bytearray(total)
    off = 0
    for x in segs:
        if isinstance(x, bytes):
            out[off:off + len(x)] = x
            off += len(x)
            continue
        dst = np.frombuffer(out, dtype=_NP_STORE[t], count=x.size, offset=off).reshape(x.shape)
        if t == GGML_TYPE_BF16:
            dst[...] = _store(np.asarray(x, dtype=np.float32), t)
        else:
            dst[...] = x  # numpy's cast: round to nearest even for f16
        off += x.size * el
    return out


def seq_state_nbytes(n_cells: int, n_layers: int, n_embd_k: int, n_embd_v: int,
                     kv_dtype: str = "f16", n_stream: int = 1) -> int:
    """Size of a single-sequence blob (for cost models and progress bars)."""
    if n_cells == 0:
        return 12 + 4 * n_stream
    el = _ELEM_BYTES[_TYPE_OF[kv_dtype]]
    return (12 + 4 * n_stream + 12 * n_cells + 8
            + n_layers * (24 + n_cells * (n_embd_k + n_embd_v) * el))


def kv_from_mlx_cache(cache) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """An mlx_lm prompt cache (list of KVCache, batch 1) -> per-layer float32 numpy K and V
    shaped (n_kv_heads, offset, head_dim), ready for `build_seq_state`."""
    import mlx.core as mx

    ks, vs = [], []
    for c in cache:
        n = int(c.offset)
        k = c.keys[0, :, :n, :]
        v = c.values[0, :, :n, :]
        if k.dtype != mx.float32:
            k, v = k.astype(mx.float32), v.astype(mx.float32)
        ks.append(np.array(k))
        vs.append(np.array(v))
    return ks, vs


# --- RoPE layout ----------------------------------------------------------------------------

def permute_k_heads(k: np.ndarray, src_layout: str, dst_layout: str,
                    rotary_dim: int | None = None) -> np.ndarray:
    """K heads (..., head_dim) from one RoPE layout ("interleaved" | "half-split") to the other.

    Delegates to usxf.layout.convert_rope_layout (the one definition of the permutation)."""
    from .usxf.layout import convert_rope_layout

    return convert_rope_layout(np.asarray(k), src_layout, dst_layout, rotary_dim)


# --- runtime --------------------------------------------------------------------------------

def _u8_ptr(buf):
    """A uint8* over bytes (read only, no copy) or a bytearray (writable)."""
    if isinstance(buf, bytes):
        return ctypes.cast(ctypes.c_char_p(buf), ctypes.POINTER(ctypes.c_uint8))
    return (ctypes.c_uint8 * len(buf)).from_buffer(buf)


def _import_llama_cpp():
    import sys

    if "llama_cpp" not in sys.modules:
        # llama.cpp's OpenMP workers spin at every barrier by default; with 2 threads on 2 cores
        # shared with MLX or anything else, a decode step measured 20x slower (2 vs 50 tok/s).
        # libgomp reads this when llama.cpp's CPU library loads, i.e. on the first import.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            "llama-cpp-python is not installed; install the optional extra: "
            "pip install 'permeant-tui[llamacpp]' (builds llama.cpp, a few minutes)") from exc
    return llama_cpp


class LlamaCppRuntime:
    """One GGUF model in llama.cpp, one sequence (seq 0), greedy decoding.

    Every `prefill` and `set_seq_state` starts from a fresh context, so nothing (no prompt
    cache, no earlier cells) survives from a previous use. flash_attn=False (the default of
    llama-cpp-python's Llama) gives v_trans=True; the KV element type is `kv_dtype` (f32 by
    default here, so KV migrated from a float32 runtime is not rounded)."""

    def __init__(self, gguf_path: str, n_ctx: int = 4096, kv_dtype: str = "f32",
                 n_threads: int = 2, *, flash_attn: bool = False, n_batch: int = 512,
                 verbose: bool = False):
        if kv_dtype not in _TYPE_OF:
            raise ValueError(f"kv_dtype must be one of {sorted(_TYPE_OF)}, got {kv_dtype!r}")
        L = _import_llama_cpp()
        if not verbose:
            from llama_cpp import _logger

            _logger.set_verbose(False)
        if not os.path.isfile(gguf_path):
            raise FileNotFoundError(gguf_path)
        self._L = L
        self.gguf_path = str(gguf_path)
        self.n_ctx = int(n_ctx)
        self.kv_dtype = kv_dtype
        self.n_threads = int(n_threads)
        self.flash_attn = bool(flash_attn)
        self.v_trans = not self.flash_attn
        self.n_batch = int(n_batch)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self._model = L.llama_model_load_from_file(self.gguf_path.encode(), mp)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.gguf_path}")
        self._vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self._vocab))
        self.n_layers = int(L.llama_model_n_layer(self._model))
        n_head = int(L.llama_model_n_head(self._model))
        self.n_kv_heads = int(L.llama_model_n_head_kv(self._model))
        self.head_dim = int(self._meta_int("attention.key_length")
                            or L.llama_model_n_embd(self._model) // n_head)
        self._ctx = None
        self._batch = None
        self.n_past = 0
        self.tokens: list[int] = []
        self._logits: np.ndarray | None = None
        self.reset()

    # -- plumbing --
    def _meta_int(self, key_suffix: str) -> int | None:
        L = self._L
        buf = ctypes.create_string_buffer(256)
        arch_n = L.llama_model_meta_val_str(self._model, b"general.architecture", buf, 256)
        if arch_n < 0:
            return None
        key = f"{buf.value.decode()}.{key_suffix}".encode()
        if L.llama_model_meta_val_str(self._model, key, buf, 256) < 0:
            return None
        try:
            return int(buf.value.decode())
        except ValueError:
            return None

    def _free_ctx(self):
        if self._batch is not None:
            self._L.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._L.llama_free(self._ctx)
            self._ctx = None

    def close(self):
        self._free_ctx()
        if getattr(self, "_model", None):
            self._L.llama_model_free(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def reset(self):
        """Drop the context and make a fresh one (empty KV cache, no logits)."""
        L = self._L
        self._free_ctx()
        cp = L.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = self.n_batch
        cp.n_ubatch = self.n_batch
        cp.n_seq_max = 1
        cp.n_threads = self.n_threads
        cp.n_threads_batch = self.n_threads
        cp.flash_attn_type = (L.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn
                              else L.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cp.type_k = _TYPE_OF[self.kv_dtype]
        cp.type_v = _TYPE_OF[self.kv_dtype]
        cp.no_perf = True
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.n_past = 0
        self.tokens = []
        self._logits = None

    # -- compute --
    def decode(self, ids: Sequence[int]) -> np.ndarray:
        """Append tokens at the current position; returns the last token's logits."""
        L = self._L
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("decode needs at least one token")
        if self.n_past + len(ids) > self.n_ctx:
            raise ValueError(f"{self.n_past + len(ids)} tokens exceed n_ctx {self.n_ctx}")
        b = self._batch
        for a in range(0, len(ids), self.n_batch):
            chunk = ids[a:a + self.n_batch]
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = self.n_past + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 0
            b.logits[len(chunk) - 1] = 1
            rc = L.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            self.n_past += len(chunk)
            self.tokens.extend(chunk)
        ptr = L.llama_get_logits_ith(self._ctx, -1)
        self._logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        return self._logits

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Fresh context, then decode all of `ids`. Returns the last token's logits."""
        self.reset()
        return self.decode(ids)

    def logits_last(self) -> np.ndarray:
        """Logits after the last decoded token (none right after set_seq_state)."""
        if self._logits is None:
            raise RuntimeError(
                "no logits: the last operation was a reset or set_seq_state; decode (replay) "
                "the last token to get them")
        return self._logits.copy()

    def greedy(self, n: int, from_ids_tail: Sequence[int] | None = None) -> list[int]:
        """Decode `from_ids_tail` first when given (e.g. the last prompt token after an attach
        of all but it), then `n` greedy (argmax) tokens. Returns those n tokens; the last one
        is not decoded into the cache (llama.cpp's generate loop does the same)."""
        if from_ids_tail:
            self.decode(from_ids_tail)
        logits = self.logits_last()
        out: list[int] = []
        for i in range(n):
            t = int(np.argmax(logits))
            out.append(t)
            if i + 1 < n:
                logits = self.decode([t])
        return out

    # -- state --
    def get_seq_state(self) -> bytes:
        L = self._L
        size = L.llama_state_seq_get_size(self._ctx, 0)
        out = bytearray(size)
        n = L.llama_state_seq_get_data(self._ctx, _u8_ptr(out), size, 0)
        if n == 0 and size:
            raise RuntimeError("llama_state_seq_get_data failed")
        return bytes(memoryview(out)[:n])

    def clear(self):
        """Empty this context's KV cache (data too) without making a new context."""
        self._L.llama_memory_clear(self._L.llama_get_memory(self._ctx), True)
        self.n_past = 0
        self.tokens = []
        self._logits = None

    def set_seq_state(self, blob, token_ids: Sequence[int] | None = None, *,
                      fresh: bool = True) -> int:
        """Load a sequence state into seq 0 of a fresh context (default) or of this context
        emptied by `clear()` (fresh=False: skips re-allocating the KV buffer, which costs
        ~0.2 s at n_ctx 4096 f32). Either way no earlier cell survives. Returns bytes read.

        The position continues after the highest cell position; `token_ids` (optional, for
        bookkeeping) are the tokens the cells hold."""
        L = self._L
        info = seq_state_info(blob)
        if info.n_cells and (info.v_trans != self.v_trans or info.kv_dtype != self.kv_dtype):
            raise SeqStateError(
                f"blob is {info.kv_dtype} v_trans={info.v_trans}; this context is "
                f"{self.kv_dtype} v_trans={self.v_trans}")
        if info.n_cells > self.n_ctx:
            raise SeqStateError(f"{info.n_cells} cells exceed n_ctx {self.n_ctx}")
        if fresh:
            self.reset()
        else:
            self.clear()
        n = L.llama_state_seq_set_data(self._ctx, _u8_ptr(blob), len(blob), 0)
        if n == 0:
            self.reset()
            raise SeqStateError("llama.cpp refused the sequence state (see its log)")
        self.n_past = (max(info.positions) + 1) if info.positions else 0
        self.tokens = list(token_ids) if token_ids is not None else []
        return int(n)

    def attach_kv(self, positions: Sequence[int], keys, values,
                  token_ids: Sequence[int] | None = None, *, fresh: bool = True) -> int:
        """Build a blob from per-layer (n_kv_heads, seq, head_dim) tensors for this context's
        dtype and V layout, and set it (into a fresh context by default)."""
        blob = build_seq_state(positions, keys, values, kv_dtype=self.kv_dtype,
                               v_trans=self.v_trans)
        return self.set_seq_state(blob, token_ids, fresh=fresh)

    def save_state(self) -> bytes:
        """llama.cpp's own whole-context state (llama_state_get_data), for timing baselines."""
        L = self._L
        size = L.llama_state_get_size(self._ctx)
        out = bytearray(size)
        n = L.llama_state_get_data(self._ctx, _u8_ptr(out), size)
        return bytes(memoryview(out)[:n])

    def load_state(self, blob: bytes, n_past: int, *, fresh: bool = True) -> None:
        L = self._L
        if fresh:
            self.reset()
        else:
            self.clear()
        if L.llama_state_set_data(self._ctx, _u8_ptr(blob), len(blob)) != len(blob):
            raise RuntimeError("llama_state_set_data failed")
        self.n_past = n_past
