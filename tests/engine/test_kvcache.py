"""engine/kvcache.py on tiny random-weight MLX models of every cache layout mlx-lm uses here:
full attention (llama, qwen2, qwen3, phi3) and sliding windows (gemma3_text, also with 4-bit
weights, and a llama with `layer_types`). A conversation runs past the 64-token window; a
snapshot restores it bit for bit; a cancelled turn goes back exactly; a rebuild by prefill
agrees; nothing trims silently; a tampered per-layer length is rejected."""

from __future__ import annotations

import json
import threading

import mlx.core as mx
import numpy as np
import pytest
from support.tiny_models import SLIDING, WINDOW, tiny_model

from permeant_tui.engine import kvcache, kvrewind
from permeant_tui.engine import snapshot as snapmod
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.errors import SnapshotCorrupt, TurnCancelled
from permeant_tui.engine.exchange import greedy_probe
from permeant_tui.engine.generation import (
    TurnParams,
    prefill,
    run_turn,
    sync_to_transcript,
    trim_to,
    undo_turn,
)

ARCHS = ["llama", "qwen2", "qwen3", "phi3", "gemma3_text", "gemma3_text_q4", "llama_swa"]
MSGS = ("Our payment API returns 502 errors under load.", "Which service should we look at first?",
        "What would you log to confirm it?", "And after the fix?")
LONG = "Here is the full log of the incident, line by line. " * 70  # > one 512-token chunk


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


def lm_of(arch, tok):
    return tiny_model(arch, tok)[1]


class CancelAfter:
    """A cancel flag that turns on at its k-th look (run_turn looks once per prefill chunk and
    once per generated token): a deterministic cancel at a chosen point of a turn."""

    def __init__(self, k: int):
        self.k, self.seen = k, 0

    def is_set(self) -> bool:
        self.seen += 1
        return self.seen >= self.k


def turn(lm, agent, text, cancel=None, max_tokens=12):
    return run_turn(lm.model, lm.tokenizer, agent, text, TurnParams(max_tokens=max_tokens),
                    context_limit=4096, turn_id=1, emit=lambda e: None,
                    cancel=cancel or threading.Event(), source="test")


def conversation(lm, msgs=MSGS[:3]) -> Agent:
    agent = Agent("technical", "technical", "Technical", "You are a technical expert.")
    for m in msgs:
        turn(lm, agent, m, max_tokens=24)
    return agent


def rebuilt(lm, agent) -> Agent:
    """The same transcript, its cache rebuilt by one prefill (what --rebuild does)."""
    b = Agent(agent.agent_id, agent.role, agent.title, agent.system, list(agent.turns))
    sync_to_transcript(lm.model, lm.tokenizer, b)
    return b


def next_logits(lm, agent) -> np.ndarray:
    """Logits of a fixed next token, computed on a copy (the agent's cache is not touched)."""
    out = lm.model(mx.array([[198]]), cache=kvcache.copy_cache(agent.cache))
    return np.array(out[0, -1].astype(mx.float32))


def consistent(lm, agent) -> None:
    assert agent.cache_ids == agent.expected_ids(lm.tokenizer)
    assert kvcache.offsets(agent.cache) == [len(agent.cache_ids)] * len(agent.cache)


# ---- identity --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,windows,bases,dims", [
    ("llama", [0, 0, 0], None, None),
    ("qwen2", [0, 0, 0], None, None),  # use_sliding_window: false -> no window
    ("qwen3", [0, 0, 0], None, None),
    ("phi3", [0, 0, 0], [10000.0] * 3, [8] * 3),  # full attention, partial rotary (half)
    ("gemma3_text", [WINDOW, WINDOW, 0], [1e4, 1e4, 1e6], [16] * 3),
    ("gemma3_text_q4", [WINDOW, WINDOW, 0], [1e4, 1e4, 1e6], [16] * 3),
    ("llama_swa", [WINDOW, 0, WINDOW], [1e4] * 3, [16] * 3),
])
def test_identity_describes_each_layer(tok, arch, windows, bases, dims):
    ident = lm_of(arch, tok).identity
    assert ident.layer_windows() == windows
    assert ident.sliding_window == max(windows)
    assert ident.rope_theta == (1e6 if arch in ("qwen2", "qwen3") or "gemma" in arch else 1e4)
    if bases is None:
        assert ident.attention == ""  # uniform full attention: the scalar fields say it all
        return
    layers = ident.layers()
    assert [x["rope"]["base"] for x in layers] == bases
    assert [x["rope"]["dims"] for x in layers] == dims
    assert ident.to_dict()["attention"] == ident.attention


# ---- resume from a snapshot past the window ---------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_snapshot_past_the_window_resumes_exactly(tok, tmp_path, arch):
    lm = lm_of(arch, tok)
    live = conversation(lm)
    n = len(live.cache_ids)
    assert n > 2 * WINDOW
    path = tmp_path / "kv.safetensors"
    snapmod.write_snapshot(path, live.cache, live.cache_ids, lm.identity, "technical")
    meta = json.loads(snapmod.read_header(path)["__metadata__"]["layer_meta"])
    windows = lm.identity.layer_windows()
    assert [m["length"] for m in meta] == [min(n, w) if w else n for w in windows]
    assert [m["offset"] for m in meta] == [n] * len(meta)

    resumed = Agent("technical", "technical", "Technical", live.system, list(live.turns))
    states, ids, _ = snapmod.read_snapshot(path, lm.identity, resumed.expected_ids(tok))
    resumed.cache, resumed.cache_ids = snapmod.attach(lm.model, states), ids
    assert np.array_equal(next_logits(lm, resumed), next_logits(lm, live))
    a, b = turn(lm, live, MSGS[3]), turn(lm, resumed, MSGS[3])
    assert b.cached == n and b.rewind is None  # every cached token reused
    assert a.generated_ids == b.generated_ids
    assert np.array_equal(next_logits(lm, resumed), next_logits(lm, live))
    consistent(lm, resumed)

    # A rebuild by prefill agrees (up to float noise: other chunking, other summation order).
    fresh = rebuilt(lm, live)
    np.testing.assert_allclose(next_logits(lm, fresh), next_logits(lm, live), atol=1e-4)


# ---- cancel a turn past the window ---------------------------------------------------------------
@pytest.mark.parametrize("where", ["decode", "prefill"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cancel_past_the_window_goes_back_exactly(tok, arch, where):
    lm = lm_of(arch, tok)
    agent, twin = conversation(lm), conversation(lm)
    text, k = (MSGS[3], 8) if where == "decode" else (LONG, 2)
    with pytest.raises(TurnCancelled) as ei:
        turn(lm, agent, text, cancel=CancelAfter(k), max_tokens=40)
    assert ei.value.rewind == ("checkpoint" if arch in SLIDING else "trim")
    consistent(lm, agent)
    assert np.array_equal(next_logits(lm, agent), next_logits(lm, twin))
    a, b = turn(lm, agent, MSGS[3]), turn(lm, twin, MSGS[3])
    assert a.generated_ids == b.generated_ids and a.cached == b.cached
    assert np.array_equal(next_logits(lm, agent), next_logits(lm, twin))
    np.testing.assert_allclose(next_logits(lm, rebuilt(lm, agent)), next_logits(lm, agent),
                               atol=1e-4)


# ---- trimming never fails silently ------------------------------------------------------------
def test_trim_past_the_window_refuses_or_rebuilds(tok):
    from mlx_lm.models.cache import trim_prompt_cache

    lm = lm_of("gemma3_text", tok)
    agent = conversation(lm)
    n = len(agent.cache_ids)
    assert not kvrewind.can_rewind(agent.cache, 1)
    assert trim_prompt_cache(kvcache.copy_cache(agent.cache), 5) == 0  # mlx-lm: 0, no error
    with pytest.raises(kvcache.CacheRewindError, match="sliding-window"):
        kvrewind.rewind(agent.cache, 5)
    with pytest.raises(kvcache.CacheRewindError):
        trim_to(agent, n - 5)  # no model to rebuild with
    assert kvcache.offsets(agent.cache) == [n] * 3 and len(agent.cache_ids) == n  # untouched
    assert trim_to(agent, n - 5, lm.model) == "rebuild"
    assert len(agent.cache_ids) == n - 5 and kvcache.offsets(agent.cache) == [n - 5] * 3

    short = conversation(lm, MSGS[:1])  # inside the window: trimming is exact and O(1)
    m = len(short.cache_ids)
    assert m < WINDOW and kvrewind.can_rewind(short.cache, 3)
    assert trim_to(short, m - 3) == "trim"
    assert kvcache.offsets(short.cache) == [m - 3] * 3


def test_undo_uses_the_checkpoint_else_rebuilds(tok):
    lm = lm_of("gemma3_text", tok)
    agent = conversation(lm)
    n, before = len(agent.cache_ids), next_logits(lm, agent)
    cp = kvrewind.checkpoint(agent.cache)
    prefill(lm.model, agent, tok.encode(LONG)[:100])
    assert undo_turn(lm.model, agent, cp, n) == "checkpoint"
    assert kvcache.offsets(agent.cache) == [n] * 3 and len(agent.cache_ids) == n
    assert np.array_equal(next_logits(lm, agent), before)
    prefill(lm.model, agent, tok.encode(LONG)[:100])
    assert undo_turn(lm.model, agent, cp, n - 5) == "rebuild"  # no checkpoint at n - 5
    assert kvcache.offsets(agent.cache) == [n - 5] * 3 and len(agent.cache_ids) == n - 5
    assert undo_turn(lm.model, agent, cp, n - 5) is None  # nothing to undo


def test_probe_runs_on_a_copy_and_full_kv_refuses_past_the_window(tok):
    lm = lm_of("gemma3_text", tok)
    agent = conversation(lm)
    before = next_logits(lm, agent)
    probe = tok.encode("\n<|im_start|>user\nContinue.<|im_end|>\n<|im_start|>assistant\n")
    assert len(greedy_probe(lm.model, agent, probe, 8)) == 8
    consistent(lm, agent)
    assert np.array_equal(next_logits(lm, agent), before)
    with pytest.raises(kvcache.WindowExceeded, match="layer 0 is a sliding-window layer"):
        kvcache.kv_arrays(agent.cache, len(agent.cache_ids))

    short = conversation(lm, MSGS[:1])
    keys, values, dtype = kvcache.kv_arrays(short.cache, len(short.cache_ids))
    assert [k.shape for k in keys] == [(2, len(short.cache_ids), 16)] * 3 and dtype == "float32"


# ---- a tampered per-layer length is rejected ---------------------------------------------------
def rewrite(path, change) -> None:
    """Rewrite a snapshot after change(arrays, layer_meta), with a matching checksum: only the
    layout check stands between such a file and the cache."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    metas = json.loads(meta["layer_meta"])
    change(arrays, metas)
    meta["layer_meta"] = json.dumps(metas, sort_keys=True, separators=(",", ":"))
    ordered = [arrays[f"{kv}.{i}"] for i in range(len(metas)) for kv in ("k", "v")]
    meta["checksum"] = snapmod._tensor_checksum(ordered, snapmod.covered_of(meta))
    path.unlink()
    mx.save_safetensors(str(path), arrays, metadata=meta)


def cut(i: int, new_len: int, edit_meta: bool = True):
    def change(arrays, metas):
        for kv in ("k", "v"):
            a = arrays[f"{kv}.{i}"]
            if new_len <= a.shape[2]:
                arrays[f"{kv}.{i}"] = a[..., :new_len, :]
            else:
                arrays[f"{kv}.{i}"] = mx.concatenate([a, a[..., :new_len - a.shape[2], :]], 2)
        if edit_meta:
            metas[i]["length"] = new_len
    return change


def meta_edit(i: int, **kw):
    def change(arrays, metas):
        metas[i].update(kw)
    return change


@pytest.mark.parametrize("arch", ["gemma3_text", "llama_swa", "llama"])
def test_tampered_layer_length_is_rejected(tok, tmp_path, arch):
    lm = lm_of(arch, tok)
    agent = conversation(lm)
    n, ids = len(agent.cache_ids), agent.cache_ids
    path = tmp_path / "kv.safetensors"
    full = lm.identity.layer_windows().index(0)
    sliding = next((i for i, w in enumerate(lm.identity.layer_windows()) if w), None)
    cases = [("full layer one short", cut(full, n - 1)),
             ("offset", meta_edit(full, offset=n + 1))]
    if sliding is not None:
        cases += [("sliding layer one short", cut(sliding, WINDOW - 1)),
                  ("sliding layer past its window", cut(sliding, WINDOW + 1)),
                  ("sliding layer holding every token", cut(sliding, n)),
                  ("ring index", meta_edit(sliding, idx=WINDOW + 3)),
                  ("window", meta_edit(sliding, window=WINDOW * 2)),
                  ("kind", meta_edit(sliding, kind="full"))]
    for what, change in cases:
        snapmod.write_snapshot(path, agent.cache, ids, lm.identity, "technical")
        rewrite(path, change)
        with pytest.raises(SnapshotCorrupt) as ei:
            states, *_ = snapmod.read_snapshot(path, lm.identity, ids)
            snapmod.attach(lm.model, states)
        assert ei.value.check == "layout", (what, ei.value)
    # The per-layer meta is covered by the checksum: an edit without a new checksum is bit rot.
    snapmod.write_snapshot(path, agent.cache, ids, lm.identity, "technical")
    raw = path.read_bytes()
    needle = b'\\"length\\":%d' % n  # layer_meta is JSON inside the JSON header
    assert needle in raw
    path.write_bytes(raw.replace(needle, b'\\"length\\":%d' % (n - 1), 1))
    with pytest.raises(SnapshotCorrupt) as ei:
        snapmod.read_snapshot(path, lm.identity, ids)
    assert ei.value.check == "checksum"


# ---- other cache kinds -------------------------------------------------------------------------
def test_quantized_kv_cache_round_trips(real_model, tmp_path):
    """QuantizedKVCache (mlx-lm's kv_bits) saves and restores through the same layer states."""
    lm = real_model
    agent = Agent("technical", "technical", "Technical", "system")
    ids = lm.tokenizer.encode("The payment API returns 502 on retries; the queue backs up.")
    agent.cache = [c.to_quantized(group_size=64, bits=8) for c in kvcache.new_cache(lm.model)]
    lm.model(mx.array([ids]), cache=agent.cache)
    agent.cache_ids = list(ids)
    assert {s.kind for s in kvcache.layer_states(agent.cache)} == {"quantized"}
    path = tmp_path / "kv.safetensors"
    snapmod.write_snapshot(path, agent.cache, ids, lm.identity, "technical")
    states, got, _ = snapmod.read_snapshot(path, lm.identity, ids)
    restored = Agent("technical", "technical", "Technical", "system")
    restored.cache, restored.cache_ids = snapmod.attach(lm.model, states), got
    assert np.array_equal(next_logits(lm, restored), next_logits(lm, agent))
    assert kvrewind.can_rewind(restored.cache, 4)
    kvrewind.rewind(restored.cache, 4)
    assert kvcache.offsets(restored.cache) == [len(ids) - 4] * len(restored.cache)
