"""Writing USXF files: quantize, measure, hash, sign, then write atomically (docs/USXF.md 9).

The manifest the writer builds is parsed back with the reader's own checks before anything
reaches the disk, so the writer cannot produce a file the reader refuses.
"""

from __future__ import annotations

import math
import os
import platform
import re
import secrets
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import msgpack
import numpy as np
import xxhash

from ..atomic import commit_file, refuse_non_regular, remove_dead_temps
from ..errors import UsxfInvalid
from ..identity import ModelIdentity
from . import layout
from . import quant as _quant
from .header import Header
from .keys import WorkspaceKeys
from .manifest import (
    ATTENTION_FIELDS,
    decode_manifest,
    layer_structure,
    parse_manifest,
    stored_lengths,
)
from .reader import UsxfFile
from .spec import (
    BLOCK_HASH_NAME,
    BLOCK_SIZE,
    CHUNK_HASH_NAME,
    CHUNK_SIZE,
    DIGEST_NAME,
    HEADER,
    MAGIC,
    MAX_BLOCK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_MANIFEST,
    MAX_PAYLOAD,
    MAX_TOKENS,
    MIN_BLOCK_SIZE,
    MIN_CHUNK_SIZE,
    PAYLOAD_ALIGN,
    QUANTS,
    ROPE_LAYOUTS,
    SIG_ALG_ED25519,
    SIG_LEN_ED25519,
    SIGNATURE_DOMAIN,
    SOURCE_DTYPES,
    TENSOR_ALIGN,
    VERSION_MAJOR,
    VERSION_MINOR,
    WRITER,
    AgentRecord,
    Fidelity,
    KVPayload,
    UsxfWriteError,
    align_up,
    payload_offset_for,
)

KV_LAYOUT = "layer-major, K then V; each [n_kv_heads, seq, head_dim], C order, little-endian"


def _reject(check: str, detail: str) -> UsxfWriteError:
    return UsxfWriteError(check, detail)


def _token_array(token_ids: Sequence[int] | np.ndarray, identity: ModelIdentity) -> np.ndarray:
    a = np.asarray(token_ids)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise _reject("tokens", f"token ids must be a flat list of integers (got shape {a.shape}, {a.dtype})")
    if len(a) > MAX_TOKENS:
        raise _reject("bounds", f"{len(a)} tokens, over the format's {MAX_TOKENS}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= 2**32):
        raise _reject("tokens", "token ids must be in 0..2**32-1")
    if a.size and identity.vocab_size > 0 and int(a.max()) >= identity.vocab_size:
        raise _reject("tokens", f"token id {int(a.max())} outside the vocabulary of {identity.vocab_size}")
    return a.astype("<u4")


def _check_kv(kv: KVPayload, identity: ModelIdentity, lengths: list[int]) -> None:
    """Every layer's K/V against the identity: heads, head dim, and the positions the layer
    holds (all of them on a full layer, the last min(n, window) on a sliding one)."""
    if kv.dtype not in SOURCE_DTYPES:
        raise _reject("kv-shape", f"KV dtype {kv.dtype!r} is not one of {SOURCE_DTYPES}")
    if identity.kv_dtype in SOURCE_DTYPES and identity.kv_dtype != kv.dtype:
        raise _reject("kv-shape", f"the KV is {kv.dtype} but the model identity says {identity.kv_dtype}")
    if len(kv.keys) != identity.n_layers or len(kv.values) != identity.n_layers:
        raise _reject("kv-shape", f"{len(kv.keys)} K and {len(kv.values)} V tensors for a model of "
                                  f"{identity.n_layers} layers")
    for i, (k, v) in enumerate(zip(kv.keys, kv.values, strict=True)):
        n = lengths[i]
        for kind, a in (("K", k), ("V", v)):
            shape = tuple(np.shape(a))
            if len(shape) != 3 or shape[0] != identity.n_kv_heads or shape[1] != n or shape[2] < 1 \
                    or (kind == "K" and shape[2] != identity.head_dim):
                raise _reject("kv-shape", f"layer {i} {kind} has shape {shape}, expected "
                                          f"({identity.n_kv_heads}, {n}, {identity.head_dim})")


def _agent_dict(agent: AgentRecord) -> dict:
    turns = []
    for t in agent.turns:
        d = dict(t)
        if "span" in d:
            d["span"] = [int(x) for x in d["span"]]
        turns.append(d)
    return {"agent_id": agent.agent_id, "role": agent.role, "title": agent.title,
            "system": agent.system, "turns": turns}


def _fidelity_dict(f: Fidelity | None) -> dict | None:
    if f is None:
        return None
    d = {"probe_prompt_ids": [int(x) for x in f.probe_prompt_ids],
         "expected_ids": [int(x) for x in f.expected_ids], "n": int(f.n),
         "context_room": int(f.context_room), "note": f.note}
    if f.margins is not None:  # optional key (1.0 readers ignore it)
        d["margins"] = [float(x) for x in f.margins]
    return d


def _extra(error_extra: dict | None) -> dict:
    out = {}
    for k, v in (error_extra or {}).items():
        if not isinstance(k, str) or k in ("max_abs", "rms", "source_max_abs", "source_rms") or \
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _reject("quant", f"quant.error[{k!r}]: a further finite number under a new name")
        out[k] = float(v)
    return out


def _provenance(extra: dict | None) -> dict:
    p: dict = {
        "writer": WRITER,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "runtime": "unknown",
    }
    for k, v in (extra or {}).items():
        if not isinstance(k, str) or not (v is None or isinstance(v, (str, int, float, bool))):
            raise _reject("provenance", f"provenance {k!r}: keys are strings and values scalars")
        p[k] = v
    return p


def _byte_view(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _pack(manifest: dict) -> bytes:
    try:
        return msgpack.packb(manifest, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise _reject("manifest", f"a field cannot be encoded: {e}") from None


def _header(manifest_bytes: bytes, chunk_size: int, payload_offset: int, length: int) -> Header:
    head = HEADER.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, SIG_ALG_ED25519, 0, len(manifest_bytes),
                       SIG_LEN_ED25519, chunk_size, payload_offset, length,
                       xxhash.xxh3_64_intdigest(manifest_bytes), 0)
    head = head[:56] + xxhash.xxh3_64_intdigest(head[:56]).to_bytes(8, "little")
    return Header(*HEADER.unpack(head)[1:], raw=head)


_TEMP_RE = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")  # `tmp` in write_usxf


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass


def write_usxf(
    path: str | os.PathLike,
    *,
    identity: ModelIdentity,
    token_ids: Sequence[int] | np.ndarray,
    kv: KVPayload,
    agent: AgentRecord,
    keys: WorkspaceKeys,
    quant: str = "none",
    fidelity: Fidelity | None = None,
    provenance: dict | None = None,
    progress: Callable[[float], None] | None = None,
    chunk_size: int = CHUNK_SIZE,
    block_size: int = BLOCK_SIZE,
    error_extra: dict[str, float] | None = None,
) -> UsxfFile:
    """Export one agent's KV state as a signed USXF file, atomically. Raises UsxfWriteError
    (nothing written) when the input is inconsistent, or check `io` when the disk refuses.
    `error_extra`: further measured numbers for `quant.error` (e.g. `next_token_kl`)."""
    method = quant
    report = progress or (lambda _f: None)
    path = Path(path)
    if method not in QUANTS:
        raise _reject("quant", f"quantization must be one of {QUANTS}, got {method!r}")
    if identity.rope_layout not in ROPE_LAYOUTS:
        raise _reject("model-identity", f"rope_layout {identity.rope_layout!r} is not one of {ROPE_LAYOUTS}")
    if (not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
        raise _reject("bounds", f"chunk size {chunk_size} must be a power of two in "
                                f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise _reject("bounds", f"block size {block_size} outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")
    tokens = _token_array(token_ids, identity)
    n = len(tokens)
    try:
        structure = layer_structure(identity)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise _reject("model-identity", f"the identity's per-layer attention: {e}") from None
    if len(structure) != identity.n_layers:
        raise _reject("model-identity", f"{len(structure)} attention layers for a model of "
                                        f"{identity.n_layers}")
    lengths = stored_lengths(structure, n)
    _check_kv(kv, identity, lengths)
    report(0.0)

    # 1. quantize each tensor and lay the regions out, measuring the error on what load_kv returns
    meter = _quant.ErrorMeter()
    regions: list[tuple[int, memoryview]] = []
    table: list[dict] = []
    group = _quant.group_size_for(identity.head_dim)
    off = 0
    n_layers = identity.n_layers
    for layer in range(n_layers):
        for kind, arr in (("k", kv.keys[layer]), ("v", kv.values[layer])):
            name = f"layers.{layer}.{kind}"
            try:
                src = _quant.as_source_array(arr, kv.dtype)
            except ValueError as e:
                raise _reject("kv-shape", f"{name}: {e}") from None
            if method in ("int8", "kivi8") and src.shape[2] % group and not (
                    method == "kivi8" and kind == "k"):
                raise _reject("kv-shape", f"{name}: head_dim {src.shape[2]} is not a multiple of "
                                          f"the {method} group {group}")
            stored = _quant.encode(src, kv.dtype, method, group, meter, name, kind)
            off = align_up(off, TENSOR_ALIGN)
            entry = {"name": name, "layer": layer, "kind": kind, "shape": list(src.shape),
                     "start": n - lengths[layer], "dtype": _quant.stored_dtype(kv.dtype, method),
                     "offset": off, "nbytes": int(stored.data.nbytes), "scales": None,
                     **stored.fields}
            regions.append((off, _byte_view(stored.data)))
            off += stored.data.nbytes
            for key, dtype, part in stored.parts:  # int8: scales; kivi8: scales, zeros, kept
                off = align_up(off, TENSOR_ALIGN)
                entry[key] = {"dtype": dtype, "shape": list(part.shape), "offset": off,
                              "nbytes": int(part.nbytes)}
                regions.append((off, _byte_view(part)))
                off += part.nbytes
            table.append(entry)
        report(0.35 * (layer + 1) / max(n_layers, 1))
    length = off
    if length > MAX_PAYLOAD or -(-length // chunk_size) > MAX_CHUNKS:
        raise _reject("bounds", f"a payload of {length} bytes in chunks of {chunk_size} is over the "
                                f"format's limits; use a larger chunk size")

    # 2. the manifest, with placeholder digests (fixed-size, so its length is final), checked by
    # the reader's own parser before anything is written
    ranges = layout.chunk_ranges(length, chunk_size)
    fp = identity.fingerprint
    manifest = {
        "format": "usxf",
        "version": [VERSION_MAJOR, VERSION_MINOR],
        "model": identity.to_dict(),
        "attention": {**{k: getattr(identity, k) for k in ATTENTION_FIELDS},
                      "layers": structure},
        "sequence": {"length": n, "token_dtype": "<u4", "token_ids": tokens.tobytes()},
        "blocks": {"hash": BLOCK_HASH_NAME, "block_size": block_size, "salt": "model.fingerprint",
                   "hashes": layout.block_hashes(tokens, fp, block_size)},
        "kv": {"source_dtype": kv.dtype, "layout": KV_LAYOUT, "tensors": table},
        "quant": _quant.quant_header(method, group, {**meter.as_dict(), **_extra(error_extra)}),
        "payload": {"offset": 0, "length": length, "chunk_size": chunk_size,
                    "alignment": PAYLOAD_ALIGN, "tensor_alignment": TENSOR_ALIGN,
                    "chunk_hash": CHUNK_HASH_NAME, "chunks": [bytes(32)] * len(ranges),
                    "digest_alg": DIGEST_NAME, "digest": bytes(32)},
        "provenance": _provenance(provenance),
        "agent": _agent_dict(agent),
        "fidelity": _fidelity_dict(fidelity),
        "signature": {"alg": "ed25519", "key_id": keys.key_id},
    }
    # the payload offset depends on the manifest's length, which depends on the offset's
    # encoding: iterate until stable (at most a couple of rounds)
    for _ in range(4):
        manifest_bytes = _pack(manifest)
        payload_offset = payload_offset_for(len(manifest_bytes), SIG_LEN_ED25519)
        if manifest["payload"]["offset"] == payload_offset:
            break
        manifest["payload"]["offset"] = payload_offset
    if len(manifest_bytes) > MAX_MANIFEST:
        raise _reject("bounds", f"the manifest would be {len(manifest_bytes)} bytes, over {MAX_MANIFEST}")
    try:
        parsed = parse_manifest(decode_manifest(manifest_bytes), _header(manifest_bytes, chunk_size,
                                payload_offset, length), keys.key_id)
    except UsxfInvalid as e:
        raise _reject(e.check, e.detail) from None
    report(0.4)

    # 3. write the payload to a temp file in the same folder while a thread pool hashes its
    # chunks from memory; then fill in the digests, sign, and write header, manifest, signature
    payload = layout.SegmentedPayload(regions, length)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        refuse_non_regular(path)  # never rename over a device, a FIFO or a folder
        remove_dead_temps(path.parent, _TEMP_RE)  # of exports killed mid-write (any name)
        with open(tmp, "xb") as f, ThreadPoolExecutor(layout.HASH_THREADS) as pool:
            futures = [pool.submit(payload.chunk_digest, a, b) for a, b in ranges]
            try:
                f.write(bytes(payload_offset))  # header, manifest, signature come last
                pos = written = 0
                for off, mv in regions:
                    if off > pos:
                        f.write(bytes(off - pos))
                    f.write(mv)
                    pos = off + len(mv)
                    written += len(mv)
                    report(0.4 + 0.5 * written / max(length, 1))
                digests = [fu.result() for fu in futures]
            except BaseException:
                for fu in futures:
                    fu.cancel()
                raise
            digest = layout.payload_digest(length, chunk_size, digests)
            manifest["payload"]["chunks"] = digests
            manifest["payload"]["digest"] = digest
            final = _pack(manifest)
            if len(final) != len(manifest_bytes):  # digests are fixed-size: cannot happen
                raise _reject("manifest", "the manifest changed length when its digests were filled in")
            head = _header(final, chunk_size, payload_offset, length).raw
            sig_block = keys.public_key_bytes + keys.sign(SIGNATURE_DOMAIN + head + final)
            f.seek(0)
            f.write(head + final + sig_block)
            f.flush()
        commit_file(tmp, path)  # fsync, rename over the destination, fsync the folder
    except OSError as e:
        _unlink(tmp)
        raise UsxfInvalid("io", f"cannot write {path}: {e.strerror or e}", str(path)) from None
    except BaseException:
        _unlink(tmp)
        raise
    report(1.0)
    return UsxfFile(
        path=path, size=payload_offset + length, digest=digest.hex(), key_id=keys.key_id,
        public_key=keys.public_key_bytes, signer_trusted=True, manifest=manifest,
        identity=identity, token_ids=tokens.tolist(), agent=parsed.agent,
        fidelity=parsed.fidelity, quant=method,
    )
