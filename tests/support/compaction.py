"""What the compacted-block tests share (tests/engine/test_block_compaction*.py): the compacted
size they use, how they save, read and edit a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from permeant_tui.engine import snapshot_format
from permeant_tui.engine.blockstore import BlockStore
from permeant_tui.engine.snapshot import read_header, write_snapshot
from permeant_tui.engine.snapshot_format import BLOCK_TOKENS, FORMAT_V4, covered_of

from .kv_checks import TEXT

B = BLOCK_TOKENS
C = 256  # compacted block size of most tests (the product's is 1,024)
OTHER = "A different continuation about the database pool and its connection limits. " * 12


def long_ids_of(tok) -> list[int]:
    ids = tok.encode(TEXT * 2)
    assert len(ids) >= 640
    return ids


def meta_of(path: Path) -> dict:
    return read_header(path)["__metadata__"]


def spans_of(path: Path) -> list[int]:
    return json.loads(meta_of(path)["block_spans"])


def token_bytes(lm) -> int:
    """Bytes of one position of every full layer's K and V (float32)."""
    ident = lm.identity
    full = sum(1 for w in ident.layer_windows() if not w)
    return full * 2 * ident.n_kv_heads * ident.head_dim * 4


def save(path: Path, cache, ids, lm, store: BlockStore | None = None, agent: str = "technical",
         compact: int = C):
    return write_snapshot(path, cache, ids, lm.identity, agent, store, compact_tokens=compact)


def rewrite_manifest(path: Path, changes: dict, drop: tuple = (), fix_checksum: bool = True
                     ) -> None:
    """Edit the manifest's metadata (tensors unchanged); with `fix_checksum`, recompute its
    checksum as the writer would, so only the checks after it can refuse the result."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    mx.eval(list(arrays.values()))
    new = {k: v for k, v in {**meta, **changes}.items() if k not in drop}
    if fix_checksum:
        n = len(json.loads(meta["layer_meta"]))
        ordered = [arrays[f"{kv}.{i}"] for i in range(n) for kv in ("k", "v")]
        new["checksum"] = snapshot_format._tensor_checksum(ordered, covered_of(new))
    path.unlink()
    mx.save_safetensors(str(path), arrays, metadata=new)


def as_format_4(path: Path) -> None:
    """Rewrite a format 5 manifest of 64-token blocks as format 4 wrote it: no block_spans."""
    assert set(spans_of(path)) <= {B}
    rewrite_manifest(path, {"format": FORMAT_V4}, drop=("block_spans",))
    meta = meta_of(path)
    assert meta["format"] == FORMAT_V4 and "block_spans" not in meta
