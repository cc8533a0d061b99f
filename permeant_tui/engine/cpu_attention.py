"""Prefill attention on MLX's CPU device, computed with numpy (OpenBLAS matmul, numpy's exp).

On the CPU device mlx-lm's `scaled_dot_product_attention` (`mx.fast.scaled_dot_product_attention`)
runs unfused, and its softmax is bound by MLX's CPU `exp` (about 20 ns an element against 2-4.5
ns for numpy's): at a context of 3,072 the softmax is half of a layer's attention, so the first
message after resuming a long agent waits on it. Here a prefill chunk's attention (queries
longer than one token, a plain KV cache, no attention sinks) is computed in float32 with numpy
instead: q @ k^T through OpenBLAS, a numpy softmax, @ v. Decode steps (one query), quantized
caches (`bits`) and Metal stay on mlx-lm's own function.

`install()` wraps the name `scaled_dot_product_attention` in `mlx_lm.models.base` and in every
mlx-lm model module already imported (each does `from .base import ...`); it is called after
each model load (engine/models.py) and is idempotent. `PERMEANT_CPU_ATTENTION=0` turns it off.
bench/prefill_attention.py measures it against MLX's in one process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# Fewer queries than this stay on MLX. A decode step (one query) is left to MLX as designed;
# from two queries on, the numpy path (its graph evaluation and copies of q, k, v included) was
# x1.3-2.6 faster than mx.fast's for one SmolLM2 layer at 128 to 3,072 keys (a one-off
# measurement, load 3; bench/prefill_attention.py measures whole forwards of 17+ tokens).
MIN_QUERIES = 2
ENV = "PERMEANT_CPU_ATTENTION"

_original: Any = None  # mlx_lm.models.base.scaled_dot_product_attention as mlx-lm defined it
_state = "off: not installed (no model loaded yet)"
_enabled = True  # switched by benchmarks and tests (set_enabled), without uninstalling
counts = {"numpy": 0, "mlx": 0}  # calls routed each way since install (tests, benchmarks)
_blas_threads: str | None = None  # what _one_blas_thread did, once


def _one_blas_thread() -> str:
    """numpy's wheels carry their own OpenBLAS (scipy-openblas), beside the system one MLX
    uses: two thread pools whose idle workers spin. With both at two threads on two cores, a
    17-token forward at 2,048 took 3.4 s against 0.45 s with numpy's at one thread (MLX's own:
    0.7 s). So numpy's OpenBLAS gets one thread, once; MLX's is left alone."""
    import ctypes
    import glob

    import numpy as np

    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "*openblas*"))):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(1)
                return f"numpy's OpenBLAS at one thread ({os.path.basename(path)})"
    return "numpy's BLAS left as it is (no bundled OpenBLAS found)"


def attention(queries, keys, values, scale: float, mask) -> Any:
    """softmax(scale * q @ k^T + mask) @ v in numpy float32, returned as an mx.array in the
    queries' dtype. q: (B, H, L, D); k, v: (B, H_kv, S, D) with H a multiple of H_kv (GQA);
    mask: None, "causal" (the last L of S keys: queries are the newest tokens) or an mx.array
    (boolean: True attends; else added to the scores) broadcastable to (B, H, L, S)."""
    global _blas_threads
    import mlx.core as mx
    import numpy as np

    if _blas_threads is None:
        _blas_threads = _one_blas_thread()
    dtype = queries.dtype
    if dtype != mx.float32:
        queries, keys, values = (a.astype(mx.float32) for a in (queries, keys, values))
    arrays = [queries, keys, values]
    if isinstance(mask, mx.array):
        arrays.append(mask)
    mx.eval(*arrays)
    q, k, v = np.array(queries), np.array(keys), np.array(values)
    B, H, L, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    # The query heads sharing a KV head are stacked into one matrix: one GEMM per KV head.
    q = q.reshape(B, H_kv, (H // H_kv) * L, D)
    q *= np.float32(scale)
    scores = np.matmul(q, k.transpose(0, 1, 3, 2)).reshape(B, H, L, S)
    # The most negative float, not -inf, as MLX does: a row with nothing to attend to (a
    # batch's left padding) comes out uniform, never NaN (NaN would reach the other rows
    # through v).
    low = np.finfo(np.float32).min
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        if L > 1:
            scores[..., S - L:][..., np.triu(np.ones((L, L), dtype=bool), k=1)] = low
    elif mask is not None:
        m = np.array(mask)
        if m.dtype == np.bool_:
            np.copyto(scores, low, where=~m)
        else:
            scores += m.astype(np.float32)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores *= 1.0 / scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores.reshape(B, H_kv, (H // H_kv) * L, S), v)
    out = mx.array(out.reshape(B, H, L, v.shape[-1]))
    return out if dtype == mx.float32 else out.astype(dtype)


def _routed(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx-lm's signature; the numpy path for a prefill chunk on the CPU device, else mlx-lm."""
    import mlx.core as mx

    if (_enabled and sinks is None and not hasattr(cache, "bits")
            and queries.shape[2] >= MIN_QUERIES and mx.default_device().type == mx.cpu):
        try:
            out = attention(queries, keys, values, scale, mask)
        except ValueError:
            # Under a function transformation (mx.compile, grad) arrays cannot be evaluated:
            # MLX's own kernel then.
            pass
        else:
            counts["numpy"] += 1
            return out
    counts["mlx"] += 1
    return _original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


def _model_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "mlx_lm.models.base"
                                  or name.startswith("mlx_lm.models."))]


def install() -> str:
    """Route prefill attention through `attention` on the CPU device. Idempotent; call after a
    model's module is imported (it patches the modules imported so far, and `base`, which later
    imports copy the name from). Returns the state label (`label()`)."""
    global _original, _state
    if os.environ.get(ENV, "1") == "0":
        _state = f"off ({ENV}=0)"
        return _state
    import mlx.core as mx

    if mx.default_device().type != mx.cpu:
        _state = "off: Metal keeps MLX's fused kernel"
        return _state
    from mlx_lm.models import base

    if _original is None:
        _original = base.scaled_dot_product_attention
    for module in _model_modules():
        if getattr(module, "scaled_dot_product_attention", None) is _original:
            module.scaled_dot_product_attention = _routed  # type: ignore[attr-defined]
    _state = (f"numpy on the CPU device (prefill chunks of {MIN_QUERIES}+ tokens, plain KV "
              f"cache; {ENV}=0 turns it off)")
    return _state


def uninstall() -> None:
    """Put mlx-lm's function back everywhere it was replaced."""
    global _state
    if _original is None:
        return
    for module in _model_modules():
        if getattr(module, "scaled_dot_product_attention", None) is _routed:
            module.scaled_dot_product_attention = _original  # type: ignore[attr-defined]
    _state = "off: uninstalled"


def set_enabled(on: bool) -> bool:
    """Switch the installed path at run time (benchmarks compare both in one process).
    Returns the previous setting."""
    global _enabled
    before, _enabled = _enabled, on
    return before


def installed() -> bool:
    from mlx_lm.models import base

    return base.scaled_dot_product_attention is _routed


def label() -> str:
    """For `permeant doctor`."""
    return _state if _blas_threads is None else f"{_state}; {_blas_threads}"
