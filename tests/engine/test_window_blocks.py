"""Window blocks (snapshot format permeant-kv/4): a sliding layer's positions that fill whole
blocks of WB inside its window are stored as content-addressed blocks of their own, the rest of
its window (head and tail, < WB positions each) in the manifest, so a turn writes only the
window blocks it completed instead of every sliding layer's whole window (Gemma 3 12B: 336 MB
a save at 4k). Run on two sliding-window architectures past their window (tiny models,
window 64): restores equal the live cache bit for bit and a rebuild's logits, blocks that left
the window are collected, damage is refused, format 3 files still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from support.kv_checks import TEXT, built, greedy, logits, restore
from support.tiny_models import WINDOW, tiny_model

from permeant_tui.engine import kvcache, snapshot_format, snapshot_write
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.blockstore import BlockStore
from permeant_tui.engine.errors import SnapshotCorrupt
from permeant_tui.engine.generation import prefill
from permeant_tui.engine.snapshot import read_header, write_snapshot

ARCHS = ["gemma3_text", "llama_swa"]
# The tiny models' window is 64: window blocks of 8 give it eight, as 32 give Gemma 3's 1,024
# window 32 (the product's size runs in test_snapshot_blocks and the engine tests).
WB = 8


@pytest.fixture(autouse=True)
def window_blocks_of_8(monkeypatch):
    monkeypatch.setattr(snapshot_write, "WINDOW_BLOCK_TOKENS", WB)


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


def step(lm, agent: Agent, ids: list[int]) -> None:
    """One token at a time, as decode writes them (the ring rotates)."""
    for t in ids:
        prefill(lm.model, agent, [t])




def meta_of(path: Path) -> dict:
    return read_header(path)["__metadata__"]


def window_names(path: Path) -> list[str]:
    return json.loads(meta_of(path)["window_blocks"])


def sliding_layers(lm) -> list[int]:
    return [i for i, w in enumerate(lm.identity.layer_windows()) if w]


# ---- reading a ring without copying the window --------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_window_rows_are_the_logical_windows_positions(tok, arch):
    """kvcache.window_rows (slices of the ring) equals the layer's logical state for every
    range it holds, in each shape mlx-lm leaves a rotating cache in: linear before the window
    fills, linear after a multi-token update past it, a wrapped ring after single steps; and
    refuses positions the layer does not hold."""
    lm = tiny_model(arch, tok)[1]
    ids = tok.encode(TEXT)
    agent = built(lm, ids[:40])  # not yet full: linear
    shapes = set()

    def check() -> None:
        for i in sliding_layers(lm):
            layer = agent.cache[i]
            st = kvcache.layer_state(layer)
            _, _, offset, _, _, idx = layer.state
            shapes.add("linear" if int(idx) == int(layer.state[0].shape[2]) or
                       int(offset) < WINDOW else "ring")
            lo = st.offset - st.length
            for a, b in [(lo, st.offset), (lo, lo + 1), (st.offset - 1, st.offset),
                         (lo + 5, st.offset - 7), (st.offset, st.offset)]:
                if not lo <= a <= b:
                    continue
                k, v = kvcache.window_rows(layer, a, b)
                assert mx.array_equal(k, st.keys[..., a - lo:b - lo, :]).item(), (a, b)
                assert mx.array_equal(v, st.values[..., a - lo:b - lo, :]).item(), (a, b)
            for a, b in [(lo - 1, st.offset), (lo, st.offset + 1)]:
                if a >= 0 or lo > 0:
                    with pytest.raises(kvcache.CacheLayoutError):
                        kvcache.window_rows(layer, a, b)

    check()
    prefill(lm.model, agent, ids[40:160])  # a multi-token update past the window: linear
    check()
    step(lm, agent, ids[160:181])  # single steps: a ring, wrapped at some index
    check()
    prefill(lm.model, agent, ids[181:200])  # a multi-token update onto a ring
    check()
    step(lm, agent, ids[200:203])
    check()
    assert shapes == {"linear", "ring"}


# ---- saves past the window ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_turns_past_the_window_write_only_the_window_blocks_they_complete(tmp_path, tok, arch):
    """Four turns past the window, saved after each: a save writes the window blocks completed
    since the last one and reuses the rest by name; the manifest holds under 2 * WB positions
    of each sliding layer; every restore equals the live cache (logits bit-equal, greedy ids
    equal) and a rebuild by prefill; window blocks that left the window are collected."""
    lm = tiny_model(arch, tok)[1]
    ids = tok.encode(TEXT)
    n0 = 3 * WINDOW + 5
    assert len(ids) >= n0 + 4 * 13
    live = built(lm, ids[:n0])
    path = tmp_path / "agents/technical/kv.safetensors"
    store = BlockStore(tmp_path / "kv-blocks")
    write_snapshot(path, live.cache, ids[:n0], lm.identity, "technical", store)
    before = window_names(path)
    assert before
    n = n0
    for turn in range(4):
        step(lm, live, ids[n:n + 13])
        n += 13
        info = write_snapshot(path, live.cache, ids[:n], lm.identity, "technical", store)
        names = window_names(path)
        lo = n - WINDOW
        j0, j1 = -(-lo // WB), n // WB
        assert len(names) == j1 - j0
        kept = set(names) & set(before)
        completed = len(set(names) - set(before))
        # a window block is written once, when complete: the rest are the last save's names
        assert completed <= -(-13 // WB) + 1, (turn, completed)
        assert len(kept) == len(names) - completed
        assert info.new_blocks >= completed
        tensors = mx.load(str(path))
        for i in sliding_layers(lm):
            assert tensors[f"k.{i}"].shape[2] == (j0 * WB - lo) + (n - j1 * WB) < 2 * WB
        cache = restore(lm, path, ids[:n])
        assert np.array_equal(logits(lm, cache), logits(lm, live.cache))
        assert greedy(lm, cache) == greedy(lm, live.cache)
        before = names
    rebuild = built(lm, ids[:n])
    np.testing.assert_allclose(logits(lm, cache), logits(lm, rebuild.cache), atol=1e-4)
    assert greedy(lm, cache) == greedy(lm, rebuild.cache)
    meta = meta_of(path)
    referenced = set(json.loads(meta["blocks"])) | set(window_names(path))
    removed = store.collect(referenced)
    assert removed and not set(removed) & referenced
    assert {p.name[:-4] for p in store.folder.glob("*.kvb")} == referenced
    # the collected ones were window blocks that left the window, and the agent still restores
    cache = restore(lm, path, ids[:n])
    assert np.array_equal(logits(lm, cache), logits(lm, live.cache))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_restored_agent_goes_on_and_saves_only_its_new_window_blocks(tmp_path, tok, arch):
    """Restore, decode past more window blocks, save: the blocks read at restore are not read
    again or rewritten (their names come from the restore), the new ones are; the result
    equals an agent that never left memory."""
    lm = tiny_model(arch, tok)[1]
    ids = tok.encode(TEXT)
    n = 2 * WINDOW + 9
    live = built(lm, ids[:n])
    path = tmp_path / "agents/technical/kv.safetensors"
    store = BlockStore(tmp_path / "kv-blocks")
    write_snapshot(path, live.cache, ids[:n], lm.identity, "technical", store)
    first = set(window_names(path))
    agent = Agent("technical", "technical", "Technical", "system")
    agent.cache = restore(lm, path, ids[:n])
    m = n + 2 * WB + 3
    step(lm, agent, ids[n:m])
    step(lm, live, ids[n:m])
    blocks_read: list[tuple[int, int]] = []
    real = kvcache.window_rows

    def counting(layer, a, b):
        if b - a == WB and a % WB == 0:
            blocks_read.append((a, b))
        return real(layer, a, b)

    kvcache.window_rows = counting
    try:
        info = write_snapshot(path, agent.cache, ids[:m], lm.identity, "technical", store)
    finally:
        kvcache.window_rows = real
    now = set(window_names(path))
    new = now - first
    assert len(new) == m // WB - n // WB == 2 and info.new_blocks >= len(new)
    assert now & first  # the rest of the window is the restore's blocks, by name
    # read from the ring: only the blocks past what the restore marked clean (the full
    # blocks' end, a multiple of 64): the new ones, and one restored that ends past it
    clean = n // snapshot_format.BLOCK_TOKENS * snapshot_format.BLOCK_TOKENS
    assert {a // WB for a, _ in blocks_read} == set(range(clean // WB, m // WB))
    assert len(set(range(clean // WB, m // WB))) < len(now)
    cache = restore(lm, path, ids[:m])
    assert np.array_equal(logits(lm, cache), logits(lm, live.cache))
    assert greedy(lm, cache) == greedy(lm, live.cache)


# ---- damage and older files --------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["bitflip", "missing", "list edited", "other agent's"])
def test_a_damaged_window_block_is_refused(tmp_path, tok, damage):
    lm = tiny_model("gemma3_text", tok)[1]
    ids = tok.encode(TEXT)[:2 * WINDOW + 21]
    agent = built(lm, ids)
    path = tmp_path / "agents/technical/kv.safetensors"
    store = BlockStore(tmp_path / "kv-blocks")
    write_snapshot(path, agent.cache, ids, lm.identity, "technical", store)
    names = window_names(path)
    victim = store.path(names[len(names) // 2])
    if damage == "bitflip":
        raw = victim.read_bytes()
        victim.write_bytes(raw[:-9] + bytes([raw[-9] ^ 0x40]) + raw[-8:])
        check, words = "block", "checksum"
    elif damage == "missing":
        victim.unlink()
        check, words = "block", "missing"
    elif damage == "list edited":  # the manifest's checksum covers the window block list
        raw = path.read_bytes()
        path.write_bytes(raw.replace(names[0][:8].encode(), names[1][:8].encode(), 1))
        check, words = "checksum", "checksum"
    else:  # another conversation's window blocks, the manifest's checksum made to match
        other = tok.encode("Another conversation entirely. " * 40)[:len(ids)]
        other_path = tmp_path / "agents/business/kv.safetensors"
        write_snapshot(other_path, built(lm, other).cache, other, lm.identity, "business", store)
        arrays, meta = mx.load(str(path), return_metadata=True)
        swapped = dict(meta, window_blocks=meta_of(other_path)["window_blocks"])
        assert swapped["window_blocks"] != meta["window_blocks"]
        metas = json.loads(meta["layer_meta"])
        ordered = [arrays[f"{kv}.{i}"] for i in range(len(metas)) for kv in ("k", "v")]
        swapped["checksum"] = snapshot_format._tensor_checksum(
            ordered, snapshot_format.covered_of(swapped))
        path.unlink()
        mx.save_safetensors(str(path), arrays, metadata=swapped)
        check, words = "blocks", "window block names"
    with pytest.raises(SnapshotCorrupt) as ei:
        restore(lm, path, ids)
    assert ei.value.check == check and words in ei.value.detail, ei.value
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_format_3_windows_still_load_and_the_next_save_writes_window_blocks(tmp_path, tok,
                                                                            monkeypatch, arch):
    """A format 3 manifest (whole windows in it) restores as before; the next save writes
    format 4 with window blocks; both equal the live cache."""
    lm = tiny_model(arch, tok)[1]
    ids = tok.encode(TEXT)[:2 * WINDOW + 30]
    live = built(lm, ids)
    path = tmp_path / "agents/technical/kv.safetensors"
    store = BlockStore(tmp_path / "kv-blocks")
    with monkeypatch.context() as m:
        m.setattr(snapshot_write, "FORMAT", snapshot_format.FORMAT_V3)
        m.setattr(snapshot_write, "window_plan", lambda metas, n, b: None)
        m.setattr(snapshot_write, "_covered", lambda lm_, b, bt, *rest: snapshot_format._covered(
            lm_, b, bt))
        write_snapshot(path, live.cache, ids, lm.identity, "technical", store)
    meta = meta_of(path)
    assert meta["format"] == snapshot_format.FORMAT_V3
    tensors = mx.load(str(path))
    for i in sliding_layers(lm):
        assert tensors[f"k.{i}"].shape[2] == WINDOW  # the whole window, in the manifest
    old = tmp_path / "v3.safetensors"
    shutil.copyfile(path, old)
    cache = restore(lm, path, ids)
    assert np.array_equal(logits(lm, cache), logits(lm, live.cache))
    write_snapshot(path, cache, ids, lm.identity, "technical", store)
    assert meta_of(path)["format"] == snapshot_format.FORMAT and window_names(path)
    again = restore(lm, path, ids)
    assert np.array_equal(logits(lm, again), logits(lm, live.cache))
    assert greedy(lm, again) == greedy(lm, live.cache)


# ---- a turn's checkpoint on a sliding model ----------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_a_checkpoint_holds_the_ring_without_a_copy_and_a_cancel_keeps_the_snapshot_mark(
        tmp_path, tok, arch):
    """kvrewind.checkpoint keeps each ring by reference (the same memory, no copy: a copy of
    Gemma 3 12B's windows took 65 ms a turn); single steps and a multi-token update after it
    leave it as it was, so a cancel brings back exactly the turn-start cache; and the cancelled
    cache still knows what the snapshot holds: the next save reads no block again, writes
    none, and restores equal to an agent that never ran the cancelled turn."""
    from permeant_tui.engine import kvrewind

    lm = tiny_model(arch, tok)[1]
    ids = tok.encode(TEXT)
    n = 2 * WINDOW + 7
    live = built(lm, ids[:n])
    step(lm, live, ids[n:n + 5])  # the ring wraps
    n += 5
    path = tmp_path / "agents/technical/kv.safetensors"
    write_snapshot(path, live.cache, ids[:n], lm.identity, "technical")
    before = logits(lm, live.cache)
    cp = kvrewind.checkpoint(live.cache)
    for i in sliding_layers(lm):
        held = np.array(cp.sliding[i][0], copy=False)
        ring = np.array(live.cache[i].state[0], copy=False)
        assert held.ctypes.data == ring.ctypes.data  # the same memory: nothing copied
    step(lm, live, ids[n:n + 9])  # in-place updates
    prefill(lm.model, live, ids[n + 9:n + 40])  # a multi-token update
    step(lm, live, ids[n + 40:n + 43])
    kvrewind.restore_checkpoint(live.cache, cp)
    assert kvcache.offsets(live.cache) == [n] * len(live.cache)
    assert np.array_equal(logits(lm, live.cache), before)
    reads: list = []
    real = kvcache.window_rows

    def counting(layer, a, b):
        if b - a == WB:
            reads.append(a)
        return real(layer, a, b)

    kvcache.window_rows = counting
    try:
        info = write_snapshot(path, live.cache, ids[:n], lm.identity, "technical")
    finally:
        kvcache.window_rows = real
    assert info.new_blocks == 0
    clean = n // snapshot_format.BLOCK_TOKENS * snapshot_format.BLOCK_TOKENS
    assert all(a + WB > clean for a in reads)  # only blocks past the full blocks' end re-read
    again = restore(lm, path, ids[:n])
    assert np.array_equal(logits(lm, again), before)
    ref = built(lm, ids[:n - 5])  # built as `live` was, never ran the cancelled turn
    step(lm, ref, ids[n - 5:n])
    assert np.array_equal(logits(lm, again), logits(lm, ref.cache))
    assert greedy(lm, again) == greedy(lm, ref.cache)
