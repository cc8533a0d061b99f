"""Rewinding a cache (kvcache's cache objects, through mlx-lm's own trim): drop the last tokens
by trimming where every layer can, else go back to a checkpoint taken at the turn boundary
(a rotating layer that holds its whole window cannot be trimmed). Split from engine/kvcache.py,
which stays the one module that reads and builds cache objects."""

from __future__ import annotations

from dataclasses import dataclass, field

from .kvcache import (
    CacheRewindError,
    _cls,
    cache_offset,
    check_offsets,
    lower_persisted,
    offsets,
    persisted,
    ring_from_state,
    ring_state,
    set_persisted,
)


def always_trimmable(cache: list | None) -> bool:
    """No sliding layer: every layer can drop its last tokens (what engine/lookup.py needs)."""
    return bool(cache) and all(type(x) is not _cls().RotatingKVCache for x in cache or [])


def can_rewind(cache: list, n: int) -> bool:
    """True when the last n tokens can be dropped by trimming (mlx-lm's can_trim_prompt_cache: a
    rotating layer that holds its whole window cannot be trimmed at all)."""
    if n <= 0:
        return True
    if not cache or n > min(offsets(cache)):
        return False
    return bool(_cls().can_trim_prompt_cache(cache))


def rewind(cache: list, n: int) -> None:
    """Drop the last n tokens of every layer (O(1)), or raise CacheRewindError; never a partial
    or silent trim."""
    if n <= 0:
        return
    before = offsets(cache)
    if not can_rewind(cache, n):
        raise CacheRewindError(
            f"cannot rewind {n} of {min(before) if before else 0} tokens by trimming: "
            + ("a sliding-window layer holds its whole window"
               if cache and n <= min(before) else "not that many tokens in the cache"))
    lower_persisted(cache, min(before) - n)
    _cls().trim_prompt_cache(cache, n)
    after = offsets(cache)
    if after != [b - n for b in before]:
        raise CacheRewindError(f"trim left layers at {sorted(set(after))}, expected "
                               f"{before[0] - n}")


@dataclass
class Checkpoint:
    """What rewinding to `offset` needs once trimming no longer can: each sliding layer's ring as
    it is (kvcache.ring_state: views, no copy; at 4k tokens a copy of Gemma 3 12B's 40 windows
    took 65 ms at every turn on a CPU). Full layers are trimmed back."""

    offset: int
    sliding: dict[int, tuple] = field(default_factory=dict)


def checkpoint(cache: list) -> Checkpoint:
    cp = Checkpoint(cache_offset(cache))
    c = _cls()
    for i, x in enumerate(cache):
        if type(x) is c.RotatingKVCache:
            cp.sliding[i] = ring_state(x)
    return cp


def restore_checkpoint(cache: list, cp: Checkpoint) -> None:
    """Bring `cache` (in place) back to the checkpoint: sliding layers rebuilt from their saved
    state, the others trimmed. Raises CacheRewindError when a layer is behind the checkpoint."""
    trim = {i: int(x.offset) - cp.offset for i, x in enumerate(cache) if i not in cp.sliding}
    for i, extra in trim.items():  # check every layer before changing any
        if extra < 0 or (extra and not cache[i].is_trimmable()):
            raise CacheRewindError(f"layer {i} at {int(cache[i].offset)} cannot go back to "
                                   f"{cp.offset}")
    lower_persisted(cache, cp.offset)
    mark = persisted(cache)  # what the snapshot still holds, up to the checkpoint at most
    for i, st in cp.sliding.items():
        cache[i] = ring_from_state(st)
    for i, extra in trim.items():
        if extra:
            cache[i].trim(extra)
    check_offsets(cache, cp.offset)
    if mark[1] is not None:  # the new sliding objects carry it too: the next save re-reads
        set_persisted(cache, *mark)  # none of the blocks it names
