"""Compacted blocks (format permeant-kv/5) that are damaged, or named by a hostile manifest:
a big block bit-flipped, truncated, missing, or replaced by a 64-token block or another agent's
big block is refused in one line naming it; block_spans edited with a valid checksum (halved,
not multiples of 64, too short or long, negative, zero, past MAX_SPAN, past the ids, not a list,
not finite) is refused by the block check, edited without one by the checksum, and never breaks
opening the workspace; a crash between the big block and the manifest leaves the old snapshot,
and the orphan is collected. On tiny models with compacted runs of 256 tokens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from support.compaction import (
    OTHER,
    meta_of,
    rewrite_manifest,
    save,
    spans_of,
    token_bytes,
)
from support.kv_checks import blocks_of, built, logits, refused, restore

from permeant_tui.engine import snapshot_write
from permeant_tui.engine.blockstore import HEADER_SIZE, BlockStore
from permeant_tui.engine.generation import prefill
from permeant_tui.engine.snapshot_format import MAX_SPAN, blocks_on_disk
from permeant_tui.engine.workspace import Workspace


# ---- damage ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,words", [
    ("bitflip", "checksum"), ("truncated", "truncated"), ("missing", "missing"),
    ("a 64-token block", "truncated or not this model's"),
    ("another agent's big block", "header does not describe"),
])
def test_a_damaged_big_block_is_refused(tmp_path, tiny_model, real_model, long_ids, kind,
                                        words):
    lm = tiny_model
    ids = long_ids[:600]
    path = tmp_path / "agents/technical/kv.safetensors"
    store = BlockStore(tmp_path / "kv-blocks")
    save(path, built(lm, ids).cache, ids, lm, store)
    names, spans = blocks_of(path), spans_of(path)
    assert spans == [256, 256, 64]
    victim = store.path(names[1])
    raw = victim.read_bytes()
    if kind == "bitflip":
        at = HEADER_SIZE + len(raw) // 2
        victim.write_bytes(raw[:at] + bytes([raw[at] ^ 0x08]) + raw[at + 1:])
    elif kind == "truncated":
        victim.write_bytes(raw[:-1])
    elif kind == "missing":
        victim.unlink()
    elif kind == "a 64-token block":
        shutil.copyfile(store.path(names[2]), victim)
    else:
        other = real_model.tokenizer.encode(OTHER * 5)[:600]
        assert len(other) == 600
        other_path = tmp_path / "agents/business/kv.safetensors"
        save(other_path, built(lm, other).cache, other, lm, store, "business")
        donor = store.path(blocks_of(other_path)[1])
        assert donor != victim and donor.stat().st_size == len(raw)
        shutil.copyfile(donor, victim)
    exc = refused(lm, path, ids, "block", store)
    assert exc.path == str(victim) and words in exc.detail, exc


def test_hostile_spans_with_a_valid_checksum_are_refused(tmp_path, tiny_model, long_ids):
    lm = tiny_model
    ids = long_ids[:600]
    path = tmp_path / "agents/technical/kv.safetensors"
    store = BlockStore(tmp_path / "kv-blocks")
    save(path, built(lm, ids).cache, ids, lm, store)
    good = path.read_bytes()
    assert spans_of(path) == [256, 256, 64]
    hostile = {
        "halved, names unchanged": [128, 128, 128, 128, 64],
        "same count and sum, names unchanged": [128, 384, 64],
        "each 128, names unchanged": [128, 128, 128],
        "not a multiple of 64": [256, 250, 70],
        "shorter than the names": [256, 256],
        "longer than the names": [256, 256, 64, 64],
        "negative": [-64, 576, 64],
        "zero": [0, 512, 64],
        "huge": [MAX_SPAN + 64, 256, 64],
        "sums past the ids": [256, 256, 128],
        "not whole numbers": [256.0, 256, 64],
        "booleans": [True, 256, 64],
    }
    for what, spans in hostile.items():
        path.write_bytes(good)
        rewrite_manifest(path, {"block_spans": json.dumps(spans)})
        exc = refused(lm, path, ids, "blocks", store)
        assert str(path) in str(exc), (what, exc)
    # an edit that leaves the checksum as it was: the checksum covers the spans
    path.write_bytes(good)
    rewrite_manifest(path, {"block_spans": "[256,256,64,0]"}, fix_checksum=False)
    refused(lm, path, ids, "checksum", store)
    # the original still restores: nothing above touched a block
    path.write_bytes(good)
    restore(lm, path, ids, store)


@pytest.mark.parametrize("spans", ["null", "5", "{}", '{"a": 1}'])
def test_spans_that_are_not_a_list_are_refused_not_raised(tmp_path, tiny_model, long_ids,
                                                          spans):
    """A manifest whose block_spans is valid JSON but not a list (checksum made to match) must
    be refused as a snapshot (SnapshotCorrupt, so Workspace._attach rebuilds by prefill), like
    a `blocks` that is not a list is; any other exception escapes the workspace's restore."""
    lm = tiny_model
    ids = long_ids[:600]
    path = tmp_path / "agents/technical/kv.safetensors"
    store = BlockStore(tmp_path / "kv-blocks")
    save(path, built(lm, ids).cache, ids, lm, store)
    rewrite_manifest(path, {"block_spans": spans})
    refused(lm, path, ids, "blocks", store)  # SnapshotCorrupt in one line, nothing else


def test_a_manifest_with_infinite_spans_does_not_break_workspace_open(tmp_path, tiny_model,
                                                                      long_ids):
    """blocks_on_disk gives 0 for metadata it cannot read; Workspace.open relies on it. A span
    of Infinity (valid for Python's json) must not
    make opening the workspace raise, and the restore refuses it."""
    lm = tiny_model
    ws = Workspace.open(tmp_path / "ws")
    ids = long_ids[:600]
    path = ws.snapshot_path("technical")
    save(path, built(lm, ids).cache, ids, lm, ws.blocks)
    rewrite_manifest(path, {"block_spans": "[Infinity,256,64]"})
    refused(lm, path, ids, "blocks", ws.blocks)  # the restore refuses it
    problems = []
    try:
        Workspace.open(tmp_path / "ws")
    except Exception as exc:  # noqa: BLE001 - any exception is the failure reported
        problems.append(f"Workspace.open raised {type(exc).__name__}: {exc}")
    try:
        size = blocks_on_disk(meta_of(path))
    except Exception as exc:  # noqa: BLE001
        problems.append(f"blocks_on_disk raised {type(exc).__name__}: {exc}")
    else:
        if size != 0:
            problems.append(f"blocks_on_disk reported {size} bytes for unreadable spans")
    assert not problems, "; ".join(problems)


# ---- crash ---------------------------------------------------------------------------------------------
def test_crash_between_the_big_block_and_the_manifest(tmp_path, tiny_model, long_ids,
                                                      monkeypatch):
    lm = tiny_model
    ws = Workspace.open(tmp_path / "ws")
    path = ws.snapshot_path("technical")
    live = built(lm, long_ids[:230])
    save(path, live.cache, long_ids[:230], lm, ws.blocks)
    old = blocks_of(path)
    old_logits = logits(lm, live.cache)
    prefill(lm.model, live, long_ids[230:300])

    def killed(tmp, target):  # the process dies after the big block, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(snapshot_write, "commit_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save(path, live.cache, long_ids[:300], lm, ws.blocks)
    monkeypatch.undo()
    assert blocks_of(path) == old and meta_of(path)["tokens"] == "230"
    orphans = ws.blocks.names() - set(old)
    assert len(orphans) == 1
    (orphan,) = orphans
    assert ws.blocks.size(orphan) == HEADER_SIZE + 256 * token_bytes(lm)  # the big block
    cache = restore(lm, path, long_ids[:230], ws.blocks)
    assert np.array_equal(logits(lm, cache), old_logits)
    assert ws.collect_blocks() == [orphan]
    assert ws.blocks.names() == set(old)
    cache = restore(lm, path, long_ids[:230], ws.blocks)
    assert np.array_equal(logits(lm, cache), old_logits)
