"""A restore into an evicted agent's K/V buffers (blockload.Donors): the LRU evicts before it
restores, and the restore reads the snapshot straight into the buffers the evicted agent
released, handed over by MLX's donation, instead of allocating new ones. On four architectures
(llama, qwen2, and two with sliding layers past their window, whose rings are donated too):
the restored agent equals the live one (next-token logits bit for bit, greedy ids), a donor
something else still holds is copied by MLX and never written into, and a donor that does not
fit is left alone."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from support.kv_checks import TEXT, built, greedy, logits
from support.tiny_models import WINDOW, tiny_model

from permeant_tui.engine import kvcache
from permeant_tui.engine.blockload import Donors
from permeant_tui.engine.generation import prefill
from permeant_tui.engine.snapshot import attach, read_snapshot, write_snapshot

ARCHS = ["llama", "qwen2", "gemma3_text", "llama_swa"]


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


def address(a) -> int:
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a, copy=False) \
        .__array_interface__["data"][0]


def agents(arch: str, tok, n_a: int, n_b: int):
    """(model, donor agent A of n_a tokens, agent B of n_b tokens saved at `path`, B's ids)."""
    _, lm = tiny_model(arch, tok)
    ids = tok.encode(TEXT * 2)
    assert len(ids) >= max(n_a, n_b) + 1
    a = built(lm, ids[1:n_a - 2])  # another conversation than B's
    for t in ids[n_a - 2:n_a + 1]:  # its last tokens decoded one by one, as a reply's are:
        prefill(lm.model, a, [t])  # its rings are then exactly a window long
    b = built(lm, ids[:n_b])
    return lm, a, b, ids[:n_b]


def restored(lm, path, ids, donors: Donors | None) -> list:
    states, got, _ = read_snapshot(path, lm.identity, ids, donors=donors)
    assert got == ids
    cache = attach(lm.model, states)
    kvcache.eval_cache(cache)
    return cache


def same_agent(lm, cache, live) -> None:
    assert np.array_equal(logits(lm, cache), logits(lm, live))
    assert greedy(lm, cache) == greedy(lm, live)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_restore_reads_into_the_evicted_agents_buffers(arch, tok, tmp_path):
    n = 3 * WINDOW + 5  # past the sliding layers' window: their rings are full
    lm, a, b, ids = agents(arch, tok, n, n)
    path = tmp_path / "kv.safetensors"
    write_snapshot(path, b.cache, ids, lm.identity, "b")
    donors = Donors(kvcache.buffers(a.cache))
    offered = {address(x) for x in donors.arrays}
    assert len(offered) == 2 * len(a.cache)
    a.cache = None  # evicted: the donors hold its buffers' last references
    cache = restored(lm, path, ids, donors)
    got = {address(x) for x in kvcache.buffers(cache)}
    assert got == offered  # every buffer donated, none allocated
    assert donors.arrays == []
    same_agent(lm, cache, b.cache)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_a_donor_still_held_elsewhere_is_copied_not_written(arch, tok, tmp_path):
    n = 3 * WINDOW + 5
    lm, a, b, ids = agents(arch, tok, n, n)
    path = tmp_path / "kv.safetensors"
    write_snapshot(path, b.cache, ids, lm.identity, "b")
    donors = Donors(kvcache.buffers(a.cache))
    held = donors.arrays[0][..., :16, :]  # a view of the first buffer, kept
    mx.eval(held)
    before = np.array(held.astype(mx.float32))
    shared = address(donors.arrays[0])
    a.cache = None
    cache = restored(lm, path, ids, donors)
    got = {address(x) for x in kvcache.buffers(cache)}
    assert shared not in got  # MLX copied it: the view's buffer was never handed over
    assert np.array_equal(np.array(held.astype(mx.float32)), before)
    same_agent(lm, cache, b.cache)


def test_donors_that_do_not_fit_are_left_alone(tok, tmp_path):
    """A full layer takes a buffer at least its size and at most a quarter larger; a smaller
    or a much larger one stays in the pool (the restore allocates)."""
    _, lm = tiny_model("llama", tok)
    ids = tok.encode(TEXT * 4)
    assert len(ids) > 1100
    b = built(lm, ids[:600])  # restored capacity 768 (600 + room, in steps of 256)
    path = tmp_path / "kv.safetensors"
    write_snapshot(path, b.cache, ids[:600], lm.identity, "b")
    small, large = built(lm, ids[:300]), built(lm, ids[:1100])  # capacities 512 and 1280
    donors = Donors(kvcache.buffers(small.cache) + kvcache.buffers(large.cache))
    kept = len(donors.arrays)
    cache = restored(lm, path, ids[:600], donors)
    assert len(donors.arrays) == kept
    assert {int(x.shape[2]) for x in kvcache.buffers(cache)} == {768}
    same_agent(lm, cache, b.cache)


def test_a_slightly_larger_donor_gives_the_restore_its_capacity(tok, tmp_path):
    """A donor up to a quarter larger is taken: the restored cache has its capacity (more room
    for the next turn), decodes the same tokens and saves the same snapshot."""
    _, lm = tiny_model("llama", tok)
    ids = tok.encode(TEXT * 4)
    assert len(ids) > 1100
    b = built(lm, ids[:700])  # capacity 768 when restored
    path = tmp_path / "kv.safetensors"
    write_snapshot(path, b.cache, ids[:700], lm.identity, "b")
    a = built(lm, ids[1:801])  # capacity 1024 (mlx-lm's growth): more than a quarter over 768
    a_cache = [c for c in a.cache]
    grown = [mx.concatenate([x, x[..., :-64, :]], axis=2) for x in kvcache.buffers(a_cache)]
    mx.eval(grown)  # 1984 rows: too large; 768 + 192 = 960 is the largest taken
    fit = [x[..., :900, :] + 0 for x in kvcache.buffers(a_cache)]
    mx.eval(fit)
    a.cache = a_cache = None
    donors = Donors(grown + fit)
    fit = grown = None
    cache = restored(lm, path, ids[:700], donors)
    assert {int(x.shape[2]) for x in kvcache.buffers(cache)} == {900}
    assert all(int(x.shape[2]) == 1984 for x in donors.arrays)
    same_agent(lm, cache, b.cache)
    again = tmp_path / "again.safetensors"
    write_snapshot(again, cache, ids[:700], lm.identity, "b")
    same_agent(lm, restored(lm, again, ids[:700], None), b.cache)


def test_bfloat16_buffers_are_donated_too(tok, tmp_path):
    """Metal keeps K/V in bfloat16 (the CPU path here runs float32): a bfloat16 cache restored
    into another's buffers, read as uint16 and viewed back, equals the saved one bit for bit."""
    from mlx_lm.models.cache import make_prompt_cache

    _, lm = tiny_model("llama", tok)
    n = 300

    def bf16_cache(seed: int) -> list:
        mx.random.seed(seed)
        cache = make_prompt_cache(lm.model)
        for c in cache:
            k = mx.random.normal((1, 2, n, 16)).astype(mx.bfloat16)
            c.update_and_fetch(k, (k * 3).astype(mx.bfloat16))
        kvcache.eval_cache(cache)
        return cache

    ids = tok.encode(TEXT * 2)[:n]
    live = bf16_cache(1)
    path = tmp_path / "kv.safetensors"
    write_snapshot(path, live, ids, lm.identity, "b")
    victim = bf16_cache(2)
    donors = Donors(kvcache.buffers(victim))
    offered = {address(x) for x in donors.arrays}
    victim = None
    cache = restored(lm, path, ids, donors)
    assert {address(x) for x in kvcache.buffers(cache)} == offered
    for c, x in zip(cache, live, strict=True):
        assert c.keys.dtype == mx.bfloat16
        assert mx.array_equal(c.keys[..., :n, :], x.keys[..., :n, :]).item()
        assert mx.array_equal(c.values[..., :n, :], x.values[..., :n, :]).item()
