"""How USXF bytes are arranged and hashed: block-hash chain over token ids, chunk digests and
the payload digest, and the RoPE layout permutation of K heads (docs/USXF.md 3, 4, 6)."""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

from .spec import BLOCKS_DOMAIN, PAYLOAD_DOMAIN, ROPE_LAYOUTS

# hashlib releases the GIL on large buffers: two cores hash twice as fast
HASH_THREADS = 2


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as the uint32 little-endian bytes the manifest and the block hashes use."""
    return np.asarray(token_ids, dtype="<u4").tobytes()


def block_hashes(token_ids: Sequence[int] | np.ndarray | bytes, fingerprint: str,
                 block_size: int) -> list[bytes]:
    """The chain h[i] = xxh3_128(h[i-1] || tokens of block i), rooted in the model fingerprint.

    `token_ids` may be the uint32 little-endian bytes already (what the manifest holds)."""
    raw = token_ids if isinstance(token_ids, bytes) else token_bytes(token_ids)
    parent = xxhash.xxh3_128_digest(
        BLOCKS_DOMAIN + fingerprint.encode("ascii") + struct.pack("<I", block_size)
    )
    step = 4 * block_size
    out = []
    for i in range(0, len(raw), step):
        parent = xxhash.xxh3_128_digest(parent + raw[i:i + step])
        out.append(parent)
    return out


def chunk_ranges(length: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk_size, length)) for a in range(0, length, chunk_size)]


def chunk_digest(data) -> bytes:
    return hashlib.sha256(data).digest()


def chunk_digest_pieces(pieces: Iterable) -> bytes:
    h = hashlib.sha256()
    for p in pieces:
        h.update(p)
    return h.digest()


def payload_digest(length: int, chunk_size: int, digests: Sequence[bytes]) -> bytes:
    return hashlib.sha256(
        PAYLOAD_DOMAIN + struct.pack("<QI", length, chunk_size) + b"".join(digests)
    ).digest()


def hash_chunks(buf, chunk_size: int) -> list[bytes]:
    """SHA-256 of each chunk of a contiguous buffer, on a small thread pool."""
    mv = memoryview(buf).cast("B")
    ranges = chunk_ranges(len(mv), chunk_size)
    if len(ranges) <= 1:
        return [chunk_digest(mv[a:b]) for a, b in ranges]
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(lambda r: chunk_digest(mv[r[0]:r[1]]), ranges))


class SegmentedPayload:
    """The payload as a list of (offset, buffer) regions with zero gaps between them, hashed and
    written without ever concatenating it into one buffer."""

    def __init__(self, regions: list[tuple[int, memoryview]], length: int):
        self.regions = regions  # sorted, non-overlapping
        self.starts = [off for off, _ in regions]
        self.length = length

    def pieces(self, start: int, end: int):
        """Byte pieces (views and zero fills) covering [start, end)."""
        pos = start
        first = max(0, bisect.bisect_right(self.starts, start) - 1)
        for off, mv in self.regions[first:]:
            r_end = off + len(mv)
            if r_end <= pos:
                continue
            if off >= end:
                break
            if off > pos:
                yield bytes(off - pos)
                pos = off
            a, b = pos - off, min(end, r_end) - off
            yield mv[a:b]
            pos = off + b
        if pos < end:
            yield bytes(end - pos)

    def chunk_digest(self, start: int, end: int) -> bytes:
        return chunk_digest_pieces(self.pieces(start, end))

    def chunk_digests(self, chunk_size: int) -> list[bytes]:
        ranges = chunk_ranges(self.length, chunk_size)
        if len(ranges) <= 1:
            return [chunk_digest_pieces(self.pieces(a, b)) for a, b in ranges]
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            return list(pool.map(lambda r: chunk_digest_pieces(self.pieces(*r)), ranges))


def rope_permutation(head_dim: int, src: str, dst: str, rotary_dim: int | None = None) -> np.ndarray:
    """Index array p with converted = k[..., p], taking K from `src` to `dst` RoPE layout.

    interleaved pairs (x0,x1),(x2,x3),...; half-split pairs (x_i, x_{i+r/2}). Only the first
    `rotary_dim` dims (default all) rotate; the rest keep their place."""
    if src not in ROPE_LAYOUTS or dst not in ROPE_LAYOUTS:
        raise ValueError(f"rope layout must be one of {ROPE_LAYOUTS}, got {src!r} -> {dst!r}")
    r = head_dim if rotary_dim is None else rotary_dim
    if r % 2 or not 0 < r <= head_dim:
        raise ValueError(f"rotary_dim {r} must be even and within head_dim {head_dim}")
    to_half = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, head_dim)])
    if src == dst:
        return np.arange(head_dim)
    if src == "interleaved":
        return to_half
    return np.argsort(to_half)


def convert_rope_layout(k: np.ndarray, src: str, dst: str, rotary_dim: int | None = None) -> np.ndarray:
    """K heads (..., head_dim) re-ordered from one RoPE layout to the other (a new array)."""
    return np.ascontiguousarray(k[..., rope_permutation(k.shape[-1], src, dst, rotary_dim)])
