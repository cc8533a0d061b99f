"""Compacted blocks (snapshot format permeant-kv/5): each whole run of `compact_tokens` tokens
from position 0 of the full layers' K/V is one block file, the rest up to the last whole
64-token block stay 64-token blocks, and the manifest's `block_spans` (covered by its checksum)
says how many tokens each block holds.

What this file proves, on tiny models with compact runs of 128 or 256 tokens:
  layout      the spans are block_spans(cut, 64, C), each block file is its header plus its
              tokens' bytes (its header says its token count), and the reported sizes
              (SnapshotInfo.bytes, blocks_on_disk) are the files' own
  round trip  llama, qwen2 and a sliding-window gemma3 (past its window, so window blocks exist
              too) restore bit-equal to the live cache and agree with a rebuild by prefill
  incremental the turn that completes a run writes exactly one big block, the 64-token blocks it
              replaces are collected, later turns and a restored cache rewrite nothing of it
  sharing     a fork's big block is stored once and survives the other agent's reset
  rewind      a rewind into a big block never names it again
  damage      a damaged, truncated, missing or substituted big block is refused in one line
              naming it; hostile manifests (spans edited, with a valid checksum) are refused
              by the block check, edits without one by the checksum; spans that are not a
              list, or not finite, are refused too and never raise anything else (nor break
              opening the workspace)
  migration   format 4 manifests still load and the next save compacts them
  crash       a crash between the big block and the manifest leaves the old snapshot, and the
              orphan is collected
  engine      the product path (Engine, flusher, collector) compacts and restores exactly
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from support.kv_checks import TEXT, blocks_of, built, greedy, logits, refused, restore, session
from support.tiny_models import WINDOW, tiny_model

from permeant_tui.engine import kvcache, kvrewind, snapshot_format, snapshot_write
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.blockstore import BLOCK_HEADER, HEADER_SIZE, BlockStore
from permeant_tui.engine.events import AgentRestored
from permeant_tui.engine.generation import prefill
from permeant_tui.engine.snapshot import read_header, read_snapshot, write_snapshot
from permeant_tui.engine.snapshot_format import (
    BLOCK_TOKENS,
    FORMAT,
    FORMAT_V4,
    MAX_SPAN,
    block_spans,
    blocks_on_disk,
    covered_of,
)
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace

B = BLOCK_TOKENS
C = 256  # compacted block size of most tests here (the product's is 1,024)
OTHER = "A different continuation about the database pool and its connection limits. " * 12


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


@pytest.fixture(scope="module")
def long_ids(tok) -> list[int]:
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


# ---- layout ------------------------------------------------------------------------------------
def test_layout_spans_sizes_and_reported_bytes(tmp_path, tiny_model, long_ids):
    ids = long_ids[:600]
    agent = built(tiny_model, ids)
    path = tmp_path / "agents/technical/kv.safetensors"
    store = BlockStore(tmp_path / "kv-blocks")
    info = save(path, agent.cache, ids, tiny_model, store)
    meta = meta_of(path)
    cut = (600 // B) * B
    assert meta["format"] == FORMAT
    assert spans_of(path) == block_spans(cut, B, C) == [256, 256, 64]
    names = blocks_of(path)
    assert info.blocks == info.new_blocks == len(names) == 3
    assert len(set(names)) == 3 and store.names() == set(names)
    row = token_bytes(tiny_model)
    assert row == 2 * 2 * 2 * 16 * 4
    for name, span in zip(names, spans_of(path), strict=True):
        f = store.path(name)
        assert f.stat().st_size == HEADER_SIZE + span * row, (name, span)
        _, _, tokens, payload, chain, content = BLOCK_HEADER.unpack(f.read_bytes()[:HEADER_SIZE])
        assert (tokens, payload) == (span, span * row)
        assert f"{chain.hex()}-{content.hex()}" == name
    on_disk = sum(store.path(x).stat().st_size for x in names) + path.stat().st_size
    assert blocks_on_disk(meta) + path.stat().st_size == info.bytes == on_disk
    assert info.written == info.bytes  # a first save writes everything
    # the manifest holds only the tail after the blocks
    with mx.stream(mx.cpu):
        assert mx.load(str(path))["k.0"].shape[2] == 600 - cut
    # compaction off: every block 64 tokens, the same bytes in all
    other = tmp_path / "agents/business/kv.safetensors"
    info0 = save(other, agent.cache, ids, tiny_model, store, "business", compact=0)
    assert spans_of(other) == [B] * (cut // B)
    assert info0.new_blocks == 8  # the last 64-token block is the same file in both
    assert info0.bytes - other.stat().st_size == \
        info.bytes - path.stat().st_size + (9 - 3) * HEADER_SIZE
    # Workspace.open reports the same size as the save did
    ws = Workspace.open(tmp_path)
    assert ws.agent("technical").bytes_on_disk == info.bytes


# ---- round trip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_round_trip_equals_live_and_rebuild(tmp_path, tok, long_ids, arch):
    lm = tiny_model(arch, tok)[1]
    ids = long_ids[:600]
    n = len(ids)
    live = built(lm, ids[:-40])  # a prefill, then a turn's worth of single steps
    for t in ids[-40:]:
        prefill(lm.model, live, [t])
    path = tmp_path / "agents/technical/kv.safetensors"
    info = save(path, live.cache, ids, lm)
    assert spans_of(path) == [256, 256, 64] and info.blocks >= 3
    windows = json.loads(meta_of(path)["window_blocks"])
    if arch == "gemma3_text":
        assert n > 2 * WINDOW and windows  # sliding layers keep their own window blocks
    else:
        assert windows == []
    cache = restore(lm, path, ids)
    assert kvcache.offsets(cache) == [n] * len(cache)
    assert np.array_equal(logits(lm, cache), logits(lm, live.cache))
    rebuild = built(lm, ids)
    assert greedy(lm, cache) == greedy(lm, live.cache) == greedy(lm, rebuild.cache)
    np.testing.assert_allclose(logits(lm, cache), logits(lm, rebuild.cache), atol=1e-4)


# ---- incremental saves ----------------------------------------------------------------------------
def test_the_turn_completing_a_run_writes_one_big_block(tmp_path, tiny_model, long_ids):
    lm = tiny_model
    ws = Workspace.open(tmp_path / "ws")
    path = ws.snapshot_path("technical")
    live = built(lm, long_ids[:230])
    info = save(path, live.cache, long_ids[:230], lm, ws.blocks)
    assert spans_of(path) == [64, 64, 64] and info.new_blocks == 3
    small = blocks_of(path)

    # the turn crossing 256: one new block, the compacted run
    prefill(lm.model, live, long_ids[230:300])
    info = save(path, live.cache, long_ids[:300], lm, ws.blocks)
    assert spans_of(path) == [256]
    (big,) = blocks_of(path)
    assert info.new_blocks == 1 and info.blocks == 1
    assert info.written == ws.blocks.size(big) + path.stat().st_size
    assert ws.blocks.size(big) == HEADER_SIZE + 256 * token_bytes(lm)
    assert ws.blocks.names() == set(small) | {big}
    assert sorted(ws.collect_blocks()) == sorted(small)
    assert ws.blocks.names() == {big}
    cache = restore(lm, path, long_ids[:300], ws.blocks)
    assert np.array_equal(logits(lm, cache), logits(lm, live.cache))

    # a further small turn: the big block is kept by name, one 64-token block is new
    prefill(lm.model, live, long_ids[300:340])
    info = save(path, live.cache, long_ids[:340], lm, ws.blocks)
    assert spans_of(path) == [256, 64] and blocks_of(path)[0] == big
    assert info.new_blocks == 1
    assert info.written == HEADER_SIZE + 64 * token_bytes(lm) + path.stat().st_size
    assert ws.collect_blocks() == []

    # a restored cache saved again writes no block, only the manifest
    cache = restore(lm, path, long_ids[:340], ws.blocks)
    assert np.array_equal(logits(lm, cache), logits(lm, live.cache))
    names = blocks_of(path)
    info = save(path, cache, long_ids[:340], lm, ws.blocks)
    assert info.new_blocks == 0 and info.written == path.stat().st_size
    assert blocks_of(path) == names
    again = restore(lm, path, long_ids[:340], ws.blocks)
    assert np.array_equal(logits(lm, again), logits(lm, live.cache))

    # the restored cache goes on past 512: one more big block, the first kept by name
    agent = Agent("technical", "technical", "Technical", "system", cache=again,
                  cache_ids=long_ids[:340])
    prefill(lm.model, agent, long_ids[340:520])
    prefill(lm.model, live, long_ids[340:520])
    info = save(path, agent.cache, long_ids[:520], lm, ws.blocks)
    assert spans_of(path) == [256, 256] and blocks_of(path)[0] == big
    assert info.new_blocks == 1
    assert info.written == HEADER_SIZE + 256 * token_bytes(lm) + path.stat().st_size
    assert sorted(ws.collect_blocks()) == sorted(set(names) - {big})  # the 64-token block
    back = restore(lm, path, long_ids[:520], ws.blocks)
    assert np.array_equal(logits(lm, back), logits(lm, agent.cache))
    np.testing.assert_allclose(logits(lm, back), logits(lm, live.cache), atol=1e-4)


# ---- sharing --------------------------------------------------------------------------------------
def test_a_forks_big_block_is_stored_once_and_survives_a_reset(tmp_path, tiny_model, tok,
                                                               long_ids):
    lm = tiny_model
    ws = Workspace.open(tmp_path / "ws")
    ids = long_ids[:300]  # crosses 256
    tech = built(lm, ids)
    fork = Agent("business", "business", "Business", "system",
                 cache=kvcache.copy_cache(tech.cache), cache_ids=list(ids))
    extra = tok.encode(" Business asks what it costs per hour of downtime. " * 8)[:120]
    prefill(lm.model, fork, extra)
    t = save(ws.snapshot_path("technical"), tech.cache, ids, lm, ws.blocks)
    f = save(ws.snapshot_path("business"), fork.cache, ids + extra, lm, ws.blocks, "business")
    t_names, f_names = blocks_of(ws.snapshot_path("technical")), blocks_of(
        ws.snapshot_path("business"))
    assert spans_of(ws.snapshot_path("technical")) == [256]
    assert spans_of(ws.snapshot_path("business")) == [256, 64, 64]
    assert f_names[0] == t_names[0]  # one big block, named by both
    assert t.new_blocks == 1 and f.new_blocks == 2  # the fork wrote only its own blocks
    assert ws.blocks.names() == set(t_names) | set(f_names) and len(ws.blocks.names()) == 3
    assert ws.collect_blocks() == []

    ws.reset(ws.agent("technical"))  # collects: the shared big block is the fork's too
    assert ws.blocks.names() == set(f_names)
    cache = restore(lm, ws.snapshot_path("business"), ids + extra, ws.blocks)
    assert np.array_equal(logits(lm, cache), logits(lm, fork.cache))
    ws.reset(ws.agent("business"))
    assert ws.blocks.names() == set()


# ---- rewind -----------------------------------------------------------------------------------------
def test_rewind_into_a_big_block_writes_it_anew(tmp_path, tiny_model, tok, long_ids):
    lm = tiny_model
    ids = long_ids[:600]
    path = tmp_path / "agents/technical/kv.safetensors"
    store = BlockStore(tmp_path / "kv-blocks")
    save(path, built(lm, ids).cache, ids, lm, store)
    old = blocks_of(path)
    assert spans_of(path) == [256, 256, 64]
    cache = restore(lm, path, ids, store)
    keep = 300  # inside the second big block
    kvrewind.rewind(cache, len(ids) - keep)
    assert kvcache.persisted(cache)[0] == keep
    other = tok.encode(OTHER * 3)[:300]
    assert len(other) == 300
    new_ids = ids[:keep] + other
    agent = Agent("technical", "technical", "Technical", "system", cache=cache,
                  cache_ids=ids[:keep])
    prefill(lm.model, agent, other)
    info = save(path, agent.cache, new_ids, lm, store)
    new = blocks_of(path)
    assert spans_of(path) == [256, 256, 64]
    assert new[0] == old[0]  # wholly before the rewind: kept
    assert old[1] not in new and old[2] not in new
    assert info.new_blocks == 2
    back = restore(lm, path, new_ids, store)
    assert np.array_equal(logits(lm, back), logits(lm, agent.cache))
    rebuild = built(lm, new_ids)
    np.testing.assert_allclose(logits(lm, back), logits(lm, rebuild.cache), atol=1e-4)
    assert greedy(lm, back) == greedy(lm, rebuild.cache)


# ---- damage ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,words", [
    ("bitflip", "checksum"), ("truncated", "truncated"), ("missing", "missing"),
    ("a 64-token block", "truncated or not this model's"),
    ("another agent's big block", "header does not describe"),
])
def test_a_damaged_big_block_is_refused(tmp_path, tiny_model, tok, long_ids, kind, words):
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
        other = tok.encode(OTHER * 5)[:600]
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


# ---- format 4 ----------------------------------------------------------------------------------------
def as_format_4(path: Path) -> None:
    """Rewrite a format 5 manifest of 64-token blocks as format 4 wrote it: no block_spans."""
    assert set(spans_of(path)) <= {B}
    rewrite_manifest(path, {"format": FORMAT_V4}, drop=("block_spans",))
    meta = meta_of(path)
    assert meta["format"] == FORMAT_V4 and "block_spans" not in meta


def test_format_4_loads_and_the_next_save_compacts_it(tmp_path, tiny_model, long_ids):
    lm = tiny_model
    ids = long_ids[:600]
    live = built(lm, ids)
    path = tmp_path / "agents/technical/kv.safetensors"
    store = BlockStore(tmp_path / "kv-blocks")
    info = save(path, live.cache, ids, lm, store, compact=0)
    assert spans_of(path) == [B] * 9
    blocks_bytes = info.bytes - path.stat().st_size
    as_format_4(path)
    assert blocks_on_disk(meta_of(path)) == blocks_bytes  # 64 tokens a block, no spans
    cache = restore(lm, path, ids, store)
    assert np.array_equal(logits(lm, cache), logits(lm, live.cache))
    small = set(blocks_of(path))
    info = save(path, cache, ids, lm, store)
    assert meta_of(path)["format"] == FORMAT and spans_of(path) == [256, 256, 64]
    assert info.new_blocks == 2  # the two runs; the last 64-token block is kept by name
    assert blocks_of(path)[2] in small
    again = restore(lm, path, ids, store)
    assert np.array_equal(logits(lm, again), logits(lm, live.cache))
    assert greedy(lm, again) == greedy(lm, live.cache)


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


# ---- through the engine ----------------------------------------------------------------------------
# long enough that the first two turns hold a compacted run of 128 and the third crosses 256
MSGS = ("Our payment API returns 502 errors under load, mostly on retries from the mobile "
        "clients. The gateway logs show upstream timeouts after thirty seconds, and the queue "
        "behind the payment workers grows during every traffic peak. Where do we start?",
        "Which service should we look at first: the gateway, the payment workers, or the "
        "database connection pool that all of them share? The pool has forty connections and "
        "the workers scale out to sixty instances at the peak.",
        "What would you log to confirm it, and how long should we keep those logs before the "
        "next release goes out to the mobile clients? We also need to tell the support team "
        "what to say to merchants who see failed payments in the meantime.")



def test_engine_compacts_and_a_restart_replies_as_if_it_never_stopped(tmp_path, tiny_model,
                                                                      monkeypatch):
    monkeypatch.setattr(snapshot_write, "COMPACT_TOKENS", 128)
    ref, _ = session(tmp_path / "ref", tiny_model, MSGS)  # never restarted
    folder = tmp_path / "ws"
    first, _ = session(folder, tiny_model, MSGS[:2])
    assert [r.generated_ids for r in first] == [r.generated_ids for r in ref[:2]]
    path = folder / "agents/technical/kv.safetensors"
    meta = meta_of(path)
    spans = json.loads(meta["block_spans"])
    assert meta["format"] == FORMAT and spans and spans[0] == 128, spans
    assert spans == block_spans(sum(spans), B, 128)
    ws = Workspace.open(folder)
    assert ws.blocks.names() == set(blocks_of(path))  # the replaced 64-token blocks collected

    results, events = session(folder, tiny_model, MSGS[2:])
    restored = [e for e in events if isinstance(e, AgentRestored)]
    assert [(e.source, e.prefilled) for e in restored] == [("snapshot", 0)], restored
    assert results[0].generated_ids == ref[2].generated_ids
    # the restarted session's turn completed a second run of 128 from the restored cache
    meta = meta_of(path)
    cut = int(meta["tokens"]) // B * B
    assert cut >= 256 and json.loads(meta["block_spans"]) == block_spans(cut, B, 128)
    ws = Workspace.open(folder)
    assert ws.blocks.names() == set(blocks_of(path))
    agent = ws.agent("technical")
    read_snapshot(path, tiny_model.identity, agent.expected_ids(tiny_model.tokenizer), ws.blocks)


def test_engine_migrates_format_4_to_compacted_blocks(tmp_path, tiny_model, monkeypatch):
    folder = tmp_path / "ws"
    monkeypatch.setattr(snapshot_write, "COMPACT_TOKENS", 0)
    session(folder, tiny_model, MSGS[:2])
    ws = Workspace.open(folder)
    path = ws.snapshot_path("technical")
    ids = ws.agent("technical").expected_ids(tiny_model.tokenizer)
    assert len(ids) >= 128, len(ids)
    live = restore(tiny_model, path, ids, ws.blocks)
    as_format_4(path)
    small = set(blocks_of(path))
    back = restore(tiny_model, path, ids, ws.blocks)
    assert np.array_equal(logits(tiny_model, back), logits(tiny_model, live))

    # the engine restores it, marks it dirty (not the current format) and saves it compacted
    monkeypatch.setattr(snapshot_write, "COMPACT_TOKENS", 128)
    engine = Engine(folder, loaded=tiny_model, eager_restore=True)
    engine.start()
    try:
        engine.wait_ready(60)
        assert engine.restore("technical").result(60).source == "snapshot"
    finally:
        engine.shutdown()
    meta = meta_of(path)
    assert meta["format"] == FORMAT
    assert json.loads(meta["block_spans"]) == block_spans((len(ids) // B) * B, B, 128)
    ws = Workspace.open(folder)
    assert ws.blocks.names() == set(blocks_of(path))
    assert small - set(blocks_of(path))  # the compacted 64-token blocks were collected
    again = restore(tiny_model, path, ids, ws.blocks)
    assert np.array_equal(logits(tiny_model, again), logits(tiny_model, live))
