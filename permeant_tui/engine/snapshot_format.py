"""What the snapshot's reader and writer share (engine/snapshot.py has the format): the format
names, the block and room sizes, the checksums and digests, and where a manifest's blocks live."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import xxhash

FORMAT = "permeant-kv/5"
FORMAT_V4 = "permeant-kv/4"
FORMAT_V3 = "permeant-kv/3"
FORMAT_V2 = "permeant-kv/2"
FORMAT_V1 = "permeant-kv/1"
FORMATS = (FORMAT, FORMAT_V4, FORMAT_V3, FORMAT_V2, FORMAT_V1)
BLOCK_FORMATS = (FORMAT, FORMAT_V4, FORMAT_V3)  # a manifest plus blocks
WINDOW_FORMATS = (FORMAT, FORMAT_V4)  # sliding layers' windows in window blocks
# Tokens per block: small enough that a turn rewrites little (the tail is at most B - 1 tokens,
# 2.9 MB for the default model at B = 64), large enough that a restore reads at the speed of one
# file (docs/RESUME.md has the measurements behind the choice).
BLOCK_TOKENS = 64
# Tokens per compacted block (format 5): each whole run of 1,024 tokens from the start is one
# block, the rest up to the last whole B-token block stay B-token blocks. A B-token block holds
# each head's rows as a 16 KB run (the default model), and a restore of such runs reads at
# 1.23-1.33x a plain read of the same files against 0.81-0.86x for 1,024-token runs
# (bench/restore_layout.py). The save whose turn completes a run writes it once more as one
# block (47 MB for the default model); the B-token blocks it replaces are then collected.
COMPACT_TOKENS = 1024
MAX_SPAN = 1 << 16  # a manifest naming a larger block is refused before any read
# Tokens per window block (format 4): the sliding layers' positions that lie wholly inside their
# window, in blocks of their own; the manifest keeps only the positions before the first and
# after the last (fewer than 2 x 32 per layer), so a turn no longer rewrites whole windows
# (Gemma 3 12B: 1,024 positions x 40 sliding layers, 336 MB in bfloat16, at every save).
# 32, not 16: half the row groups to scatter and hash at a restore (53 against 78-100 ms for
# that model's 336 MB of windows), for at most 31 more positions a save.
WINDOW_BLOCK_TOKENS = 32
# A restored full layer gets the capacity the live cache had: its tokens rounded up to mlx-lm's
# growth step (KVCache.step), with at least ROOM_TOKENS free, so the next turn writes in place
# instead of growing (copying) every layer's K/V on its first step, and uses no more memory.
ROOM_TOKENS = 1
ROOM_STEP = 256
BLOCKS_DIR = "kv-blocks"
_MAX_HEADER = 16 << 20


def ids_digest(ids: list[int]) -> str:
    import numpy as np

    return xxhash.xxh3_128_hexdigest(np.asarray(ids, dtype=np.int32).tobytes())


def _tensor_checksum(arrays: list, layer_meta: str = "") -> str:
    """xxh3-128 over the per-layer meta (format 2; "" for format 1; format 3 adds the block
    list) and the tensor bytes."""
    import numpy as np

    h = xxhash.xxh3_128()
    h.update(layer_meta.encode())
    for a in arrays:
        # reshape + view, not memoryview.cast: an empty layer (an agent with no turns yet, or a
        # tail that is a whole number of blocks) has a zero in its shape, which memoryview
        # refuses to cast (issue 15); it adds no bytes
        h.update(np.ascontiguousarray(_np(a)).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _covered(layer_meta: str, blocks: str, block_tokens: str, window: str | None = None,
             window_tokens: str | None = None, spans: str | None = None) -> str:
    """What format 3's manifest checksum covers besides the tensor bytes; format 4 adds the
    window blocks and their size, format 5 the blocks' token counts."""
    base = f"{layer_meta}\n{blocks}\n{block_tokens}"
    base = base if window is None else f"{base}\n{window}\n{window_tokens}"
    return base if spans is None else f"{base}\n{spans}"


def covered_of(meta: dict) -> str:
    """What the checksum of a manifest with this metadata covers besides its tensor bytes, by
    its format (KeyError where a field the format needs is missing)."""
    fmt = meta.get("format")
    layer_meta = meta.get("layer_meta", "") if fmt != FORMAT_V1 else ""
    if fmt not in BLOCK_FORMATS:
        return layer_meta
    windowed = fmt in WINDOW_FORMATS
    return _covered(layer_meta, meta["blocks"], meta["block_tokens"],
                    meta["window_blocks"] if windowed else None,
                    meta["window_block_tokens"] if windowed else None,
                    meta["block_spans"] if fmt == FORMAT else None)


def block_spans(cut: int, block_tokens: int, compact: int = COMPACT_TOKENS) -> list[int]:
    """Token counts of the blocks a save of `cut` block positions writes (format 5): whole runs
    of `compact` tokens from the start, then B-token blocks (`compact` 0, or not a larger
    multiple of B within MAX_SPAN, which a restore refuses past: B-token blocks only)."""
    big = compact if block_tokens < compact <= MAX_SPAN and compact % block_tokens == 0 else 0
    n_big = cut // big if big else 0
    return [big] * n_big + [block_tokens] * ((cut - n_big * big) // block_tokens)


def span_ends(spans: list[int] | tuple[int, ...]) -> list[int]:
    """Where each block ends, in positions from the first block's start."""
    out, end = [], 0
    for s in spans:
        end += s
        out.append(end)
    return out


def _ranges(spans) -> list[tuple[int, int]]:
    ends = span_ends(spans)
    return [(e - s, e) for s, e in zip(spans, ends, strict=True)]


def blocks_on_disk(meta: dict) -> int:
    """Bytes of the blocks a manifest's metadata names (0 where it names none or is unreadable
    as such; the restore reports why)."""
    try:
        per_block = int(meta.get("block_bytes", 0))
        names = json.loads(meta.get("blocks", "[]"))
        windows = len(json.loads(meta.get("window_blocks", "[]"))) * \
            int(meta.get("window_block_bytes", 0))
        b = int(meta.get("block_tokens", BLOCK_TOKENS)) or BLOCK_TOKENS
        spans = json.loads(meta["block_spans"]) if "block_spans" in meta else [b] * len(names)
        from .blockstore import HEADER_SIZE

        if not isinstance(spans, list) or not all(type(s) is int for s in spans):
            return 0
        row = max(0, per_block - HEADER_SIZE) // b  # bytes of one token of every full layer
        full = sum(HEADER_SIZE + row * s for s in spans) if per_block else 0
        return full + windows
    except (ValueError, TypeError, KeyError, OverflowError):
        return 0


@dataclass(frozen=True)
class WindowPlan:
    """Where a snapshot of n tokens keeps its sliding layers' windows (format 4): every sliding
    layer holds positions [lo, n) (lo = n - min(n, W), one window W, no kept tokens); window
    blocks j0..j1-1 of B positions each hold [j0 * B, j1 * B), the manifest the head [lo, j0 * B)
    and the tail [j1 * B, n) of each."""

    layers: tuple[int, ...]
    window: int
    lo: int
    j0: int
    j1: int
    block_tokens: int

    @property
    def head(self) -> int:
        return self.j0 * self.block_tokens - self.lo

    def tail(self, n: int) -> int:
        return n - self.j1 * self.block_tokens


def window_plan(metas: list[dict], n: int, block_tokens: int = WINDOW_BLOCK_TOKENS
                ) -> WindowPlan | None:
    """The plan for layers described as LayerState.meta() gives them after n tokens, or None
    when no window block applies: no sliding layer holds a token, sliding layers differ in
    window or keep tokens (their windows then stay whole in the manifest, as in format 3), or
    the window spans no whole block yet."""
    sliding = [(i, m) for i, m in enumerate(metas) if m.get("kind") == "sliding"]
    if not sliding or n <= 0 or any(not m.get("length") for _, m in sliding):
        return None
    windows = {m.get("window") for _, m in sliding}
    if len(windows) != 1 or any(m.get("keep") for _, m in sliding):
        return None
    (window,) = windows
    if not isinstance(window, int) or window <= 0:
        return None
    lo = n - min(n, window)
    j0, j1 = -(-lo // block_tokens), n // block_tokens
    if j1 <= j0:
        return None
    return WindowPlan(tuple(i for i, _ in sliding), window, lo, j0, j1, block_tokens)


def window_chain(ids, fingerprint: str, block_tokens: int) -> list[bytes]:
    """The window blocks' chain: USXF's chained block hashes under their own root (the model
    fingerprint + "/window"), so a window block is never taken for a full-layer block."""
    from .blockstore import chain_hashes

    return chain_hashes(ids, fingerprint + "/window", block_tokens)


@dataclass(frozen=True)
class BlockTag:
    """What a cache was last read from or saved as (kvcache.set_persisted's tag): the full
    blocks' names, and the window blocks' names from block `window_first` on."""

    full: tuple[str, ...]
    window_first: int = 0
    window: tuple[str, ...] = ()
    spans: tuple[int, ...] = ()  # the full blocks' token counts (format 5; else B each)

    def known_full(self, spans: list[int], block_tokens: int) -> tuple[str, ...]:
        """The names this tag holds for blocks of the given token counts from position 0 ("" for
        a block whose range it does not hold as one block)."""
        own = self.spans or (block_tokens,) * len(self.full)
        if len(own) != len(self.full):
            return ("",) * len(spans)
        mine = dict(zip(_ranges(own), self.full, strict=True))
        return tuple(mine.get(r, "") for r in _ranges(spans))

    def known_window(self, j0: int, j1: int) -> tuple[str, ...]:
        """The names this tag holds for window blocks j0..j1-1 ("" where it has none)."""
        return tuple(self.window[j - self.window_first]
                     if 0 <= j - self.window_first < len(self.window) else ""
                     for j in range(j0, j1))


def _np(a):
    """An MLX array as numpy without a copy where possible (bfloat16 viewed as uint16)."""
    import mlx.core as mx
    import numpy as np

    if isinstance(a, np.ndarray):
        return a
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a, copy=False)


def default_store(path: Path) -> Path:
    """The block folder of the manifest at `path`: the workspace's `kv-blocks` for
    `<workspace>/agents/<id>/kv.safetensors`, else a `kv-blocks` beside the file."""
    path = Path(path)
    if path.parent.parent.name == "agents":
        return path.parent.parent.parent / BLOCKS_DIR
    return path.parent / BLOCKS_DIR
