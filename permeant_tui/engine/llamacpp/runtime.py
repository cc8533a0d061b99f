"""The llama.cpp runtime: one GGUF model, one sequence, greedy decoding, and its sequence
state in and out, through llama-cpp-python's low-level (ctypes) API.

`llama_cpp` is imported when a runtime is made, so this module imports without the optional
extra `permeant-tui[llamacpp]` installed.

First continued token after an attach: the per-sequence state holds the KV cells only, never
logits. To continue a conversation of ids[0..n-1], attach the KV of ids[:-1] (positions 0..n-2)
and replay the last token through decode (`greedy(n, from_ids_tail=ids[-1:])` or
`decode([ids[-1]])`): that one-token decode yields the logits of the next token. This is what
llama.cpp's own server does with a cached prompt (it always re-evaluates at least one token).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

import numpy as np

from .cells import LayerKV, caches_from_layers
from .codec import (
    KV_TYPES,
    SeqStateError,
    build_seq_state,
    build_seq_state_caches,
    seq_state_info,
)


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
    default here, so KV migrated from a float32 runtime is not rounded).

    A sliding-window model (n_swa > 0: Gemma 3) runs with llama.cpp's iSWA cache, whose state
    has two sub-states (codec.py); `layer_windows` (each layer's window, 0 for full attention,
    as `ModelIdentity.layer_windows()` or `gguf_arch.layer_windows` give it) says which layer
    is in which, for `attach_layers`. `swa_full` is llama.cpp's own default (True: the SWA
    cache has n_ctx cells); either way the state holds the window only."""

    def __init__(self, gguf_path: str, n_ctx: int = 4096, kv_dtype: str = "f32",
                 n_threads: int = 2, *, flash_attn: bool = False, n_batch: int = 512,
                 layer_windows: Sequence[int] | None = None, swa_full: bool | None = None,
                 verbose: bool = False):
        if kv_dtype not in KV_TYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(KV_TYPES)}, got {kv_dtype!r}")
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
        self.swa_full = swa_full
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
        # sliding window (0: none): llama.cpp then keeps an iSWA cache (two sub-states)
        self.n_swa = int(L.llama_model_n_swa(self._model))
        if layer_windows is not None and len(layer_windows) != self.n_layers:
            raise ValueError(f"{len(layer_windows)} layer windows for {self.n_layers} layers")
        if layer_windows is not None and any(w not in (0, self.n_swa) for w in layer_windows):
            raise SeqStateError(f"layer windows {sorted(set(layer_windows))} do not match "
                                f"llama.cpp's window {self.n_swa}")
        if layer_windows is None and self.n_swa == 0:
            layer_windows = [0] * self.n_layers
        self.layer_windows = list(layer_windows) if layer_windows is not None else None
        self.recurrent = any(bool(getattr(L, f)(self._model)) for f in
                             ("llama_model_is_recurrent", "llama_model_is_hybrid")
                             if hasattr(L, f))
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
        cp.type_k = KV_TYPES[self.kv_dtype]
        cp.type_v = KV_TYPES[self.kv_dtype]
        cp.no_perf = True
        if self.swa_full is not None:
            cp.swa_full = self.swa_full
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
    def check_state_supported(self) -> None:
        """Raise unless this model's sequence state has the layout the codec reads and writes
        (a unified or an iSWA KV cache; not a recurrent or hybrid memory)."""
        if self.recurrent:
            raise SeqStateError(f"{os.path.basename(self.gguf_path)} keeps recurrent state; "
                                f"its llama.cpp state cannot be moved yet")

    def get_seq_state(self) -> bytes:
        """llama.cpp's own state of seq 0 (the layout in codec.py)."""
        self.check_state_supported()
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
        self.check_state_supported()
        info = seq_state_info(blob)
        n_cells = max(c.n_cells for c in info.caches)
        if n_cells and (info.v_trans != self.v_trans or info.kv_dtype != self.kv_dtype):
            raise SeqStateError(
                f"blob is {info.kv_dtype} v_trans={info.v_trans}; this context is "
                f"{self.kv_dtype} v_trans={self.v_trans}")
        if n_cells > self.n_ctx:
            raise SeqStateError(f"{n_cells} cells exceed n_ctx {self.n_ctx}")
        want = 2 if self.n_swa else 1
        if len(info.caches) != want:
            raise SeqStateError(f"the state holds {len(info.caches)} KV cache(s); this model's "
                                f"llama.cpp context has {want}")
        L = self._L
        if fresh:
            self.reset()
        else:
            self.clear()
        n = L.llama_state_seq_set_data(self._ctx, _u8_ptr(blob), len(blob), 0)
        if n == 0:
            self.reset()
            raise SeqStateError("llama.cpp refused the sequence state (see its log)")
        self.n_past = info.n_past
        self.tokens = list(token_ids) if token_ids is not None else []
        return int(n)

    def attach_kv(self, positions: Sequence[int], keys, values,
                  token_ids: Sequence[int] | None = None, *, fresh: bool = True) -> int:
        """Build a blob from per-layer (n_kv_heads, seq, head_dim) tensors for this context's
        dtype and V layout, and set it (into a fresh context by default)."""
        blob = build_seq_state(positions, keys, values, kv_dtype=self.kv_dtype,
                               v_trans=self.v_trans)
        return self.set_seq_state(blob, token_ids, fresh=fresh)

    def state_blob(self, layers: Sequence[LayerKV]) -> bytearray:
        """A blob for this context from per-layer K/V (`cells.LayerKV`: a sliding layer holds
        its window), with this context's dtype, V layout and KV caches."""
        if self.layer_windows is None:
            raise SeqStateError(f"{os.path.basename(self.gguf_path)} has sliding-window layers: "
                                f"pass layer_windows to say which")
        return build_seq_state_caches(caches_from_layers(layers, self.layer_windows),
                                      kv_dtype=self.kv_dtype, v_trans=self.v_trans)

    def attach_layers(self, layers: Sequence[LayerKV], token_ids: Sequence[int] | None = None,
                      *, fresh: bool = True) -> int:
        """`state_blob(layers)` set into a fresh (default) or cleared context."""
        return self.set_seq_state(self.state_blob(layers), token_ids, fresh=fresh)

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
