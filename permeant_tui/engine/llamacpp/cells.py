"""Model layers <-> llama.cpp's KV caches for one sequence. Pure numpy.

The engine (MLX caches, snapshots, USXF 1.1) keeps K/V per model layer: a full-attention layer
every position [0, n), a sliding layer its last min(n, window) positions, starting at
n - min(n, window) (`LayerKV.start`). llama.cpp keeps them per KV cache (codec.py): one cache
for a model without sliding layers; for a model with them (Gemma 3) an iSWA cache, whose base
cache holds the full-attention layers and whose SWA cache the sliding ones, each with its own
cells and their positions. `cache_groups` says which model layer lives in which cache, in
llama.cpp's order (layer index order within a cache).

Both directions check what they are given: every layer of a cache holds the same positions, the
positions are consecutive, and a sliding layer holds no more than its window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .codec import CacheCells, SeqStateError, SlidingWindowUnsupported


@dataclass(frozen=True)
class LayerKV:
    """One model layer's K and V, (n_kv_heads, L, head_dim), holding positions
    [start, start + L) in order."""

    start: int
    keys: np.ndarray
    values: np.ndarray

    @property
    def length(self) -> int:
        return int(self.keys.shape[1])

    @property
    def end(self) -> int:
        return self.start + self.length


def cache_groups(windows: Sequence[int]) -> list[list[int]]:
    """Model layer indices per llama.cpp KV cache: [every layer] without sliding layers,
    [full-attention layers, sliding layers] (iSWA) with them. `windows`: each layer's sliding
    window, 0 for full attention (`ModelIdentity.layer_windows()`)."""
    full = [i for i, w in enumerate(windows) if not w]
    sliding = [i for i, w in enumerate(windows) if w]
    if not sliding:
        return [full]
    if len({windows[i] for i in sliding}) > 1:
        raise SlidingWindowUnsupported(
            "the model", "its sliding layers have different windows (llama.cpp has one)")
    return [full, sliding]


def _positions(c: CacheCells, which: str) -> tuple[int, np.ndarray | None]:
    """(first position, the permutation putting cells in position order or None if they are)."""
    pos = np.asarray(c.positions, dtype=np.int64)
    if pos.size == 0:
        return 0, None
    order = None
    if (np.diff(pos) < 0).any():
        order = np.argsort(pos, kind="stable")
        pos = pos[order]
    if (pos != pos[0] + np.arange(pos.size)).any():
        raise SeqStateError(f"the {which} cache's positions are not consecutive "
                            f"({int(pos[0])}..{int(pos[-1])} in {pos.size} cells)")
    return int(pos[0]), order


def layers_from_caches(caches: Sequence[CacheCells], windows: Sequence[int], n_kv_heads: int,
                       head_dim: int) -> list[LayerKV]:
    """A parsed state (`codec.parse_seq_state_caches`) -> one LayerKV per model layer, cells in
    position order. An empty cache gives its layers zero positions at the other cache's end."""
    groups = cache_groups(windows)
    if len(caches) != len(groups):
        raise SeqStateError(
            f"the state holds {len(caches)} KV cache(s); this model's layers "
            f"({'with' if len(groups) > 1 else 'without'} sliding windows) need {len(groups)}")
    n = max((max(c.positions) + 1 for c in caches if len(c.positions)), default=0)
    out: list[LayerKV | None] = [None] * len(windows)
    empty = np.zeros((n_kv_heads, 0, head_dim), np.float32)
    for g, c, which in zip(groups, caches, ("base", "SWA"), strict=False):
        if not len(c.positions):
            for i in g:
                out[i] = LayerKV(n, empty, empty)
            continue
        if len(c.keys) != len(g) or len(c.values) != len(g):
            raise SeqStateError(f"the {which} cache has {len(c.keys)} layers; this model has "
                                f"{len(g)} there")
        start, order = _positions(c, which)
        for i, k, v in zip(g, c.keys, c.values, strict=True):
            if order is not None:
                k, v = k[:, order], v[:, order]
            out[i] = LayerKV(start, k, v)
    layers = [x for x in out if x is not None]
    check_layers(layers, windows)
    return layers


def caches_from_layers(layers: Sequence[LayerKV], windows: Sequence[int]) -> list[CacheCells]:
    """Per-layer K/V -> the cells of each llama.cpp KV cache (for `build_seq_state_caches`)."""
    check_layers(layers, windows)
    out = []
    for g in cache_groups(windows):
        first = layers[g[0]]
        for i in g[1:]:
            if (layers[i].start, layers[i].length) != (first.start, first.length):
                raise SeqStateError(
                    f"layers {g[0]} and {i} share a llama.cpp KV cache but hold positions "
                    f"[{first.start}, {first.end}) and [{layers[i].start}, {layers[i].end})")
        out.append(CacheCells(range(first.start, first.end), [layers[i].keys for i in g],
                              [layers[i].values for i in g]))
    return out


def check_layers(layers: Sequence[LayerKV], windows: Sequence[int]) -> None:
    """Every layer ends at the same position; a full layer starts at 0; a sliding one holds at
    most its window."""
    if len(layers) != len(windows):
        raise SeqStateError(f"{len(layers)} layers of K/V for a model of {len(windows)} layers")
    ends = {x.end for x in layers}
    if len(ends) > 1:
        raise SeqStateError(f"layers end at different positions: {sorted(ends)}")
    for i, (x, w) in enumerate(zip(layers, windows, strict=True)):
        if x.keys.shape != x.values.shape:
            raise SeqStateError(f"layer {i}: K {x.keys.shape} and V {x.values.shape} differ")
        if not w and x.start != 0:
            raise SeqStateError(f"layer {i} (full attention) starts at position {x.start}")
        if w and x.length > w:
            raise SeqStateError(f"layer {i} holds {x.length} positions, its window is {w}")


def layers_from_payload(keys: Sequence[np.ndarray], values: Sequence[np.ndarray],
                        n: int) -> list[LayerKV]:
    """A USXF 1.1 payload (or the engine's logical K/V) after n tokens: layer i holds its last
    L_i positions, so it starts at n - L_i."""
    return [LayerKV(n - int(k.shape[1]), k, v) for k, v in zip(keys, values, strict=True)]


def payload_from_layers(layers: Sequence[LayerKV], windows: Sequence[int], n: int
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-layer K/V -> what the engine and USXF 1.1 keep after n tokens: [0, n) on a full
    layer, the last min(n, window) positions on a sliding one."""
    check_layers(layers, windows)
    ks, vs = [], []
    for i, (x, w) in enumerate(zip(layers, windows, strict=True)):
        want = min(n, w) if w else n
        if x.end != n or x.length < want:
            raise SeqStateError(f"layer {i} holds positions [{x.start}, {x.end}); after {n} "
                                f"tokens it must hold the last {want}")
        cut = x.length - want
        ks.append(x.keys[:, cut:])
        vs.append(x.values[:, cut:])
    return ks, vs


def before(layers: Sequence[LayerKV], m: int) -> list[LayerKV]:
    """The cells at positions < m: the state to attach so that position m-1 can be replayed
    (a sliding layer then holds one cell fewer than llama.cpp would keep after m tokens: that
    oldest cell is outside the window of the position replayed, so nothing reads it)."""
    out = []
    for i, x in enumerate(layers):
        if m < x.start:
            raise SeqStateError(f"layer {i} starts at position {x.start}, after {m}")
        keep = min(x.length, m - x.start)
        out.append(LayerKV(x.start, x.keys[:, :keep], x.values[:, :keep]))
    return out
