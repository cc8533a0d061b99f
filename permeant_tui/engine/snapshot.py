"""KV snapshots: safetensors files, written atomically, checksummed and identity-stamped.

A snapshot is a cache of an agent's transcript, attached only when every check holds:
  format   the header parses and the file is exactly as long as the header says
  identity the ModelIdentity fingerprint equals the loaded model's
  checksum xxh3-128 over the tensor bytes (in layer order) equals the recorded one
  tokens   the token ids stored in it hash to the recorded digest and equal the ids the
           transcript renders to (Agent.expected_ids)
Tensors: `token_ids` (int32, [T]) and per layer `k.{i}` / `v.{i}` ([1, kv_heads, T, head_dim],
the model's KV dtype). Metadata (all strings, as safetensors requires): see `write_snapshot`.

Writes go to a temp file in the same folder, are fsynced, renamed over the old snapshot, and the
folder is fsynced: a crash leaves the old snapshot or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from .errors import ModelMismatch, SnapshotCorrupt, SnapshotInvalid
from .identity import ModelIdentity

FORMAT = "permeant-kv/1"
_MAX_HEADER = 16 << 20


def ids_digest(ids: list[int]) -> str:
    return xxhash.xxh3_128_hexdigest(np.asarray(ids, dtype=np.int32).tobytes())


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform/filesystem
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_checksum(arrays: list) -> str:
    h = xxhash.xxh3_128()
    for a in arrays:
        h.update(memoryview(np.ascontiguousarray(_np(a))).cast("B"))
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


def write_snapshot(path: Path, cache: list, ids: list[int], identity: ModelIdentity,
                   agent_id: str) -> SnapshotInfo:
    import mlx.core as mx

    t0 = time.perf_counter()
    n = len(ids)
    arrays: dict[str, mx.array] = {"token_ids": mx.array(np.asarray(ids, dtype=np.int32))}
    ordered = []
    for i, c in enumerate(cache):
        if n:
            k, v = c.keys[..., :n, :], c.values[..., :n, :]
        else:
            shape = (1, identity.n_kv_heads, 0, identity.head_dim)
            k = v = mx.zeros(shape, getattr(mx, identity.kv_dtype))
        arrays[f"k.{i}"], arrays[f"v.{i}"] = k, v
        ordered += [k, v]
    mx.eval(list(arrays.values()))
    meta = {
        "format": FORMAT,
        "agent": agent_id,
        "identity": identity.fingerprint,
        "model": identity.name,
        "tokens": str(n),
        "tokens_digest": ids_digest(ids),
        "kv_dtype": identity.kv_dtype,
        "layout": f"per-layer k.i/v.i [1, {identity.n_kv_heads}, T, {identity.head_dim}], "
                  f"rope {identity.rope_layout}",
        "layers": str(len(cache)),
        "checksum": _tensor_checksum(ordered),
        "created": f"{time.time():.3f}",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # mlx appends nothing: ends .tmp
    tmp_st = tmp.with_suffix(".safetensors")
    remove_stale_temps(path)
    try:
        mx.save_safetensors(str(tmp_st), arrays, metadata=meta)
        with open(tmp_st, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_st, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp_st.unlink(missing_ok=True)
        raise
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
        size = path.stat().st_size
        with open(path, "rb") as f:
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
    """Verify and load -> (list of (k, v) MLX arrays, ids, metadata). Raises SnapshotInvalid."""
    import mlx.core as mx

    path = Path(path)
    if not path.exists():
        raise SnapshotInvalid(str(path), "exists", "no snapshot on disk")
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise SnapshotCorrupt(str(path), "format", f"format {meta.get('format')!r}, expected {FORMAT}")
    if meta.get("identity") != identity.fingerprint:
        raise ModelMismatch(str(path), "identity",
                            f"made by model {meta.get('model')!r} (fingerprint "
                            f"{str(meta.get('identity'))[:12]}...), loaded model is "
                            f"{identity.name!r} ({identity.fingerprint[:12]}...)")
    try:
        arrays = mx.load(str(path))
        n_layers = int(meta["layers"])
        pairs = [(arrays[f"k.{i}"], arrays[f"v.{i}"]) for i in range(n_layers)]
        ids_arr = arrays["token_ids"]
    except Exception as exc:  # mlx raises RuntimeError/ValueError; a missing key is KeyError
        raise SnapshotCorrupt(str(path), "format", f"unreadable tensors: {exc}") from None
    ordered = [a for kv in pairs for a in kv]
    if _tensor_checksum(ordered) != meta.get("checksum"):
        raise SnapshotCorrupt(str(path), "checksum", "tensor bytes do not match the recorded "
                              "checksum (bit rot or a partial write)")
    ids = _np(ids_arr).astype(np.int64).tolist()
    # str compare: a damaged count ("4x") must fail this check, not raise ValueError
    if ids_digest(ids) != meta.get("tokens_digest") or str(len(ids)) != meta.get("tokens"):
        raise SnapshotCorrupt(str(path), "tokens", "token ids do not match their digest")
    if n_layers != identity.n_layers or any(k.shape[2] != len(ids) for k, _ in pairs):
        raise SnapshotCorrupt(str(path), "layout", "tensor shapes do not match the token count")
    if expected_ids is not None and ids != expected_ids:
        if len(ids) < len(expected_ids) and ids == expected_ids[:len(ids)]:
            detail = (f"stale: snapshot holds {len(ids)} tokens, the transcript has "
                      f"{len(expected_ids)} (a turn finished after the last save)")
        else:
            detail = (f"snapshot's {len(ids)} token ids differ from the transcript's "
                      f"{len(expected_ids)}")
        raise SnapshotInvalid(str(path), "tokens", detail)
    return pairs, ids, meta


def attach(model, pairs) -> list:
    """Build mlx_lm KV caches holding the given (k, v) arrays."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for c, (k, v) in zip(cache, pairs, strict=True):
        if k.shape[2]:
            c.keys, c.values, c.offset = k, v, k.shape[2]
    return cache


def attach_payload(model, keys: list, values: list, source_dtype: str, kv_dtype: str) -> list:
    """Build mlx_lm KV caches from numpy K/V shaped (kv_heads, seq, head_dim), as a USXF
    payload carries them (bfloat16 as raw uint16 bits), cast to the model's KV dtype."""
    import mlx.core as mx

    target = getattr(mx, kv_dtype)

    def arr(a):
        x = mx.array(a)
        if source_dtype == "bfloat16":
            x = x.view(mx.bfloat16)  # raw bits, not numbers
        return x[None].astype(target)

    return attach(model, [(arr(k), arr(v)) for k, v in zip(keys, values, strict=True)])

