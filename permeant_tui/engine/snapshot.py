"""KV snapshots: safetensors files, written atomically, checksummed and identity-stamped.

A snapshot is a cache of an agent's transcript, attached only when every check holds:
  format   the header parses and the file is exactly as long as the header says
  identity the ModelIdentity fingerprint equals the loaded model's
  checksum xxh3-128 over the per-layer meta and the tensor bytes (in layer order) equals the
           recorded one
  tokens   the token ids stored in it hash to the recorded digest and equal the ids the
           transcript renders to (Agent.expected_ids)
  layout   every layer is what the model holds after T tokens: kind and window as the model's
           own cache sets them up, offset T, stored length T (full) or min(T, window) (sliding),
           a possible ring index
Format permeant-kv/2. Tensors: `token_ids` (int32, [T]) and per layer `k.{i}` / `v.{i}`
([1, kv_heads, L_i, head_dim], the model's KV dtype, in token order; a quantized cache's parts
are `k.{i}.{j}`). Metadata (all strings, as safetensors requires): see `write_snapshot`;
`layer_meta` is a JSON list of {kind, offset, length, parts, window, keep, idx} per layer
(kvcache.LayerState.meta), `idx` being mlx-lm's ring index so a rotating cache is rebuilt bit
for bit. Files of format permeant-kv/1 (every layer's full K/V, no layer_meta) still load.

Writes go through engine/atomic.py: a temp file in the same folder, fsynced, renamed over the
old snapshot, the folder fsynced: a crash leaves the old snapshot or the new one, never half.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from . import kvcache
from .atomic import commit_file, fsync_dir, temp_path
from .errors import ModelMismatch, SnapshotCorrupt, SnapshotInvalid
from .identity import ModelIdentity

__all__ = ["fsync_dir", "read_snapshot", "write_snapshot", "attach", "attach_payload"]

FORMAT = "permeant-kv/2"
FORMAT_V1 = "permeant-kv/1"
_MAX_HEADER = 16 << 20


def ids_digest(ids: list[int]) -> str:
    return xxhash.xxh3_128_hexdigest(np.asarray(ids, dtype=np.int32).tobytes())


def _tensor_checksum(arrays: list, layer_meta: str = "") -> str:
    """xxh3-128 over the per-layer meta (format 2; "" for format 1) and the tensor bytes."""
    h = xxhash.xxh3_128()
    h.update(layer_meta.encode())
    for a in arrays:
        # reshape + view, not memoryview.cast: an empty layer (an agent with no turns yet)
        # has a zero in its shape, which memoryview refuses to cast (issue 15)
        h.update(np.ascontiguousarray(_np(a)).reshape(-1).view(np.uint8))
    return h.hexdigest()


def _np(a):
    """An MLX array as numpy without a copy where possible (bfloat16 viewed as uint16)."""
    import mlx.core as mx

    if isinstance(a, np.ndarray):
        return a
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a, copy=False)


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    tokens: int
    bytes: int
    ms: float


def _states_to_tensors(states: list, identity: ModelIdentity) -> tuple[dict, list[dict], list]:
    """-> (named tensors, per-layer meta, tensors in checksum order). A layer is `k.{i}` / `v.{i}`
    [1, kv_heads, L, head_dim] in token order (quantized: `k.{i}.{j}` for each part)."""
    import mlx.core as mx

    named: dict = {}
    metas, ordered = [], []
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
        for name, group in (("k", ks), ("v", vs)):
            for j, a in enumerate(group):
                named[f"{name}.{i}" if len(group) == 1 else f"{name}.{i}.{j}"] = a
                ordered.append(a)
        metas.append(m)
    return named, metas, ordered


def write_snapshot(path: Path, cache: list, ids: list[int], identity: ModelIdentity,
                   agent_id: str) -> SnapshotInfo:
    """Write the state of `cache` after its first len(ids) tokens (normally all of it)."""
    import mlx.core as mx

    t0 = time.perf_counter()
    n = len(ids)
    states = kvcache.layer_states(cache, n)
    named, metas, ordered = _states_to_tensors(states, identity)
    arrays = {"token_ids": mx.array(np.asarray(ids, dtype=np.int32)), **named}
    mx.eval(list(arrays.values()))
    layer_meta = json.dumps(metas, sort_keys=True, separators=(",", ":"))
    meta = {
        "format": FORMAT,
        "agent": agent_id,
        "identity": identity.fingerprint,
        "model": identity.name,
        "tokens": str(n),
        "tokens_digest": ids_digest(ids),
        "kv_dtype": identity.kv_dtype,
        "layout": f"per-layer k.i/v.i [1, {identity.n_kv_heads}, L_i, {identity.head_dim}] in "
                  f"token order (L_i = T, or min(T, window) on sliding layers; see layer_meta), "
                  f"rope {identity.rope_layout}",
        "layers": str(len(states)),
        "layer_meta": layer_meta,
        "checksum": _tensor_checksum(ordered, layer_meta),
        "created": f"{time.time():.3f}",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, ".safetensors")  # mlx appends .safetensors to any other name
    remove_stale_temps(path)
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit_file(tmp, path)
    return SnapshotInfo(path, n, path.stat().st_size, (time.perf_counter() - t0) * 1000)


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp files a process killed mid-write left beside `path` (never renamed, so never
    a snapshot; each can be as large as one). Files of a live process are left alone."""
    import psutil

    removed = []
    prefix = f".{path.name}."
    for p in path.parent.glob(f"{prefix}*.safetensors"):
        pid = p.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or (int(pid) != os.getpid() and psutil.pid_exists(int(pid))):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


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


def read_snapshot(path: Path, identity: ModelIdentity, expected_ids: list[int] | None):
    """Verify and load -> (list of kvcache.LayerState, ids, metadata). Raises SnapshotInvalid."""
    import mlx.core as mx

    path = Path(path)
    if not path.exists():
        raise SnapshotInvalid(str(path), "exists", "no snapshot on disk")
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    fmt = meta.get("format")
    if fmt not in (FORMAT, FORMAT_V1):
        raise SnapshotCorrupt(str(path), "format", f"format {fmt!r}, expected {FORMAT}")
    if meta.get("identity") != identity.fingerprint:
        raise ModelMismatch(str(path), "identity",
                            f"made by model {meta.get('model')!r} (fingerprint "
                            f"{str(meta.get('identity'))[:12]}...), loaded model is "
                            f"{identity.name!r} ({identity.fingerprint[:12]}...)")
    layer_meta = meta.get("layer_meta", "") if fmt == FORMAT else ""
    try:
        arrays = mx.load(str(path))
        n_layers = int(meta["layers"])
        metas = json.loads(layer_meta) if fmt == FORMAT else [{"parts": 1}] * n_layers
        if not isinstance(metas, list) or len(metas) != n_layers or \
                not all(isinstance(m, dict) and m.get("parts") in (1, 3) for m in metas):
            raise ValueError("layer_meta does not describe every layer")
        groups = [_layer_tensors(arrays, i, m["parts"]) for i, m in enumerate(metas)]
        ids_arr = arrays["token_ids"]
    except Exception as exc:  # mlx raises RuntimeError/ValueError; a missing key is KeyError
        raise SnapshotCorrupt(str(path), "format", f"unreadable tensors: {exc}") from None
    ordered = [a for ks, vs in groups for a in ks + vs]
    if _tensor_checksum(ordered, layer_meta) != meta.get("checksum"):
        raise SnapshotCorrupt(str(path), "checksum", "tensor bytes do not match the recorded "
                              "checksum (bit rot or a partial write)")
    ids = _np(ids_arr).astype(np.int64).tolist()
    # str compare: a damaged count ("4x") must fail this check, not raise ValueError
    if ids_digest(ids) != meta.get("tokens_digest") or str(len(ids)) != meta.get("tokens"):
        raise SnapshotCorrupt(str(path), "tokens", "token ids do not match their digest")
    states = _layout(path, identity, metas, groups, len(ids), fmt)
    if expected_ids is not None and ids != expected_ids:
        if len(ids) < len(expected_ids) and ids == expected_ids[:len(ids)]:
            detail = (f"stale: snapshot holds {len(ids)} tokens, the transcript has "
                      f"{len(expected_ids)} (a turn finished after the last save)")
        else:
            detail = (f"snapshot's {len(ids)} token ids differ from the transcript's "
                      f"{len(expected_ids)}")
        raise SnapshotInvalid(str(path), "tokens", detail)
    return states, ids, meta


def _layer_tensors(arrays: dict, i: int, n_parts: int) -> tuple[tuple, tuple]:
    if n_parts == 1:
        return (arrays[f"k.{i}"],), (arrays[f"v.{i}"],)
    return (tuple(arrays[f"k.{i}.{j}"] for j in range(n_parts)),
            tuple(arrays[f"v.{i}.{j}"] for j in range(n_parts)))


def _layout(path: Path, identity: ModelIdentity, metas: list[dict], groups: list, n: int,
            fmt: str) -> list:
    """The layout check: every layer is what this model holds after n tokens (kind, window,
    offset, stored length, ring index). -> kvcache.LayerState per layer."""
    specs = [kvcache.LayerSpec(kvcache.SLIDING if x.get("type") == "sliding" else kvcache.FULL,
                               int(x.get("window") or 0), int(x.get("keep") or 0))
             for x in identity.layers()]
    try:
        if len(groups) != identity.n_layers or len(specs) != identity.n_layers:
            raise kvcache.CacheLayoutError(f"{len(groups)} layers, the model has "
                                           f"{identity.n_layers}")
        if fmt == FORMAT_V1:  # full K/V of every layer
            if any(ks[0].shape[2] != n for ks, _ in groups):
                raise kvcache.CacheLayoutError("tensor shapes do not match the token count")
            return kvcache.states_from_specs(specs, [ks[0] for ks, _ in groups],
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
        states = kvcache.states_from_full(model, [k for k, _ in states], [v for _, v in states])
    return kvcache.cache_from_layer_states(model, states)


def attach_payload(model, keys: list, values: list, source_dtype: str, kv_dtype: str,
                   n: int | None = None) -> list:
    """Build mlx_lm KV caches from numpy K/V shaped (kv_heads, L_i, head_dim), as a USXF payload
    carries them (bfloat16 as raw uint16 bits), cast to the model's KV dtype. With n (the token
    count, USXF 1.1): each layer's logical K/V, a sliding layer only its last min(n, window)
    positions (kvlayers). Without: every layer's full K/V (a 1.0 payload), of which a sliding
    layer keeps what mlx-lm would hold after that many tokens."""
    import mlx.core as mx

    from . import kvlayers

    target = getattr(mx, kv_dtype)

    def arr(a):
        x = mx.array(a)
        if source_dtype == "bfloat16":
            x = x.view(mx.bfloat16)  # raw bits, not numbers
        return x[None].astype(target)

    ks, vs = [arr(k) for k in keys], [arr(v) for v in values]
    if n is not None:
        return kvlayers.cache_from_layers(model, ks, vs, n)
    states = kvcache.states_from_full(model, ks, vs)
    return kvcache.cache_from_layer_states(model, states)
