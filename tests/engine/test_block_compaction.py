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
  migration   format 4 manifests still load and the next save compacts them
  engine      the product path (Engine, flusher, collector) compacts and restores exactly
Damage, hostile manifests and a crash mid-save: test_block_compaction_damage.py.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from support.compaction import (
    OTHER,
    B,
    C,
    as_format_4,
    meta_of,
    save,
    spans_of,
    token_bytes,
)
from support.kv_checks import blocks_of, built, greedy, logits, restore, session
from support.tiny_models import WINDOW, tiny_model

from permeant_tui.engine import kvcache, kvrewind, snapshot_write
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.blockstore import BLOCK_HEADER, HEADER_SIZE, BlockStore
from permeant_tui.engine.events import AgentRestored
from permeant_tui.engine.generation import prefill
from permeant_tui.engine.snapshot import read_snapshot
from permeant_tui.engine.snapshot_format import FORMAT, block_spans, blocks_on_disk
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


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



# ---- format 4 ----------------------------------------------------------------------------------------
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
