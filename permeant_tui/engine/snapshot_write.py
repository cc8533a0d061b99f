"""The snapshot writer (format permeant-kv/5; engine/snapshot.py has the format and the reader):
the blocks the store lacks, then the manifest, committed on the caller's thread or handed to
the workspace's flusher (engine/durable.py) as a `PendingSave`."""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import kvcache
from .atomic import commit_file, remove_dead_temps, temp_path
from .blockstore import HEADER_SIZE, BlockStore, Staged, block_rows, chain_hashes
from .identity import ModelIdentity
from .snapshot_format import (
    BLOCK_TOKENS,
    COMPACT_TOKENS,
    FORMAT,
    WINDOW_BLOCK_TOKENS,
    BlockTag,
    WindowPlan,
    _covered,
    _np,
    _tensor_checksum,
    block_spans,
    default_store,
    ids_digest,
    span_ends,
    window_chain,
    window_plan,
)

if TYPE_CHECKING:
    from .durable import Flusher


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    tokens: int
    bytes: int  # the whole snapshot: manifest and every block it names
    ms: float
    written: int = 0  # bytes this save wrote (new blocks and the manifest)
    blocks: int = 0  # blocks the manifest names
    new_blocks: int = 0  # of which this save wrote


_SEQ = itertools.count(1)  # manifest temp names: two saves of one agent may be in flight


@dataclass
class PendingSave:
    """A save whose files are written but not yet durable: the staged blocks and the manifest's
    temp file. `commit` lands them in order (blocks fsynced and renamed, the block folder
    fsynced, every named block checked present, then the manifest fsynced, renamed, its folder
    fsynced); on failure it removes what it did not land and raises."""

    agent_id: str
    path: Path
    tmp: Path
    store: BlockStore
    names: list[str]
    staged: list[Staged] = field(default_factory=list)

    def commit(self) -> None:
        try:
            for st in self.staged:
                self.store.land(st)
            if self.staged:
                self.store.sync()
            missing = [n for n in self.names if not self.store.has(n)]
            if missing:  # staged by an earlier save that failed, or collected
                raise OSError(f"block {missing[0]} of the snapshot is not on disk (an earlier "
                              "save of it failed)")
            commit_file(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for st in self.staged:
            self.store.discard(st)
        self.tmp.unlink(missing_ok=True)


def _split(states: list, identity: ModelIdentity, cut: int, cache: list,
           plan: WindowPlan | None, n: int):
    """-> (tail tensors by name, per-layer meta, tail tensors in checksum order, full-layer
    streams). A layer is `k.{i}` / `v.{i}` [1, kv_heads, L, head_dim] in token order (quantized:
    `k.{i}.{j}` for each part); a full layer's positions [0, cut) go to blocks instead, and a
    sliding layer of the window plan keeps only its head and tail (the rest: window blocks)."""
    import mlx.core as mx

    named: dict = {}
    metas: list[dict] = []
    ordered: list = []
    streams: list = []
    ks: tuple
    vs: tuple
    empty = mx.zeros((1, identity.n_kv_heads, 0, identity.head_dim), getattr(mx, identity.kv_dtype))
    for i, st in enumerate(states):
        if st.keys is None:
            m = {"kind": st.kind, "offset": 0, "length": 0, "parts": 1}
            if st.kind == kvcache.SLIDING:
                m.update(window=st.window, keep=st.keep, idx=0)
            ks = vs = (empty,)
        else:
            ks, vs = kvcache.parts(st.keys), kvcache.parts(st.values)
            m = {**st.meta(), "parts": len(ks)}
            if st.kind != kvcache.SLIDING and cut:
                streams.extend(ks + vs)
                ks = tuple(a[..., cut:, :] for a in ks)
                vs = tuple(a[..., cut:, :] for a in vs)
            elif plan is not None and i in plan.layers:
                ks, vs = _head_and_tail(cache[i], plan, n)
        for name, group in (("k", ks), ("v", vs)):
            for j, a in enumerate(group):
                named[f"{name}.{i}" if len(group) == 1 else f"{name}.{i}.{j}"] = a
                ordered.append(a)
        metas.append(m)
    return named, metas, ordered, streams


def _head_and_tail(layer, plan: WindowPlan, n: int) -> tuple[tuple, tuple]:
    """A windowed sliding layer's manifest tensors: its head and tail positions, joined."""
    b = plan.block_tokens
    (hk, hv), (tk, tv) = (kvcache.window_rows(layer, plan.lo, plan.j0 * b),
                          kvcache.window_rows(layer, plan.j1 * b, n))

    def join(head, tail):
        return kvcache.concat([head, tail]) if head.shape[2] or tail.shape[2] else head

    return (join(hk, tk),), (join(hv, tv),)


def _write_blocks(store: BlockStore, cache: list, ids: list[int], identity: ModelIdentity,
                  streams: list, block_tokens: int, spans: list[int],
                  staged: list[Staged] | None) -> tuple[list[str], int, int]:
    """The full layers' blocks of `spans` tokens each (block_spans), each named by the chain
    hash at its end. Blocks this cache was read from or last saved as, and has not rewound
    into since, are not re-read (kvcache.persisted). -> (names, bytes written, blocks written)."""
    clean, tag = kvcache.persisted(cache)
    rows = [_np(s) for s in streams]
    chain = chain_hashes(ids, identity.fingerprint, block_tokens)
    ends = span_ends(spans)
    return store.write_all(lambda j: block_rows(rows, ends[j] - spans[j], ends[j]),
                           [chain[e // block_tokens - 1] for e in ends], spans,
                           tag.known_full(spans, block_tokens) if isinstance(tag, BlockTag)
                           else (), clean, staged)


def _window_payload(arrays: dict, plan: WindowPlan) -> int:
    """Bytes of one window block's rows: K and V of every sliding layer, B rows a head (heads,
    row size and dtype as the layer's manifest tensor has them)."""
    total = 0
    for i in plan.layers:
        k = arrays[f"k.{i}"]
        total += 2 * int(k.shape[1]) * plan.block_tokens * int(k.shape[3]) * k.dtype.size
    return total


def _write_window_blocks(store: BlockStore, cache: list, ids: list[int],
                         identity: ModelIdentity, plan: WindowPlan,
                         staged: list[Staged] | None) -> tuple[list[str], int, int]:
    """Window blocks j0..j1-1 of the plan: for each sliding layer (K, then V), for each head,
    the block's B rows, taken from the ring one block at a time (kvcache.window_rows); those
    this cache was read from or last saved as are not re-read. -> (names, bytes, written)."""
    import mlx.core as mx

    clean, tag = kvcache.persisted(cache)
    b = plan.block_tokens

    def rows_of(j: int) -> list:
        a = (plan.j0 + j) * b
        pairs = [kvcache.window_rows(cache[i], a, a + b) for i in plan.layers]
        mx.eval(pairs)
        return block_rows([_np(x) for pair in pairs for x in pair], 0, b)

    known = tag.known_window(plan.j0, plan.j1) if isinstance(tag, BlockTag) else ()
    return store.write_all(rows_of, window_chain(ids, identity.fingerprint, b)[plan.j0:plan.j1],
                           [b] * (plan.j1 - plan.j0), known, clean - plan.j0 * b, staged)


def write_snapshot(path: Path, cache: list, ids: list[int], identity: ModelIdentity,
                   agent_id: str, store: BlockStore | None = None,
                   block_tokens: int = BLOCK_TOKENS, flusher: Flusher | None = None,
                   compact_tokens: int | None = None) -> SnapshotInfo:
    """Write the state of `cache` after its first len(ids) tokens (normally all of it): the
    blocks `store` lacks, then the manifest at `path`. With `flusher`, the files are written
    here and made durable on the flusher's thread (`flusher.wait()` returns once they are).
    `compact_tokens`: the compacted blocks' size (default COMPACT_TOKENS; 0: B-token blocks
    only)."""
    import mlx.core as mx

    t0 = time.perf_counter()
    path = Path(path)
    store = store if store is not None else BlockStore(default_store(path))
    n = len(ids)
    cut = (n // block_tokens) * block_tokens
    states = kvcache.layer_states(cache, n)
    plan = window_plan([st.meta() if st.keys is not None else {"kind": st.kind}
                        for st in states], n, WINDOW_BLOCK_TOKENS)
    named, metas, ordered, streams = _split(states, identity, cut, cache, plan, n)
    import numpy as np

    arrays = {"token_ids": mx.array(np.asarray(ids, dtype=np.int32)), **named}
    mx.eval(list(arrays.values()) + streams)
    staged: list[Staged] | None = [] if flusher is not None else None
    spans = block_spans(cut, block_tokens,
                        COMPACT_TOKENS if compact_tokens is None else compact_tokens)
    try:
        return _write_manifest(path, cache, ids, identity, agent_id, store, block_tokens,
                               flusher, staged, t0, arrays, metas, ordered, streams, spans, plan)
    except BaseException:
        for st in staged or ():
            store.discard(st)
        raise


def _write_manifest(path: Path, cache: list, ids: list[int], identity: ModelIdentity,
                    agent_id: str, store: BlockStore, block_tokens: int, flusher: Flusher | None,
                    staged: list[Staged] | None, t0: float, arrays: dict, metas: list,
                    ordered: list, streams: list, spans: list[int],
                    plan: WindowPlan | None) -> SnapshotInfo:
    import mlx.core as mx

    n, cut = len(ids), sum(spans)
    names, written, new = _write_blocks(store, cache, ids, identity, streams, block_tokens,
                                        spans, staged)
    wnames: list[str] = []
    if plan is not None:
        wnames, w_written, w_new = _write_window_blocks(store, cache, ids, identity, plan, staged)
        written, new = written + w_written, new + w_new
    layer_meta = json.dumps(metas, sort_keys=True, separators=(",", ":"))
    blocks = json.dumps(names, separators=(",", ":"))
    window = json.dumps(wnames, separators=(",", ":"))
    block_spans_ = json.dumps(spans, separators=(",", ":"))
    token_bytes = sum(int(s.nbytes) // max(1, n) for s in streams)  # one position, every stream
    block_bytes = HEADER_SIZE + token_bytes * block_tokens
    window_bytes = HEADER_SIZE + _window_payload(arrays, plan) if wnames and plan else 0
    meta = {
        "format": FORMAT,
        "agent": agent_id,
        "identity": identity.fingerprint,
        "model": identity.name,
        "tokens": str(n),
        "tokens_digest": ids_digest(ids),
        "kv_dtype": identity.kv_dtype,
        "layout": f"per-layer k.i/v.i [1, {identity.n_kv_heads}, L_i, {identity.head_dim}] in "
                  f"token order: full layers positions [{cut}, T) (the rest in the blocks), "
                  f"sliding layers min(T, window) (see layer_meta; with window_blocks only the "
                  f"positions outside them), rope {identity.rope_layout}",
        "layers": str(len(metas)),
        "layer_meta": layer_meta,
        "block_tokens": str(block_tokens),
        "blocks": blocks,
        "block_spans": block_spans_,
        "block_bytes": str(block_bytes if names else 0),
        "window_block_tokens": str(plan.block_tokens if plan else WINDOW_BLOCK_TOKENS),
        "window_blocks": window,
        "window_block_bytes": str(window_bytes),
        "checksum": _tensor_checksum(ordered, _covered(
            layer_meta, blocks, str(block_tokens), window,
            str(plan.block_tokens if plan else WINDOW_BLOCK_TOKENS), block_spans_)),
        "created": f"{time.time():.3f}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # mlx appends .safetensors to any other name
    tmp = temp_path(path, f".{next(_SEQ)}.safetensors")
    remove_stale_temps(path)
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
        size = tmp.stat().st_size
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    pending = PendingSave(agent_id, path, tmp, store, names + wnames, staged or [])
    if flusher is None:
        commit_file(tmp, path)
    else:
        flusher.submit(pending)
    kvcache.set_persisted(cache, cut, BlockTag(tuple(names), plan.j0 if plan else 0,
                                               tuple(wnames), tuple(spans)))
    return SnapshotInfo(path, n, size + len(names) * HEADER_SIZE + cut * token_bytes
                        + len(wnames) * window_bytes, (time.perf_counter() - t0) * 1000,
                        written + size, len(names) + len(wnames), new)


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp files a process killed mid-write left beside `path` (never renamed, so never
    a snapshot; each can be as large as one). Files of a live process are left alone."""
    return remove_dead_temps(path.parent,
                             re.compile(rf"\.{re.escape(path.name)}\.(\d+)(?:\.\d+)?\.safetensors"),
                             keep_own=True)
