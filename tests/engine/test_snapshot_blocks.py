"""Format permeant-kv/3: K/V blocks shared through a content-addressed store, a small manifest
per agent. Saves write only what is new; a damaged, missing or truncated block or manifest is
refused with one line (and the engine rebuilds by prefill from the intact transcript); a crash
between the blocks and the manifest leaves the old snapshot restorable; shared blocks are stored
once and collected only when no manifest names them; format 2 files load and are migrated;
restores are bit-exact, and on llama, qwen and a sliding-window gemma3 agree with a rebuild."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from support.kv_checks import (
    TEXT,
    blocks_of,
    built,
    greedy,
    logits,
    refused,
    restore,
    saved_snapshot,
    session,
)
from support.tiny_models import WINDOW, tiny_model

from permeant_tui.engine import blockstore, kvcache, kvrewind, snapshot_write
from permeant_tui.engine import snapshot as snapmod
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.blockstore import BlockStore
from permeant_tui.engine.events import AgentRestored
from permeant_tui.engine.generation import prefill
from permeant_tui.engine.snapshot import attach, read_header, read_snapshot, write_snapshot
from permeant_tui.engine.snapshot_format import WINDOW_BLOCK_TOKENS as WB
from permeant_tui.engine.usxf.layout import block_hashes
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace

B = snapmod.BLOCK_TOKENS


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer








@pytest.fixture
def saved(tmp_path, tiny_model, tok):
    """A 2-layer agent of len(TEXT) tokens saved as a manifest plus blocks."""
    out = saved_snapshot(tmp_path, tiny_model, tok)
    assert len(out[1]) > 3 * B
    return out


# ---- the format -------------------------------------------------------------------------------
def test_block_names_chain_usxf_block_hashes(tok, tiny_model):
    ids = tok.encode(TEXT)
    fp = tiny_model.identity.fingerprint
    assert blockstore.chain_hashes(ids, fp, B) == block_hashes(ids, fp, B)[:len(ids) // B]
    assert blockstore.chain_hashes(ids, "0" * 32, B) != blockstore.chain_hashes(ids, fp, B)


def test_round_trip_and_incremental_saves(saved, tiny_model, tok):
    path, ids, agent, info = saved
    store = BlockStore(path.parents[2] / "kv-blocks")
    n = len(ids)
    assert info.blocks == info.new_blocks == n // B and info.written == info.bytes
    assert sorted(store.names()) == sorted(blocks_of(path))
    ident = tiny_model.identity  # 2 layers x (K, V) x heads x B rows x head_dim x float32
    assert os.path.getsize(store.path(blocks_of(path)[0])) == \
        blockstore.HEADER_SIZE + 2 * 2 * ident.n_kv_heads * B * ident.head_dim * 4
    cache = restore(tiny_model, path, ids)
    assert np.array_equal(logits(tiny_model, cache), logits(tiny_model, agent.cache))
    assert kvcache.cache_offset(cache) == n
    # room for the next turn: the restored layers have the capacity a live cache would have
    k = cache[0].state[0]
    assert k.shape[2] > n and k.shape[2] % 256 == 0

    # A turn of 20 tokens: only the blocks it completes and the manifest are written.
    first = blocks_of(path)
    more = tok.encode(" The retry budget is the first thing to check. " * 3)[:20]
    prefill(tiny_model.model, agent, more)
    ids2 = ids + more
    info2 = write_snapshot(path, agent.cache, ids2, tiny_model.identity, "technical")
    assert info2.blocks == len(ids2) // B and info2.new_blocks == len(ids2) // B - n // B
    assert info2.written < info2.bytes / 2
    assert blocks_of(path)[:n // B] == first
    cache2 = restore(tiny_model, path, ids2)
    assert np.array_equal(logits(tiny_model, cache2), logits(tiny_model, agent.cache))

    # A restored cache saved again reads and writes no block.
    info3 = write_snapshot(path, cache2, ids2, tiny_model.identity, "technical")
    assert info3.new_blocks == 0 and info3.written == path.stat().st_size


def test_a_whole_number_of_blocks_leaves_an_empty_tail(saved, tiny_model):
    path, ids, agent, _ = saved
    n = (len(ids) // B) * B
    info = write_snapshot(path, agent.cache, ids[:n], tiny_model.identity, "technical")
    assert info.blocks == n // B and info.new_blocks == 0
    with mx.stream(mx.cpu):
        assert mx.load(str(path))["k.0"].shape[2] == 0
    live = kvcache.copy_cache(agent.cache)
    kvrewind.rewind(live, len(ids) - n)
    cache = restore(tiny_model, path, ids[:n])
    assert np.array_equal(logits(tiny_model, cache), logits(tiny_model, live))


def test_a_cache_holding_transposed_kv_saves_and_restores(tmp_path, tiny_model, tok):
    """One update that fills mlx-lm's whole buffer (a 512-token prefill chunk on the engine's CPU
    path) can leave the cache holding the projection's transposed view [1, T, H, D] -> [1, H,
    T, D], whose per-head rows are not contiguous. Built here directly from such views."""
    ids = (tok.encode(TEXT) * 2)[:512]
    agent = built(tiny_model, ids)

    def transposed(x):
        t = mx.array(np.ascontiguousarray(np.array(x).transpose(0, 2, 1, 3)))
        return mx.transpose(t, (0, 2, 1, 3))

    states = [kvcache.LayerState(kvcache.FULL, transposed(st.keys), transposed(st.values), 512)
              for st in kvcache.layer_states(agent.cache)]
    cache = kvcache.cache_from_layer_states(tiny_model.model, states)
    kvcache.eval_cache(cache)
    k = np.array(kvcache.layer_states(cache)[0].keys, copy=False)
    assert not k[0, 0].flags.c_contiguous  # the case this test is about
    path = tmp_path / "agents/technical/kv.safetensors"
    write_snapshot(path, cache, ids, tiny_model.identity, "technical")
    back = restore(tiny_model, path, ids)
    assert np.array_equal(logits(tiny_model, back), logits(tiny_model, agent.cache))


def test_rewind_into_a_block_rewrites_it(saved, tiny_model, tok):
    """Positions a rewind gave back are never taken from the blocks saved before it."""
    path, ids, agent, _ = saved
    cache = restore(tiny_model, path, ids)
    clean, _ = kvcache.persisted(cache)
    assert clean == (len(ids) // B) * B
    keep = B + 5
    kvrewind.rewind(cache, len(ids) - keep)
    assert kvcache.persisted(cache)[0] == keep
    other = tok.encode("A different continuation about the database pool. " * 12)
    live = built(tiny_model, ids[:keep] + other)
    b = Agent("technical", "technical", "Technical", "system", cache=cache, cache_ids=ids[:keep])
    prefill(tiny_model.model, b, other)
    new_ids = ids[:keep] + other
    info = write_snapshot(path, b.cache, new_ids, tiny_model.identity, "technical")
    assert blocks_of(path)[0] in BlockStore(path.parents[2] / "kv-blocks").names()
    assert info.new_blocks == len(new_ids) // B - 1  # block 0 is unchanged and kept
    back = restore(tiny_model, path, new_ids)
    assert np.array_equal(logits(tiny_model, back), logits(tiny_model, b.cache))
    np.testing.assert_allclose(logits(tiny_model, back), logits(tiny_model, live.cache),
                               atol=1e-4)


# ---- damage -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,words", [
    ("bitflip", "checksum"), ("truncated", "truncated"), ("missing", "missing"),
    ("empty", "truncated"), ("swapped", "header does not describe"), ("folder", "regular"),
])
def test_damaged_block_is_refused(saved, tiny_model, kind, words):
    path, ids, _, _ = saved
    store = BlockStore(path.parents[2] / "kv-blocks")
    names = blocks_of(path)
    victim = store.path(names[1])
    raw = victim.read_bytes()
    if kind == "bitflip":
        victim.write_bytes(raw[:-100] + bytes([raw[-100] ^ 0x10]) + raw[-99:])
    elif kind == "truncated":
        victim.write_bytes(raw[:-1])
    elif kind == "missing":
        victim.unlink()
    elif kind == "empty":
        victim.write_bytes(b"")
    elif kind == "swapped":
        shutil.copyfile(store.path(names[2]), victim)
    elif kind == "folder":
        victim.unlink()
        victim.mkdir()
    exc = refused(tiny_model, path, ids, "block")
    assert exc.path == str(victim) and words in exc.detail


def test_truncated_or_edited_manifest_is_refused(saved, tiny_model):
    path, ids, _, _ = saved
    raw = path.read_bytes()
    path.write_bytes(raw[:-7])
    refused(tiny_model, path, ids, "format")
    # A block list edited to name other blocks: refused (the checksum covers the list).
    path.write_bytes(raw)
    first, second = blocks_of(path)[:2]
    path.write_bytes(raw.replace(first.encode(), second.encode(), 1))
    refused(tiny_model, path, ids, "checksum")


def test_crash_between_blocks_and_manifest_keeps_the_old_snapshot(saved, tiny_model, tok,
                                                                  monkeypatch):
    path, ids, agent, _ = saved
    old_logits = logits(tiny_model, agent.cache)
    more = tok.encode(" Then the queue drains and the alerts stop. " * 8)
    prefill(tiny_model.model, agent, more)

    def killed(tmp, target):  # the process dies after the blocks, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(snapshot_write, "commit_file", killed)
    with pytest.raises(KeyboardInterrupt):
        write_snapshot(path, agent.cache, ids + more, tiny_model.identity, "technical")
    monkeypatch.undo()
    ws = Workspace.open(path.parents[2])
    orphans = ws.blocks.names() - set(blocks_of(path))
    assert orphans  # the new blocks reached the store, the manifest never named them
    cache = restore(tiny_model, path, ids)
    assert np.array_equal(logits(tiny_model, cache), old_logits)
    assert sorted(ws.collect_blocks()) == sorted(orphans)
    cache = restore(tiny_model, path, ids)  # every block it names survived the collection
    assert np.array_equal(logits(tiny_model, cache), old_logits)


# ---- sharing and collection ----------------------------------------------------------------------
def test_shared_blocks_are_stored_once_and_collected_when_unreferenced(tmp_path, tiny_model, tok):
    ws = Workspace.open(tmp_path / "ws")
    ids = tok.encode(TEXT)
    tech = built(tiny_model, ids)
    fork = Agent("business", "business", "Business", "system",
                 cache=kvcache.copy_cache(tech.cache), cache_ids=list(ids))  # a forked agent
    extra = tok.encode(" Business asks what it costs per hour of downtime. " * 6)
    prefill(tiny_model.model, fork, extra)
    t = write_snapshot(ws.snapshot_path("technical"), tech.cache, ids, tiny_model.identity,
                       "technical", ws.blocks)
    f = write_snapshot(ws.snapshot_path("business"), fork.cache, ids + extra,
                       tiny_model.identity, "business", ws.blocks)
    shared = set(blocks_of(ws.snapshot_path("technical")))
    assert shared <= set(blocks_of(ws.snapshot_path("business")))
    assert f.new_blocks == f.blocks - t.blocks  # the history is not written twice
    assert len(ws.blocks.names()) == f.blocks
    assert ws.collect_blocks() == []

    # An unreadable manifest: nothing is collected (the blocks it names are unknown).
    own = set(blocks_of(ws.snapshot_path("business"))) - shared
    good = ws.snapshot_path("business").read_bytes()
    ws.snapshot_path("business").write_bytes(good[:50])
    (ws.folder / "agents/technical/kv.safetensors").unlink()
    assert ws.collect_blocks() == [] and len(ws.blocks.names()) == f.blocks
    ws.snapshot_path("business").write_bytes(good)
    write_snapshot(ws.snapshot_path("technical"), tech.cache, ids, tiny_model.identity,
                   "technical", ws.blocks)

    # A dead writer's temp file goes; a live one's stays.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ws.blocks.folder / f".x.kvb.{dead.pid}.tmp").write_bytes(b"partial")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (ws.blocks.folder / f".y.kvb.{alive.pid}.tmp").write_bytes(b"being written")

    # Resetting business: its own blocks go, the shared ones stay, technical still restores.
    ws.reset(ws.agent("business"))
    assert ws.blocks.names() == shared and own.isdisjoint(ws.blocks.names())
    assert not (ws.blocks.folder / f".x.kvb.{dead.pid}.tmp").exists()
    assert (ws.blocks.folder / f".y.kvb.{alive.pid}.tmp").exists()
    alive.kill()
    alive.wait()
    cache = restore(tiny_model, ws.snapshot_path("technical"), ids, ws.blocks)
    assert np.array_equal(logits(tiny_model, cache), logits(tiny_model, tech.cache))
    ws.reset(ws.agent("technical"))
    assert ws.blocks.names() == set()


# ---- through the engine ------------------------------------------------------------------------
MSGS = ("Our payment API returns 502 errors under load, mostly on retries from the mobile "
        "clients. Where do we start?", "Which service should we look at first?",
        "What would you log to confirm it?")



@pytest.mark.parametrize("damage", ["missing", "bitflip"])
def test_engine_rebuilds_when_a_block_is_bad(tmp_path, tiny_model, damage):
    session(tmp_path / "ref", tiny_model, MSGS[:2])
    shutil.copytree(tmp_path / "ref", tmp_path / "bad")
    ref, _ = session(tmp_path / "ref", tiny_model, MSGS[2:])
    folder = tmp_path / "bad"
    names = blocks_of(folder / "agents/technical/kv.safetensors")
    assert names
    victim = folder / "kv-blocks" / f"{names[0]}.kvb"
    if damage == "missing":
        victim.unlink()
    else:
        raw = bytearray(victim.read_bytes())
        raw[-3] ^= 1
        victim.write_bytes(bytes(raw))
    transcript = (folder / "agents/technical/transcript.jsonl").read_bytes()
    results, events = session(folder, tiny_model, MSGS[2:])
    restored = [e for e in events if isinstance(e, AgentRestored)]
    assert [e.source for e in restored] == ["prefill"]
    assert restored[0].reason.startswith("block check failed"), restored[0].reason
    assert (folder / "agents/technical/transcript.jsonl").read_bytes().startswith(transcript)
    assert results[0].generated_ids == ref[0].generated_ids
    # saved again, complete: every block it names is there and verifies
    ws = Workspace.open(folder)
    agent = ws.agent("technical")
    read_snapshot(ws.snapshot_path("technical"), tiny_model.identity,
                  agent.expected_ids(tiny_model.tokenizer), ws.blocks)


def write_v2(path: Path, cache, ids, identity) -> None:
    """A snapshot in format permeant-kv/2 (one file, every layer's K/V), as before blocks."""
    states = kvcache.layer_states(cache, len(ids))
    arrays, metas, ordered = {"token_ids": mx.array(np.asarray(ids, dtype=np.int32))}, [], []
    for i, st in enumerate(states):
        arrays[f"k.{i}"], arrays[f"v.{i}"] = st.keys, st.values
        ordered += [st.keys, st.values]
        metas.append({**st.meta(), "parts": 1})
    layer_meta = json.dumps(metas, sort_keys=True, separators=(",", ":"))
    meta = {"format": "permeant-kv/2", "agent": "technical", "identity": identity.fingerprint,
            "model": identity.name, "tokens": str(len(ids)),
            "tokens_digest": snapmod.ids_digest(ids), "kv_dtype": identity.kv_dtype,
            "layers": str(len(states)), "layer_meta": layer_meta,
            "checksum": snapmod._tensor_checksum(ordered, layer_meta)}
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path), arrays, metadata=meta)


def test_format_2_loads_and_is_migrated_on_the_next_save(tmp_path, tiny_model):
    folder = tmp_path / "ws"
    session(folder, tiny_model, MSGS[:2])
    ws = Workspace.open(folder)
    agent = ws.agent("technical")
    ids = agent.expected_ids(tiny_model.tokenizer)
    path = ws.snapshot_path("technical")
    live = restore(tiny_model, path, ids, ws.blocks)
    path.unlink()
    write_v2(path, live, ids, tiny_model.identity)
    ws.collect_blocks()
    assert ws.blocks.names() == set()
    states, got, meta = read_snapshot(path, tiny_model.identity, ids, ws.blocks)
    assert meta["format"] == "permeant-kv/2"
    assert np.array_equal(logits(tiny_model, attach(tiny_model.model, states)),
                          logits(tiny_model, live))
    # The engine restores it, and writes format 3 when it shuts down (no new turn needed).
    engine = Engine(folder, loaded=tiny_model, eager_restore=True)
    engine.start()
    engine.wait_ready(60)
    engine.restore("technical").result(60)
    engine.shutdown()
    assert read_header(path)["__metadata__"]["format"] == snapmod.FORMAT
    assert ws.blocks.names() == set(blocks_of(path)) and blocks_of(path)
    assert np.array_equal(logits(tiny_model, restore(tiny_model, path, ids, ws.blocks)),
                          logits(tiny_model, live))


# ---- other architectures: restore equals the live cache and agrees with a rebuild ---------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_restore_equals_live_and_rebuild(tmp_path, tok, arch):
    lm = tiny_model(arch, tok)[1]
    ids = tok.encode(TEXT)
    n = len(ids)
    live = built(lm, ids[:-40])  # a prefill, then a turn's worth of single steps
    for t in ids[-40:]:
        prefill(lm.model, live, [t])
    path = tmp_path / "agents/technical/kv.safetensors"
    write_snapshot(path, live.cache, ids, lm.identity, "technical")
    meta = read_header(path)["__metadata__"]
    layer_meta = json.loads(meta["layer_meta"])
    windows = lm.identity.layer_windows()
    cut = (n // B) * B
    with mx.stream(mx.cpu):
        tensors = mx.load(str(path))
    # sliding layers keep only their window: the positions of it that fill whole window blocks
    # of WB in blocks of their own, the rest (head and tail, < WB each) in the manifest
    lo = n - min(n, WINDOW)
    j0, j1 = -(-lo // WB), n // WB
    window_names = json.loads(meta["window_blocks"])
    for i, w in enumerate(windows):
        assert layer_meta[i]["length"] == (min(n, w) if w else n)
        assert tensors[f"k.{i}"].shape[2] == ((j0 * WB - lo) + (n - j1 * WB) if w else n - cut)
    sliding = sum(1 for w in windows if w)
    assert len(window_names) == (j1 - j0 if sliding else 0)
    if arch == "gemma3_text":
        assert n > 2 * WINDOW and sliding == 2 and j1 - j0 >= WINDOW // WB - 1
    full_layers = len(windows) - sliding
    heads, dim = lm.identity.n_kv_heads, lm.identity.head_dim
    name = blocks_of(path)[0]
    blocks = path.parents[2] / "kv-blocks"
    assert os.path.getsize(blocks / f"{name}.kvb") == \
        blockstore.HEADER_SIZE + full_layers * 2 * heads * B * dim * 4
    for name in window_names:
        assert os.path.getsize(blocks / f"{name}.kvb") == \
            blockstore.HEADER_SIZE + sliding * 2 * heads * WB * dim * 4

    cache = restore(lm, path, ids)
    assert np.array_equal(logits(lm, cache), logits(lm, live.cache))
    assert greedy(lm, cache, 198) == greedy(lm, live.cache, 198)
    rebuild = built(lm, ids)
    np.testing.assert_allclose(logits(lm, cache), logits(lm, rebuild.cache), atol=1e-4)
    assert greedy(lm, cache, 198) == greedy(lm, rebuild.cache, 198)
