"""The one module that touches mlx-lm cache objects (KVCache, RotatingKVCache, QuantizedKVCache).

Everything else (generation, snapshots, export, the llama.cpp bridge) asks this module, never
`cache.keys` or `cache.offset`. A layer's state is read and rebuilt through mlx-lm's own
`state` / `from_state` contract, so a restored cache behaves exactly as the live one did
(engine/kvlayers.py builds USXF's per-layer K/V on LayerState, never on cache objects):

  full       KVCache: keys/values of every token so far (the buffer has spare capacity beyond
             `offset`; only the first `offset` positions are state).
  sliding    RotatingKVCache(max_size=window, keep): at most the last `window` tokens (plus the
             first `keep`), stored in a ring. mlx-lm's `_idx` says where the next token goes; after
             a multi-token update the ring is linear and may hold up to window - 1 + chunk tokens,
             of which only the last `window` matter to any later update.
  quantized  QuantizedKVCache: like full, each of K and V a (packed, scales, biases) triple.

`LayerState` is a layer in logical (token) order: a sliding layer carries min(offset, window)
tokens, oldest first, and `idx` (mlx-lm's ring index) so the ring is rebuilt bit for bit.
A rotating layer cannot be trimmed once it holds `window` tokens (mlx-lm's `trim_prompt_cache`
then returns 0 without error): `rewind` refuses loudly, and callers restore a `checkpoint` taken
at the turn boundary or rebuild by prefill. Recurrent state (ArraysCache) is refused at load.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelLoadError, PermeantError

FULL, SLIDING, QUANTIZED = "full", "sliding", "quantized"
KINDS = (FULL, SLIDING, QUANTIZED)


class UnsupportedModel(ModelLoadError):
    """The model keeps a kind of per-layer state this engine cannot persist (recurrent state)."""


class CacheRewindError(PermeantError):
    """A rewind that the cache cannot do (a sliding layer past its window, or too far back)."""


class CacheLayoutError(PermeantError):
    """Layer states that do not fit the model's cache layout (kind, window, lengths)."""


class WindowExceeded(PermeantError):
    """Full K/V asked of a sliding layer that no longer holds every token (export, bridge)."""

    def __init__(self, layer: int, window: int, n: int):
        self.layer, self.window, self.n = layer, window, n
        super().__init__(
            f"layer {layer} is a sliding-window layer holding only its last {window} tokens; "
            f"the full K/V of {n} tokens is not available (per-layer K/V: "
            f"kvlayers.logical_kv)")


@dataclass(frozen=True)
class LayerSpec:
    """What the model's make_cache gives a layer: kind, window (sliding), keep (sliding)."""

    kind: str
    window: int = 0
    keep: int = 0

    def stored_length(self, n: int) -> int:
        """Tokens a layer state holds after n tokens."""
        return min(n, self.window) if self.kind == SLIDING else n


@dataclass(frozen=True)
class LayerState:
    """One layer in logical order. keys/values: an MLX array [1, kv_heads, L, head_dim] (full,
    sliding), or a (packed, scales, biases) tuple (quantized)."""

    kind: str
    keys: object
    values: object
    offset: int  # tokens seen by the layer (the position of the next token)
    window: int = 0  # sliding: mlx-lm's max_size
    keep: int = 0  # sliding: leading tokens never rotated out
    idx: int = 0  # sliding: mlx-lm's _idx (ring position of the next write)
    group_size: int = 0  # quantized
    bits: int = 0  # quantized

    def __iter__(self):
        """A layer state unpacks as its (keys, values): `for k, v in states`."""
        return iter((self.keys, self.values))

    @property
    def length(self) -> int:
        return int(parts(self.keys)[0].shape[2])

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec(self.kind, self.window, self.keep)

    def meta(self) -> dict:
        d = {"kind": self.kind, "offset": self.offset, "length": self.length}
        if self.kind == SLIDING:
            d.update(window=self.window, keep=self.keep, idx=self.idx)
        if self.kind == QUANTIZED:
            d.update(group_size=self.group_size, bits=self.bits)
        return d


def parts(x) -> tuple:
    """An array or a tuple of arrays, as a tuple."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _cls():
    from mlx_lm.models import cache as c

    return c


# ---- model layout ---------------------------------------------------------------------------
def new_cache(model) -> list:
    return _cls().make_prompt_cache(model)


def batchable(cache: list) -> bool:
    """True when every layer can join mlx-lm's batched caches and come back out unchanged:
    KVCache, and RotatingKVCache without kept tokens (BatchRotatingKVCache drops `keep`)."""
    c = _cls()
    return all(type(layer) is c.KVCache
               or (type(layer) is c.RotatingKVCache and getattr(layer, "keep", 0) == 0)
               for layer in cache)


def spec_of(layer) -> LayerSpec:
    c = _cls()
    if type(layer) is c.KVCache:
        return LayerSpec(FULL)
    if type(layer) is c.RotatingKVCache:
        _, _, _, keep, max_size, _ = layer.state
        return LayerSpec(SLIDING, int(max_size), int(keep))
    if type(layer) is c.QuantizedKVCache:
        return LayerSpec(QUANTIZED)
    raise UnsupportedModel(f"cache type {type(layer).__name__} is not supported")


def layer_specs(model) -> list[LayerSpec]:
    """Each layer's cache kind as the model's own make_cache sets it up. Raises UnsupportedModel
    (one clear line) for recurrent or other state this engine cannot save and restore."""
    cache = new_cache(model)
    kinds = sorted({type(x).__name__ for x in cache})
    try:
        return [spec_of(x) for x in cache]
    except UnsupportedModel:
        raise UnsupportedModel(
            f"this model keeps per-layer state of kind {', '.join(kinds)}; Permeant can save and "
            "resume only attention KV caches (KVCache, RotatingKVCache, QuantizedKVCache), so "
            "recurrent / hybrid models (Mamba, Qwen3-Next, LFM2, ...) are not supported") from None


def kv_dtype(model) -> str:
    """The dtype the model's attention writes into its cache (one 1-token forward pass)."""
    import mlx.core as mx

    layer_specs(model)  # refuse unsupported caches before running the model
    cache = new_cache(model)
    model(mx.array([[0]]), cache=cache)
    st = layer_states(cache)[0]
    k = parts(st.keys)[-1] if st.kind == QUANTIZED else st.keys
    mx.eval(k)
    return str(k.dtype).removeprefix("mlx.core.")


# ---- reading a cache --------------------------------------------------------------------------
def cache_offset(cache: list | None) -> int:
    """Tokens in the cache (every layer agrees; `check_offsets` asserts it)."""
    if not cache:
        return 0
    return int(cache[0].offset)


def offsets(cache: list) -> list[int]:
    return [int(x.offset) for x in cache]


def check_offsets(cache: list, n: int) -> None:
    bad = [(i, o) for i, o in enumerate(offsets(cache)) if o != n]
    if bad:
        i, o = bad[0]
        raise CacheLayoutError(f"layer {i} holds {o} tokens, expected {n} (ids and K/V disagree)")


def eval_cache(cache: list) -> None:
    import mlx.core as mx

    mx.eval([x.state for x in cache])


def cache_nbytes(cache: list | None) -> int:
    return sum(int(x.nbytes) for x in cache) if cache else 0


def buffers(cache: list | None) -> list:
    """Each layer's K and V buffers as plain MLX arrays (full and sliding layers; a quantized
    layer's triples are left out): what an evicted agent offers the restore that follows
    (blockload.Donors)."""
    out: list = []
    for layer in cache or []:
        for a in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if a is not None and not isinstance(a, (tuple, list)) and a.ndim == 4:
                out.append(a)
    return out


def concat(xs: list):
    import mlx.core as mx

    xs = [x for x in xs if x.shape[2]]
    return xs[0] if len(xs) == 1 else mx.concatenate(xs, axis=2)


def _sliding_state(layer) -> LayerState:
    k, v, offset, keep, window, idx = layer.state
    offset, keep, window, idx = int(offset), int(keep), int(window), int(idx)
    if k is None or offset == 0:
        return _empty_sliding(window, keep)
    size = int(k.shape[2])
    if offset < window:  # nothing rotated out yet: the first `offset` slots, in order
        if idx != offset or size < offset:
            raise CacheLayoutError(f"rotating cache at offset {offset} has ring index {idx}")
        return LayerState(SLIDING, k[..., :offset, :], v[..., :offset, :], offset, window, keep,
                          offset)
    if idx == size:  # linear after a multi-token update: keep the last `window` (mlx-lm's _trim)
        cut = size - window
        if cut < 0:
            raise CacheLayoutError(f"rotating cache holds {size} < window {window} at {offset}")

        def last(x):
            return concat([x[..., :keep, :], x[..., cut + keep:, :]])

        return LayerState(SLIDING, last(k), last(v), offset, window, keep, window)
    if size != window or not keep < idx < window:
        raise CacheLayoutError(f"rotating cache of {size} slots, window {window}, index {idx}")

    def order(x):  # mlx-lm's _temporal_order
        return concat([x[..., :keep, :], x[..., idx:, :], x[..., keep:idx, :]])

    return LayerState(SLIDING, order(k), order(v), offset, window, keep, idx)


def window_rows(layer, a: int, b: int) -> tuple:
    """(K, V) of positions [a, b) of a rotating layer without kept tokens, as slices of its ring
    (two pieces joined at most), never a copy of the whole window: what a snapshot's window
    blocks and its manifest take from a sliding layer (engine/snapshot_write.py). Equal to
    positions [a, b) of the layer's state in logical order. CacheLayoutError if the layer does
    not hold them (any more)."""
    k, v, offset, keep, window, idx = layer.state
    offset, keep, window, idx = int(offset), int(keep), int(window), int(idx)
    if k is None or keep:
        raise CacheLayoutError("window rows of a layer that is empty or keeps tokens")
    size = int(k.shape[2])
    if offset < window or idx == size:  # linear: slot s holds position first + s
        first = 0 if offset < window else offset - size
        held = min(offset, window)  # the logical window (a longer linear ring holds more)
        slots = [(a - first, b - first)]
    elif size == window and 0 < idx < window:  # a ring: slot idx holds the oldest position
        held, first = window, offset - window
        s0 = (idx + a - first) % window
        slots = [(s0, s0 + b - a)] if s0 + b - a <= window else \
            [(s0, window), (0, s0 + b - a - window)]
    else:
        raise CacheLayoutError(f"rotating cache of {size} slots, window {window}, index {idx}")
    if not (offset - held <= a <= b <= offset):
        raise CacheLayoutError(f"positions {a}..{b} are not in a window holding "
                               f"{offset - held}..{offset}")

    def take(x):
        pieces = [x[..., s:e, :] for s, e in slots]
        return pieces[0] if len(pieces) == 1 else concat(pieces)

    return take(k), take(v)


def _empty_sliding(window: int, keep: int) -> LayerState:
    return LayerState(SLIDING, None, None, 0, window, keep, 0)


def layer_state(layer) -> LayerState:
    c = _cls()
    t = type(layer)
    if t is c.RotatingKVCache:
        return _sliding_state(layer)
    if t is c.KVCache:
        k, v, offset = layer.state
        n = int(offset)
        if k is None or n == 0:
            return LayerState(FULL, None, None, 0)
        return LayerState(FULL, k[..., :n, :], v[..., :n, :], n)
    if t is c.QuantizedKVCache:
        k, v, offset, group_size, bits = layer.state
        n = int(offset)
        if k is None or n == 0:
            return LayerState(QUANTIZED, None, None, 0, group_size=int(group_size),
                              bits=int(bits))
        return LayerState(QUANTIZED, tuple(x[..., :n, :] for x in k),
                          tuple(x[..., :n, :] for x in v), n, group_size=int(group_size),
                          bits=int(bits))
    raise UnsupportedModel(f"cache type {t.__name__} is not supported")


def layer_states(cache: list, n: int | None = None) -> list[LayerState]:
    """Every layer in logical order (lazy MLX slices that share the cache's memory). An empty
    layer has keys None and offset 0. With n: the state after the first n tokens, which a full
    layer always has and a sliding layer only while no token has left its window (else
    CacheRewindError)."""
    states = [layer_state(x) for x in cache]
    if n is None:
        return states
    return [_prefix(st, n, i) for i, st in enumerate(states)]


def _prefix(st: LayerState, n: int, i: int) -> LayerState:
    if st.offset == n:
        return st
    if n > st.offset:
        raise CacheRewindError(f"layer {i} holds {st.offset} tokens, {n} asked for")
    if st.kind == SLIDING and st.offset > st.window:
        raise CacheRewindError(f"layer {i} (sliding window {st.window}) no longer holds the "
                               f"first {n} of its {st.offset} tokens")
    if n == 0:
        return LayerState(st.kind, None, None, 0, st.window, st.keep, 0, st.group_size, st.bits)

    def cut(x):
        return tuple(a[..., :n, :] for a in x) if isinstance(x, tuple) else x[..., :n, :]

    # here a sliding layer has offset <= window, so n < window: it holds n tokens, ring at n
    idx = n if st.kind == SLIDING else 0
    return LayerState(st.kind, cut(st.keys), cut(st.values), n, st.window, st.keep, idx,
                      st.group_size, st.bits)


def kv_arrays(cache: list, n: int) -> tuple[list, list, str]:
    """Copies of the K/V of the first n tokens of every layer, shaped (kv_heads, n, head_dim), and
    the dtype (bfloat16 arrives as its uint16 bits). Raises WindowExceeded naming the first
    sliding layer that no longer holds all n tokens."""
    import mlx.core as mx
    import numpy as np

    keys, values, dtype = [], [], ""
    for i, st in enumerate(layer_states(cache)):
        if st.kind == QUANTIZED:
            raise CacheLayoutError(f"layer {i} holds a quantized KV cache: no float K/V to export")
        if st.offset < n:
            raise CacheLayoutError(f"layer {i} holds {st.offset} tokens, {n} asked for")
        if st.kind == SLIDING and st.offset > st.window:  # tokens have left the window
            raise WindowExceeded(i, st.window, n)
        k, v = st.keys[0, :, :n, :], st.values[0, :, :n, :]
        dtype = str(k.dtype).removeprefix("mlx.core.")
        if k.dtype == mx.bfloat16:
            k, v = k.view(mx.uint16), v.view(mx.uint16)
        keys.append(np.array(k, copy=True))
        values.append(np.array(v, copy=True))
    return keys, values, dtype


# ---- building a cache --------------------------------------------------------------------------
def _fresh(a):
    """A new MLX array object viewing `a` (no copy). mlx-lm updates a cache with item assignment,
    which rebinds that cache's own array object only: another cache or a checkpoint holding `a`
    never sees the write."""
    return None if a is None else a[...]


def ring_state(layer) -> tuple:
    """A rotating layer's own state as mlx-lm keeps it (keys, values, offset, keep, max_size,
    idx), its arrays as new array objects viewing the same memory: no copy. MLX never writes
    into memory another array still views (the layer's next in-place update copies instead,
    and a multi-token update makes new arrays anyway), so this holds the layer as it is now."""
    k, v, *meta = layer.state
    return (_fresh(k), _fresh(v), *meta)


def ring_from_state(state: tuple):
    """A rotating layer holding `state` (from ring_state), independent of any other."""
    k, v, *meta = state
    return _cls().RotatingKVCache.from_state((_fresh(k), _fresh(v), *meta))


def layer_from_state(st: LayerState, base: tuple | None = None):
    """An mlx-lm cache object holding `st` exactly (through the class's own from_state). `base`
    (full, quantized): (K, V) buffers holding `st` first, then room: the next update writes in
    place instead of growing (copying) the whole K/V; (sliding) the ring (K, V) in mlx-lm's
    physical order, which `st` views in logical order."""
    c = _cls()
    if st.kind == FULL:
        if st.offset == 0 or st.keys is None:
            return c.KVCache()
        k, v = base if base is not None else (st.keys, st.values)
        return c.KVCache.from_state((_fresh(k), _fresh(v), st.offset))
    if st.kind == QUANTIZED:
        if st.offset == 0 or st.keys is None:
            return c.QuantizedKVCache(group_size=st.group_size or 64, bits=st.bits or 8)
        k, v = base if base is not None else (st.keys, st.values)
        return c.QuantizedKVCache.from_state((
            tuple(_fresh(x) for x in k), tuple(_fresh(x) for x in v), st.offset,
            st.group_size, st.bits))
    if st.kind != SLIDING:
        raise CacheLayoutError(f"unknown layer kind {st.kind!r}")
    if st.offset == 0 or st.keys is None:
        return c.RotatingKVCache(max_size=st.window, keep=st.keep)
    if base is not None:  # the ring itself, laid out as mlx-lm keeps it (a snapshot's window)
        k, v = base
        return c.RotatingKVCache.from_state((_fresh(k), _fresh(v), st.offset, st.keep,
                                             st.window, st.idx))
    a = st.length - st.idx  # undo _temporal_order: [keep | ring from idx | ring up to idx]

    def ring(x):
        if a <= 0:
            return _fresh(x)
        return _fresh(concat([x[..., :st.keep, :], x[..., st.keep + a:, :],
                            x[..., st.keep:st.keep + a, :]]))

    return c.RotatingKVCache.from_state((ring(st.keys), ring(st.values), st.offset, st.keep,
                                         st.window, st.idx))


def validate_state(st: LayerState, spec: LayerSpec, n: int, i: int) -> None:
    """Raise CacheLayoutError unless `st` is exactly what layer i of this model holds after n
    tokens (kind, window, offset, stored length, ring index)."""
    if st.kind == QUANTIZED and spec.kind == FULL:
        spec = LayerSpec(QUANTIZED)  # a quantized cache is a storage form of full attention
    if st.spec != spec:
        raise CacheLayoutError(f"layer {i} is {st.kind} (window {st.window}), the model's is "
                               f"{spec.kind} (window {spec.window})")
    if st.offset != n:
        raise CacheLayoutError(f"layer {i} is at position {st.offset}, the ids hold {n} tokens")
    length = st.length if st.keys is not None else 0
    if length != spec.stored_length(n):
        raise CacheLayoutError(f"layer {i} stores {length} tokens; a {st.kind} layer after {n} "
                               f"tokens holds {spec.stored_length(n)}")
    if st.keys is not None and any(a.shape[2] != length for a in parts(st.keys) + parts(st.values)):
        raise CacheLayoutError(f"layer {i}: K and V lengths differ")
    if st.kind == SLIDING and n:
        ok = st.idx == n if n < st.window else st.keep < st.idx <= st.window
        if not ok:
            raise CacheLayoutError(f"layer {i}: ring index {st.idx} impossible at {n} tokens "
                                   f"(window {st.window})")


def cache_from_layer_states(model, states: list[LayerState],
                            bases: list[tuple | None] | None = None) -> list:
    """A cache for `model` holding `states` (as read from a snapshot; `bases`: per layer None or
    buffers with room, see layer_from_state). Checks every layer against the model's own layout
    first; raises CacheLayoutError."""
    specs = layer_specs(model)
    if len(states) != len(specs):
        raise CacheLayoutError(f"{len(states)} layer states for a model of {len(specs)} layers")
    n = states[0].offset if states else 0
    for i, (st, spec) in enumerate(zip(states, specs, strict=True)):
        validate_state(st, spec, n, i)
    bases = bases or [None] * len(states)
    return [layer_from_state(st, b) for st, b in zip(states, bases, strict=True)]


# ---- what a snapshot already holds ---------------------------------------------------------------
_PERSISTED = "_permeant_persisted"


def set_persisted(cache: list, clean: int, tag: object) -> None:
    """Record that positions [0, clean) of every full layer are stored as `tag` says (the
    snapshot's blocks): a later save need not re-read them. Rewinds lower `clean`."""
    for x in cache:
        setattr(x, _PERSISTED, (clean, tag))


def persisted(cache: list) -> tuple[int, object]:
    """(clean, tag) as set_persisted left them, `clean` lowered by every rewind since; (0, None)
    for a cache no snapshot was read into or written from (a prefill, an import)."""
    marks = [getattr(x, _PERSISTED, None) for x in cache]
    if not marks or any(m is None for m in marks) or any(m[1] is not marks[0][1] for m in marks):
        return 0, None
    return min(m[0] for m in marks), marks[0][1]


def lower_persisted(cache: list, n: int) -> None:
    """A rewind to n tokens: positions from n on are no longer the snapshot's."""
    for x in cache:
        mark = getattr(x, _PERSISTED, None)
        if mark is not None and mark[0] > n:
            setattr(x, _PERSISTED, (n, mark[1]))


def copy_cache(cache: list) -> list:
    """An independent copy: running the model on it never changes `cache` (the export's probe)."""
    return [layer_from_state(layer_state(x)) for x in cache]
