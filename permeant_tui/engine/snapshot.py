"""KV snapshots: a small manifest per agent plus shared K/V blocks, written atomically,
checksummed and identity-stamped (format permeant-kv/5; docs/RESUME.md has the layout).

A snapshot is a cache of an agent's transcript, attached only when every check holds:
  format   the manifest's header parses and the file is exactly as long as the header says
  identity the ModelIdentity fingerprint equals the loaded model's
  checksum xxh3-128 over the per-layer meta, the block list and the manifest's tensor bytes
           equals the recorded one; each block's bytes equal the content hash in its name
  tokens   the token ids stored in it hash to the recorded digest and equal the ids the
           transcript renders to (Agent.expected_ids); the block names' chain hashes are the
           ids' own (USXF's chained block hashes, rooted in the model fingerprint)
  layout   every layer is what the model holds after T tokens: kind and window as the model's
           own cache sets them up, offset T, stored length T (full) or min(T, window) (sliding),
           a possible ring index
Format permeant-kv/3: the manifest `agents/<id>/kv.safetensors` holds `token_ids` (int32, [T]),
the tail (per full layer `k.{i}` / `v.{i}`: positions [nB, T) after the n whole blocks of B
tokens; per sliding layer its whole window, as in format 2) and metadata (`blocks`: the block
names in order, `block_tokens`: B, `layer_meta` as in format 2). The first nB positions of every
full layer live in blocks (engine/blockstore.py), shared by every manifest that names them.
Format 4 adds window blocks for the sliding layers (`window_blocks`, `window_block_tokens`).
Format 5 lets a block hold any whole number of B-token blocks (`block_spans`: each block's token
count; a save compacts each run of COMPACT_TOKENS from the start into one block), named by the
chain hash at its end. Formats 4, 3, 2 (one file, every layer's K/V) and 1 still load; the next
save writes 5.

Writes: new blocks first (each fsynced and renamed, then the block folder fsynced), then the
manifest through engine/atomic.py (temp file, fsync, rename, folder fsync): a crash leaves the
old manifest, whose blocks are all still there (only the workspace's collector deletes blocks,
and only those no manifest names), or the new one. A save given a flusher (engine/durable.py)
writes the same files on the caller's thread and leaves the fsyncs and renames, in the same
order, to the flusher's thread (`PendingSave.commit`): until that finishes the old manifest is
the one on disk, and a crash then leaves it, one save behind the transcript (restored with the
missing turns prefilled, never attached as if current).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

from . import blockload, kvcache, kvlayers
from .atomic import fsync_dir
from .blockstore import BlockStore, chain_hashes
from .errors import ModelMismatch, SnapshotCorrupt, SnapshotInvalid
from .identity import ModelIdentity
from .snapshot_format import (  # noqa: F401 - the format's names, from here as before
    _MAX_HEADER,
    BLOCK_FORMATS,
    BLOCK_TOKENS,
    BLOCKS_DIR,
    COMPACT_TOKENS,
    FORMAT,
    FORMAT_V1,
    FORMAT_V2,
    FORMATS,
    MAX_SPAN,
    ROOM_STEP,
    ROOM_TOKENS,
    WINDOW_FORMATS,
    BlockTag,
    WindowPlan,
    _covered,
    _np,
    _tensor_checksum,
    blocks_on_disk,
    covered_of,
    default_store,
    ids_digest,
    span_ends,
    window_chain,
    window_plan,
)
from .snapshot_write import (  # noqa: F401 - the writer, from here as before
    PendingSave,
    SnapshotInfo,
    remove_stale_temps,
    write_snapshot,
)

__all__ = ["fsync_dir", "read_snapshot", "write_snapshot", "attach", "attach_payload"]

class RestoredStates(list):
    """read_snapshot's layer states, plus what `attach` uses beyond them: per layer the (K, V)
    buffers with room for the next turn (format 3), and what the snapshot's blocks hold."""

    bases: list | None = None
    persisted: tuple[int, object] = (0, None)


def read_header(path: Path) -> dict:
    """Parse and bound-check the safetensors header without trusting it."""
    try:
        # Without blocking: a FIFO in place of a snapshot must be refused, not waited on.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise SnapshotCorrupt(str(path), "format", "not a regular file")
        size = st.st_size
        with os.fdopen(fd, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SnapshotCorrupt(str(path), "format", f"file is {size} bytes: empty or truncated")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise SnapshotCorrupt(str(path), "format", f"header length {hlen} does not fit a "
                                      f"{size}-byte file (truncated or not a snapshot)")
            header = json.loads(f.read(hlen))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SnapshotCorrupt(str(path), "format", f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise SnapshotCorrupt(str(path), "format", "header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise SnapshotCorrupt(str(path), "format", "metadata is not a map of strings")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = t["data_offsets"]
            end = max(end, int(b))
        except (KeyError, TypeError, ValueError):
            raise SnapshotCorrupt(str(path), "format", f"bad tensor entry {name!r}") from None
    if 8 + hlen + end != size:
        raise SnapshotCorrupt(str(path), "format",
                              f"file is {size} bytes, header describes {8 + hlen + end}: truncated")
    return header


def read_snapshot(path: Path, identity: ModelIdentity, expected_ids: list[int] | None,
                  store: BlockStore | None = None, room: int = ROOM_TOKENS,
                  prefix: bool = False, donors: blockload.Donors | None = None):
    """Verify and load -> (list of kvcache.LayerState, ids, metadata). Raises SnapshotInvalid.
    Format 3: the blocks come from `store` (default: `default_store(path)`), each verified, and
    every full layer gets at least `room` free positions beyond its tokens (ROOM_STEP).
    `prefix`: a snapshot whose ids are a proper prefix of `expected_ids` (one that is behind the
    transcript) is loaded too; the caller prefills the rest. `donors`: an evicted agent's K/V
    buffers, read into where they fit (blockload.Donors)."""
    import mlx.core as mx

    path = Path(path)
    if not path.exists():
        raise SnapshotInvalid(str(path), "exists", "no snapshot on disk")
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    fmt = meta.get("format")
    if fmt not in FORMATS:
        raise SnapshotCorrupt(str(path), "format", f"format {fmt!r}, expected {FORMAT}")
    if meta.get("identity") != identity.fingerprint:
        raise ModelMismatch(str(path), "identity",
                            f"made by model {meta.get('model')!r} (fingerprint "
                            f"{str(meta.get('identity'))[:12]}...), loaded model is "
                            f"{identity.name!r} ({identity.fingerprint[:12]}...)")
    layer_meta = meta.get("layer_meta", "") if fmt != FORMAT_V1 else ""
    covered, names, block_tokens = layer_meta, [], 0
    wnames: list = []
    wtokens = 0
    try:
        arrays = mx.load(str(path))
        # all at once: x1.7 faster on a warm 4k restore than materialising them one by one in
        # the checksum pass (issue 17)
        mx.eval(list(arrays.values()))
        n_layers = int(meta["layers"])
        metas = json.loads(layer_meta) if fmt != FORMAT_V1 else [{"parts": 1}] * n_layers
        if not isinstance(metas, list) or len(metas) != n_layers or \
                not all(isinstance(m, dict) and m.get("parts") in (1, 3) for m in metas):
            raise ValueError("layer_meta does not describe every layer")
        groups = [_layer_tensors(arrays, i, m["parts"]) for i, m in enumerate(metas)]
        ids_arr = arrays["token_ids"]
        if fmt in BLOCK_FORMATS:
            block_tokens = int(meta["block_tokens"])
            names = json.loads(meta["blocks"])
            windowed = fmt in WINDOW_FORMATS
            wnames = json.loads(meta["window_blocks"]) if windowed else []
            wtokens = int(meta["window_block_tokens"]) if windowed else 1  # format 3: unused
            if block_tokens < 1 or wtokens < 1 or not isinstance(names, list) or \
                    not isinstance(wnames, list) or \
                    not all(isinstance(x, str) for x in names + wnames):
                raise ValueError("bad block list")
            spans = json.loads(meta["block_spans"]) if fmt == FORMAT else \
                [block_tokens] * len(names)
            covered = covered_of(meta)
    except Exception as exc:  # mlx raises RuntimeError/ValueError; a missing key is KeyError
        raise SnapshotCorrupt(str(path), "format", f"unreadable tensors: {exc}") from None
    ordered = [a for ks, vs in groups for a in ks + vs]
    if _tensor_checksum(ordered, covered) != meta.get("checksum"):
        raise SnapshotCorrupt(str(path), "checksum", "tensor bytes do not match the recorded "
                              "checksum (bit rot or a partial write)")
    ids = _np(ids_arr).astype("int64").tolist()
    # str compare: a damaged count ("4x") must fail this check, not raise ValueError
    if ids_digest(ids) != meta.get("tokens_digest") or str(len(ids)) != meta.get("tokens"):
        raise SnapshotCorrupt(str(path), "tokens", "token ids do not match their digest")
    if fmt not in BLOCK_FORMATS:
        states = _layout(path, identity, metas, groups, len(ids), fmt)
        _check_expected(path, ids, expected_ids, prefix)
        return states, ids, meta
    want = chain_hashes(ids, identity.fingerprint, block_tokens)
    _check_chain(path, names, spans, want, block_tokens, len(ids))
    plan = _window_plan(identity, metas, len(ids), wtokens) if fmt in WINDOW_FORMATS else None
    wwant = window_chain(ids, identity.fingerprint, wtokens)[plan.j0:plan.j1] if plan else []
    if [x[:32] for x in wnames] != [h.hex() for h in wwant]:
        raise SnapshotCorrupt(str(path), "blocks", f"the {len(wnames)} window block names do "
                              f"not chain the {len(ids)} token ids' window under this model "
                              f"({len(wwant)} blocks)")
    _check_expected(path, ids, expected_ids, prefix)  # before reading blocks of a stale one
    store = store if store is not None else BlockStore(default_store(path))
    groups, bases = _assemble(path, store, metas, groups, names, spans, len(ids), room,
                              donors)
    if plan is not None:
        groups = _assemble_window(path, store, metas, groups, bases, wnames, plan, len(ids),
                                  donors)
    states = RestoredStates(_layout(path, identity, metas, groups, len(ids), fmt))
    states.bases = bases
    states.persisted = (sum(spans), BlockTag(tuple(names), plan.j0 if plan else 0,
                                             tuple(wnames), tuple(spans)))
    return states, ids, meta


def _check_chain(path: Path, names: list[str], spans: list, want: list[bytes],
                 block_tokens: int, n: int) -> None:
    """Block j holds the `spans[j]` positions after the blocks before it (a whole number of
    B-token blocks, format 5; B each before), and its name starts with the chain hash of the
    ids up to its end: the names chain every whole B-token block of the ids."""
    if not isinstance(spans, list) or len(spans) != len(names) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_SPAN and
            s % block_tokens == 0 for s in spans):
        shown = spans[:8] if isinstance(spans, list) else spans
        raise SnapshotCorrupt(str(path), "blocks", f"the block token counts {shown!r:.80} are "
                              f"not {len(names)} whole numbers of {block_tokens}-token blocks")
    ends = span_ends(spans)
    if (ends[-1] if ends else 0) != len(want) * block_tokens or \
            [x[:32] for x in names] != [want[e // block_tokens - 1].hex() for e in ends]:
        raise SnapshotCorrupt(str(path), "blocks", f"the {len(names)} block names do not chain "
                              f"the {n} token ids under this model ({len(want)} blocks of "
                              f"{block_tokens})")


def _check_expected(path: Path, ids: list[int], expected_ids: list[int] | None,
                    prefix: bool = False) -> None:
    if expected_ids is None or ids == expected_ids:
        return
    if len(ids) < len(expected_ids) and ids == expected_ids[:len(ids)]:
        if prefix and ids:
            return
        detail = (f"stale: snapshot holds {len(ids)} tokens, the transcript has "
                  f"{len(expected_ids)} (a turn finished after the last save)")
    else:
        detail = f"snapshot's {len(ids)} token ids differ from the transcript's {len(expected_ids)}"
    raise SnapshotInvalid(str(path), "tokens", detail)


def _assemble(path: Path, store: BlockStore, metas: list[dict], groups: list, names: list[str],
              spans: list[int], n: int, room: int,
              donors: blockload.Donors | None = None) -> tuple[list, list]:
    """Format 3: every full layer's K/V [1, kv_heads, capacity, head_dim], its first positions
    read from the blocks (`spans`: each one's token count) straight into the arrays
    (engine/blockload.py), then the manifest's tail; every block verified against its content
    hash. -> (per layer (K parts, V parts) of n positions, per layer (K, V) buffers or None)."""
    import mlx.core as mx

    cut = sum(spans)
    streams, which, bf16 = [], [], []
    for i, (m, (ks, vs)) in enumerate(zip(metas, groups, strict=True)):
        if m.get("kind") == kvcache.SLIDING or not m.get("length"):
            continue
        for t in ks + vs:
            if t.ndim != 4 or int(t.shape[0]) != 1 or int(t.shape[2]) != n - cut:
                raise SnapshotCorrupt(str(path), "layout", f"layer {i}: a tail of shape "
                                      f"{tuple(t.shape)}, expected positions {cut}..{n}")
            tail = _np(t)
            cap = -(-(n + room) // ROOM_STEP) * ROOM_STEP
            streams.append(blockload.Stream(int(t.shape[1]), cap, int(t.shape[3]), tail.dtype,
                                            tail))
            bf16.append(t.dtype == mx.bfloat16)
        which.append(i)
    reader = blockload.StreamReader(streams, store, names, spans, cut, n, donors=donors)
    allocs = reader.load()  # SnapshotCorrupt naming the first block missing, bad or short
    _verify(store, names, reader.digests)
    out, bases = list(groups), [None] * len(groups)
    pos = 0
    for i in which:
        ks, vs = groups[i]
        full = []
        for _ in ks + vs:
            a = allocs[pos]
            full.append(a.view(mx.bfloat16) if bf16[pos] else a)
            pos += 1
        fk, fv = tuple(full[:len(ks)]), tuple(full[len(ks):])
        out[i] = (tuple(a[..., :n, :] for a in fk), tuple(a[..., :n, :] for a in fv))
        bases[i] = (fk, fv) if metas[i].get("kind") == kvcache.QUANTIZED else (fk[0], fv[0])
    return out, bases


def _specs(identity: ModelIdentity) -> list:
    """Each layer's kvcache.LayerSpec as the loaded model's identity records it."""
    return [kvcache.LayerSpec(kvcache.SLIDING if x.get("type") == "sliding" else kvcache.FULL,
                              int(x.get("window") or 0), int(x.get("keep") or 0))
            for x in identity.layers()]


def _window_plan(identity: ModelIdentity, metas: list[dict], n: int,
                 block_tokens: int) -> WindowPlan | None:
    """Where format 4 keeps the windows after n tokens, as the loaded model's own layers say
    (never the file's meta: the layout check holds the file to the model)."""
    specs = _specs(identity)
    if len(specs) != len(metas):
        return None  # refused by the layout check
    return window_plan([{"kind": sp.kind, "window": sp.window, "keep": sp.keep,
                         "length": sp.stored_length(n)} for sp in specs], n, block_tokens)


def _assemble_window(path: Path, store: BlockStore, metas: list[dict], groups: list,
                     bases: list, names: list[str], plan: WindowPlan, n: int,
                     donors: blockload.Donors | None = None) -> list:
    """Format 4: every sliding layer's window, L = min(n, W) positions, its head from the
    manifest, then the window blocks read straight into it, then its tail; every block verified
    against its content hash. The buffer [1, kv_heads, L, head_dim] is laid out as mlx-lm's
    ring (position r of the window at row (r + idx) % L): `bases[i]` gets it, attached as is,
    and groups[i] a lazy view of it in logical order (never evaluated by attach).
    -> groups with those layers' (K, V) replaced; `bases` filled in place."""
    import mlx.core as mx

    b, head, tail, length = plan.block_tokens, plan.head, plan.tail(n), n - plan.lo
    # The rings' rotation (kvcache.layer_from_state's), when every sliding layer has the same
    # ring index, as layers fed the same tokens do; else each is reordered at attach as in
    # format 3. A bad index is refused by the layout check.
    idxs = {metas[i].get("idx") for i in plan.layers}
    idx = idxs.pop() if len(idxs) == 1 else None
    rotate = idx if isinstance(idx, int) and 0 < idx < length else 0
    streams, bf16 = [], []
    for i in plan.layers:
        kind, stored = metas[i].get("kind"), metas[i].get("length")
        if kind != kvcache.SLIDING:
            raise SnapshotCorrupt(str(path), "layout", f"layer {i} is {kind}, the model's is "
                                  f"sliding (window {plan.window})")
        if stored != length:
            raise SnapshotCorrupt(str(path), "layout", f"layer {i} stores {stored} tokens; a "
                                  f"sliding layer after {n} tokens holds {length}")
        ks, vs = groups[i]
        for t in ks + vs:
            if t.ndim != 4 or int(t.shape[0]) != 1 or int(t.shape[2]) != head + tail:
                raise SnapshotCorrupt(str(path), "layout", f"layer {i}: window head and tail of "
                                      f"shape {tuple(t.shape)}, expected {head} + {tail} "
                                      "positions")
            rows = _np(t)
            streams.append(blockload.Stream(int(t.shape[1]), length, int(t.shape[3]),
                                            rows.dtype, rows[:, :, head:], rows[:, :, :head]))
            bf16.append(t.dtype == mx.bfloat16)
    reader = blockload.StreamReader(streams, store, names, [b] * len(names),
                                    head + len(names) * b, length,
                                    start=head, rotate=rotate, donors=donors, ring=True)
    allocs = reader.load()
    _verify(store, names, reader.digests)
    out = list(groups)
    arrays = [a.view(mx.bfloat16) if is_bf16 else a for a, is_bf16 in zip(allocs, bf16,
                                                                          strict=True)]
    for pos, i in enumerate(plan.layers):
        ring = (arrays[2 * pos], arrays[2 * pos + 1])
        if idx is not None:
            bases[i] = ring
        out[i] = tuple((kvcache.concat([x[..., rotate:, :], x[..., :rotate, :]]) if rotate
                        else x,) for x in ring)
    return out


def _verify(store: BlockStore, names: list[str], digests: list[bytes]) -> None:
    for name, digest in zip(names, digests, strict=True):
        if digest != bytes.fromhex(name[33:]):
            raise SnapshotCorrupt(str(store.path(name)), "block", "bytes do not match the "
                                  "block's checksum (bit rot or a partial write)")


def _layer_tensors(arrays: dict, i: int, n_parts: int) -> tuple[tuple, tuple]:
    if n_parts == 1:
        return (arrays[f"k.{i}"],), (arrays[f"v.{i}"],)
    return (tuple(arrays[f"k.{i}.{j}"] for j in range(n_parts)),
            tuple(arrays[f"v.{i}.{j}"] for j in range(n_parts)))


def _layout(path: Path, identity: ModelIdentity, metas: list[dict], groups: list, n: int,
            fmt: str) -> list:
    """The layout check: every layer is what this model holds after n tokens (kind, window,
    offset, stored length, ring index). -> kvcache.LayerState per layer."""
    specs = _specs(identity)
    try:
        if len(groups) != identity.n_layers or len(specs) != identity.n_layers:
            raise kvcache.CacheLayoutError(f"{len(groups)} layers, the model has "
                                           f"{identity.n_layers}")
        if fmt == FORMAT_V1:  # full K/V of every layer
            if any(ks[0].shape[2] != n for ks, _ in groups):
                raise kvcache.CacheLayoutError("tensor shapes do not match the token count")
            return kvlayers.states_from_specs(specs, [ks[0] for ks, _ in groups],
                                             [vs[0] for _, vs in groups])
        states = []
        for i, (m, (ks, vs), spec) in enumerate(zip(metas, groups, specs, strict=True)):
            st = _state_of(m, ks, vs)
            kvcache.validate_state(st, spec, n, i)
            states.append(st)
        return states
    except (kvcache.CacheLayoutError, KeyError, TypeError, ValueError) as exc:
        raise SnapshotCorrupt(str(path), "layout", str(exc) or type(exc).__name__) from None


def _state_of(m: dict, ks: tuple, vs: tuple):
    def num(key: str) -> int:
        v = m.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise kvcache.CacheLayoutError(f"layer meta {key}={v!r} is not a count")
        return v

    kind = m.get("kind")
    if kind not in kvcache.KINDS:
        raise kvcache.CacheLayoutError(f"unknown layer kind {kind!r}")
    length = num("length")
    if any(int(a.shape[2]) != length for a in ks + vs):
        raise kvcache.CacheLayoutError(f"tensor lengths {[int(a.shape[2]) for a in ks]} differ "
                                       f"from the recorded {length}")
    k = ks if kind == kvcache.QUANTIZED else ks[0]
    v = vs if kind == kvcache.QUANTIZED else vs[0]
    if length == 0:
        k = v = None
    return kvcache.LayerState(kind, k, v, num("offset"), num("window"), num("keep"), num("idx"),
                              num("group_size"), num("bits"))


def attach(model, states: list) -> list:
    """Build mlx-lm caches holding the given layer states (checked against the model), or
    (K, V) pairs holding every token, [1, kv_heads, n, head_dim] per layer."""
    if states and isinstance(states[0], tuple):
        states = kvlayers.states_from_full(model, [k for k, _ in states], [v for _, v in states])
    cache = kvcache.cache_from_layer_states(model, states, getattr(states, "bases", None))
    clean, blocks = getattr(states, "persisted", (0, None))
    if blocks is not None:
        kvcache.set_persisted(cache, clean, blocks)  # the next save re-reads none of them
    return cache


def attach_payload(model, keys: list, values: list, source_dtype: str, kv_dtype: str,
                   n: int | None = None) -> list:
    """Build mlx_lm KV caches from numpy K/V shaped (kv_heads, L_i, head_dim), as a USXF payload
    carries them (bfloat16 as raw uint16 bits), cast to the model's KV dtype. With n (the token
    count, USXF 1.1): each layer's logical K/V, a sliding layer only its last min(n, window)
    positions (kvlayers). Without: every layer's full K/V (a 1.0 payload), of which a sliding
    layer keeps what mlx-lm would hold after that many tokens."""
    import mlx.core as mx


    target = getattr(mx, kv_dtype)

    def arr(a):
        x = mx.array(a)
        if source_dtype == "bfloat16":
            x = x.view(mx.bfloat16)  # raw bits, not numbers
        return x[None].astype(target)

    ks, vs = [arr(k) for k in keys], [arr(v) for v in values]
    if n is not None:
        return kvlayers.cache_from_layers(model, ks, vs, n)
    states = kvlayers.states_from_full(model, ks, vs)
    return kvcache.cache_from_layer_states(model, states)
