"""What the snapshot's reader and writer share (engine/snapshot.py has the format): the format
names, the block and room sizes, the checksums and digests, and where a manifest's blocks live."""

from __future__ import annotations

from pathlib import Path

import xxhash

FORMAT = "permeant-kv/3"
FORMAT_V2 = "permeant-kv/2"
FORMAT_V1 = "permeant-kv/1"
FORMATS = (FORMAT, FORMAT_V2, FORMAT_V1)
# Tokens per block: small enough that a turn rewrites little (the tail is at most B - 1 tokens,
# 2.9 MB for the default model at B = 64), large enough that a restore reads at the speed of one
# file (docs/RESUME.md has the measurements behind the choice).
BLOCK_TOKENS = 64
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


def _covered(layer_meta: str, blocks: str, block_tokens: str) -> str:
    """What format 3's manifest checksum covers besides the tensor bytes."""
    return f"{layer_meta}\n{blocks}\n{block_tokens}"


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
