"""Memory a restore lands in: an agent the LRU releases leaves its K/V buffers with MLX
(runtime.keep_freed_buffers), the restore that follows gets them back already in memory, and
skips faulting them in (blockload.resident); new memory is still faulted in ahead of the reads.
On the embedded model's shape (30 layers, 190 MB of float32 K/V at 4k: far above MLX's 32 MB
default) with random K/V, restored bit-exact."""

from __future__ import annotations

import mmap
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from permeant_tui.engine import blockload, runtime
from permeant_tui.engine.snapshot import attach, read_snapshot, write_snapshot
from permeant_tui.engine.workspace import Workspace

T = 4096
linux = pytest.mark.skipif(sys.platform != "linux", reason="mincore/madvise paths are Linux's")


@pytest.fixture
def mlx_default_cache(monkeypatch):
    """Each test starts from MLX's own limit on freed buffers, and leaves it so."""
    default = mx.set_cache_limit(0)
    mx.set_cache_limit(default)
    monkeypatch.setattr(runtime, "_keep_freed", 0)
    yield default
    mx.set_cache_limit(default)
    mx.clear_cache()


def big_cache(lm, seed: int = 0) -> list:
    mx.random.seed(seed)
    cache = make_prompt_cache(lm.model)
    for c in cache:
        c.update_and_fetch(mx.random.normal((1, 3, T, 64)), mx.random.normal((1, 3, T, 64)))
    mx.eval([c.keys for c in cache] + [c.values for c in cache])
    return cache


def addresses(cache) -> set[int]:
    return {np.array(a, copy=False).__array_interface__["data"][0]
            for c in cache for a in (c.keys, c.values)}


@linux
def test_resident_tells_faulted_in_memory_from_new():
    size = 64 * mmap.PAGESIZE
    m = mmap.mmap(-1, size)
    view = np.frombuffer(m, dtype=np.uint8)
    address = view.__array_interface__["data"][0]
    assert not blockload.resident(address, size)  # never touched: no page yet
    view[::mmap.PAGESIZE] = 1
    assert blockload.resident(address, size)
    del view
    m.close()


def test_keep_freed_buffers_never_lowers_the_limit(mlx_default_cache):
    default = mlx_default_cache
    assert runtime.keep_freed_buffers(default // 2) == default  # MLX's own is larger: kept
    assert runtime.keep_freed_buffers(default * 4) == default * 4
    assert runtime.keep_freed_buffers(default) == default * 4
    assert mx.set_cache_limit(default * 4) == default * 4


@linux
def test_an_evicted_agents_buffers_serve_the_next_restore(real_model, tmp_path,
                                                          mlx_default_cache):
    lm = real_model
    ids = list(np.random.default_rng(0).integers(100, 40000, T))
    live = big_cache(lm)
    path = tmp_path / "agents" / "a" / "kv.safetensors"
    write_snapshot(path, live, ids, lm.identity, "a")
    total = sum(c.keys.nbytes + c.values.nbytes for c in live)
    assert total > 4 * mlx_default_cache

    ws = Workspace.open(tmp_path / "ws")
    ws.settings.max_resident = 1
    a, b = ws.agent("technical"), ws.agent("business")
    a.cache, a.cache_ids, a.last_used = attach(lm.model, read_snapshot(path, lm.identity, ids)[0]), ids, 1.0
    b.cache, b.cache_ids, b.last_used = [], [], 2.0
    mx.eval([c.keys for c in a.cache])
    before = addresses(a.cache)
    assert ws.enforce_residency(lambda agent: None, keep=b) == ["technical"]
    assert mx.get_cache_memory() >= 0.9 * total  # kept for reuse, not given back

    states, got, _ = read_snapshot(path, lm.identity, ids)
    restored = attach(lm.model, states)
    mx.eval([c.keys for c in restored])
    assert len(addresses(restored) & before) >= 0.9 * len(before)
    for c, x in zip(restored, live, strict=True):
        assert mx.array_equal(c.keys[..., :T, :], x.keys[..., :T, :]).item()
        assert mx.array_equal(c.values[..., :T, :], x.values[..., :T, :]).item()


@linux
def test_a_restore_populates_only_buffers_not_yet_in_memory(real_model, tmp_path,
                                                            mlx_default_cache, monkeypatch):
    lm = real_model
    ids = list(np.random.default_rng(1).integers(100, 40000, T))
    live = big_cache(lm, seed=1)
    path = tmp_path / "kv.safetensors"
    write_snapshot(path, live, ids, lm.identity, "a")
    calls: list[int] = []
    absent: list[int] = []
    populate, resident = blockload.populate, blockload.resident

    def counted(address, nbytes):
        calls.append(address)
        return populate(address, nbytes)

    def seen(address, nbytes):
        there = resident(address, nbytes)
        if not there:
            absent.append(address)
        return there

    monkeypatch.setattr(blockload, "populate", counted)
    monkeypatch.setattr(blockload, "resident", seen)
    mx.set_cache_limit(0)
    mx.clear_cache()
    first = attach(lm.model, read_snapshot(path, lm.identity, ids)[0])
    # Whether malloc hands back pages earlier tests freed depends on the run: every buffer not
    # yet in memory is populated, and no other.
    assert sorted(calls) == sorted(absent)
    mx.eval([c.keys for c in first])
    runtime.keep_freed_buffers(sum(c.keys.nbytes + c.values.nbytes for c in first))
    del first
    calls.clear()
    absent.clear()
    again = attach(lm.model, read_snapshot(path, lm.identity, ids)[0])
    assert len(calls) <= 6, len(calls)  # recycled buffers are in memory already
    assert sorted(calls) == sorted(absent)
    for c, x in zip(again, live, strict=True):
        assert mx.array_equal(c.keys[..., :T, :], x.keys[..., :T, :]).item()
