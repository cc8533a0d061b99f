"""Per-layer logical K/V for export and import (USXF 1.1), on top of engine/kvcache.py.

Part of the cache boundary, one level up: this module never touches an mlx-lm cache object
itself; it reads layers through `kvcache.layer_states` and builds caches through
`kvcache.cache_from_layer_states`, so kvcache stays the only module that does.

A layer's logical K/V is what continuing needs: a full layer every position [0, n), a sliding
layer its last min(n, window) positions, oldest first (docs/USXF.md 2.1). A rotating layer is
rebuilt from them with offset n and ring index min(n, window), which mlx-lm treats exactly like
the ring it came from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import kvcache
from .kvcache import FULL, QUANTIZED, SLIDING, CacheLayoutError, LayerSpec, LayerState

if TYPE_CHECKING:
    import numpy as np


def stored_lengths(specs: list[LayerSpec], n: int) -> list[int]:
    return [spec.stored_length(n) for spec in specs]


def _numpy(a) -> tuple[np.ndarray, str]:
    import mlx.core as mx
    import numpy as np

    dtype = str(a.dtype).removeprefix("mlx.core.")
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a, copy=True), dtype


def logical_kv(cache: list, n: int) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Copies of every layer's logical K/V after n tokens, shaped (kv_heads, L_i, head_dim) with
    L_i = n on full layers and min(n, window) on sliding ones, and the dtype (bfloat16 as its
    uint16 bits). Raises CacheLayoutError for a quantized KV cache or a sliding layer that keeps
    leading tokens, CacheRewindError when a layer does not hold that point."""
    keys, values, dtype = [], [], ""
    for i, st in enumerate(kvcache.layer_states(cache, n)):
        if st.kind == QUANTIZED:
            raise CacheLayoutError(f"layer {i} holds a quantized KV cache: no float K/V to export")
        if st.kind == SLIDING and st.keep and n > st.window:
            raise CacheLayoutError(f"layer {i} keeps {st.keep} leading tokens beyond its window")
        if st.keys is None:
            raise CacheLayoutError(f"layer {i} is empty")
        want = st.spec.stored_length(n)
        if st.length != want:
            raise CacheLayoutError(f"layer {i} holds {st.length} positions, {want} expected")
        k, dtype = _numpy(st.keys[0])
        v, _ = _numpy(st.values[0])
        keys.append(k)
        values.append(v)
    return keys, values, dtype


def states_from_layers(specs: list[LayerSpec], keys: list, values: list,
                       n: int) -> list[LayerState]:
    """Layer states after n tokens from each layer's logical K/V, [1, kv_heads, L_i, head_dim]
    (MLX arrays): checks every stored length against the layer's spec first."""
    if len(keys) != len(specs) or len(values) != len(specs):
        raise CacheLayoutError(f"{len(keys)} K / {len(values)} V layers for a model of "
                               f"{len(specs)} layers")
    out = []
    for i, (k, v, spec) in enumerate(zip(keys, values, specs, strict=True)):
        want = spec.stored_length(n)
        if int(k.shape[2]) != want or int(v.shape[2]) != want:
            raise CacheLayoutError(f"layer {i} ({spec.kind}) carries {int(k.shape[2])} K / "
                                   f"{int(v.shape[2])} V positions; after {n} tokens it holds "
                                   f"{want}")
        if spec.kind == QUANTIZED:
            raise CacheLayoutError(f"layer {i}: a quantized KV cache cannot be built from floats")
        if n == 0:
            out.append(LayerState(spec.kind, None, None, 0, spec.window, spec.keep, 0))
        elif spec.kind == FULL:
            out.append(LayerState(FULL, k, v, n))
        else:
            if spec.keep and n > spec.window:
                raise CacheLayoutError(f"layer {i} keeps {spec.keep} leading tokens")
            out.append(LayerState(SLIDING, k, v, n, spec.window, spec.keep, want))
    return out


def cache_from_layers(model, keys: list, values: list, n: int) -> list:
    """An mlx-lm cache for `model` holding n tokens, from per-layer logical K/V (MLX arrays,
    [1, kv_heads, L_i, head_dim]); every layer checked against the model's own layout."""
    states = states_from_layers(kvcache.layer_specs(model), keys, values, n)
    return kvcache.cache_from_layer_states(model, states)


def states_from_full(model, keys: list, values: list) -> list[LayerState]:
    """Layer states from every layer's full K/V in token order, [1, kv_heads, n, head_dim] (a USXF
    payload, an old snapshot): a sliding layer keeps what mlx-lm would hold after n tokens."""
    return states_from_specs(kvcache.layer_specs(model), keys, values)


def states_from_specs(specs: list[LayerSpec], keys: list, values: list) -> list[LayerState]:
    if len(keys) != len(specs) or len(values) != len(specs):
        raise CacheLayoutError(f"{len(keys)} K / {len(values)} V layers for a model of "
                               f"{len(specs)} layers")
    out = []
    for i, (k, v, spec) in enumerate(zip(keys, values, specs, strict=True)):
        n = int(k.shape[2])
        if spec.kind == QUANTIZED:
            raise CacheLayoutError(f"layer {i}: a quantized KV cache cannot be built from floats")
        if n == 0:
            out.append(LayerState(spec.kind, None, None, 0, spec.window, spec.keep, 0))
        elif spec.kind == FULL:
            out.append(LayerState(FULL, k, v, n))
        elif n < spec.window:
            out.append(LayerState(SLIDING, k, v, n, spec.window, spec.keep, n))
        else:
            cut = n - spec.window

            def last(x, cut=cut, keep=spec.keep):
                return kvcache.concat([x[..., :keep, :], x[..., cut + keep:, :]])

            out.append(LayerState(SLIDING, last(k), last(v), n, spec.window, spec.keep,
                                  spec.window))
    return out
