"""Restore's reader (engine/blockload.py): blocks and tail land in buffers MLX allocates, never
zero-filled first, in every KV dtype; a block that shrinks after its check is a short read;
any number of reading threads gives the same bytes and finds damage promptly."""

from __future__ import annotations

import os

import mlx.core as mx
import pytest
from support.kv_checks import TEXT, blocks_of, built, refused, restore, saved_snapshot

from permeant_tui.engine import blockstore, readpool
from permeant_tui.engine.blockstore import BlockStore
from permeant_tui.engine.snapshot import attach, read_snapshot, write_snapshot
from permeant_tui.engine.snapshot_format import BLOCK_TOKENS as B


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


@pytest.fixture
def saved(tmp_path, tiny_model, tok):
    return saved_snapshot(tmp_path, tiny_model, tok)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_every_kv_dtype_restores_byte_for_byte(tmp_path, tiny_model, tok, dtype):
    """Blocks and tail land in buffers mx.load allocates (never zero-filled first): every
    position equals the live cache's, in each KV dtype, bfloat16 included (numpy has none)."""
    import dataclasses

    ids = tok.encode(TEXT)[: 3 * B + 17]
    agent = built(tiny_model, ids)
    for c in agent.cache:
        c.keys, c.values = c.keys.astype(getattr(mx, dtype)), c.values.astype(getattr(mx, dtype))
    identity = dataclasses.replace(tiny_model.identity, kv_dtype=dtype)
    path = tmp_path / "agents/a/kv.safetensors"
    write_snapshot(path, agent.cache, ids, identity, "a")
    states, got_ids, _ = read_snapshot(path, identity, ids)
    cache = attach(tiny_model.model, states)
    assert got_ids == ids
    for live, back in zip(agent.cache, cache, strict=True):
        assert back.keys.dtype == getattr(mx, dtype) and back.offset == len(ids)
        for a, b in ((live.keys, back.keys), (live.values, back.values)):
            n = len(ids)
            assert mx.array_equal(a[..., :n, :], b[..., :n, :]).item()
            assert int(b.shape[2]) > n  # room for the next turn, allocated at restore


def test_block_shrunk_after_its_check_is_refused(saved, tiny_model, monkeypatch):
    """A block that passes the size check and then loses bytes before it is read (another
    process truncating it) is a short read: SnapshotCorrupt, never garbage in the cache."""
    from permeant_tui.engine import blockload

    path, ids, _, _ = saved
    store = BlockStore(path.parents[2] / "kv-blocks")
    names = blocks_of(path)
    real_open = blockload._open_block

    def open_then_truncate(store_, name, *args):
        fd = real_open(store_, name, *args)
        if name == names[2]:  # checked, then truncated before it is read
            os.truncate(store.path(name), blockstore.HEADER_SIZE + 10)
        return fd

    monkeypatch.setattr(blockload, "_open_block", open_then_truncate)
    exc = refused(tiny_model, path, ids, "block")
    assert exc.path == str(store.path(names[2])) and "short read" in exc.detail


@pytest.mark.parametrize("readers", [1, 2, 5])
def test_any_number_of_reading_threads_restores_the_same_bytes_and_finds_damage(
        saved, tiny_model, monkeypatch, readers):
    """Blocks are read and hashed by blockload.readers() threads (one per core, 2 to 4): with
    one, two or more than there are blocks the restore is byte-for-byte the live cache, and a
    damaged block among them (a bit flipped in the last, a short read in the first, both at
    once) is refused naming a damaged block, and no reader is still at work once it is."""
    import threading

    from permeant_tui.engine import blockload

    monkeypatch.setattr(blockload, "readers", lambda: readers)
    path, ids, live, _ = saved
    cache = restore(tiny_model, path, ids)
    n = len(ids)
    for a, b in zip(live.cache, cache, strict=True):
        assert mx.array_equal(a.keys[..., :n, :], b.keys[..., :n, :]).item()
        assert mx.array_equal(a.values[..., :n, :], b.values[..., :n, :]).item()
    store = BlockStore(path.parents[2] / "kv-blocks")
    names = blocks_of(path)
    assert len(names) >= 3
    last, first = store.path(names[-1]), store.path(names[0])
    raw = last.read_bytes()
    last.write_bytes(raw[:-7] + bytes([raw[-7] ^ 0x01]) + raw[-6:])
    exc = refused(tiny_model, path, ids, "block")
    assert exc.path == str(last) and "checksum" in exc.detail
    real_open = blockload._open_block

    def open_then_truncate(store_, name, *args):
        fd = real_open(store_, name, *args)
        if store_.path(name) == first:  # checked, then truncated before it is read
            os.truncate(first, blockstore.HEADER_SIZE + 3)
        return fd

    monkeypatch.setattr(blockload, "_open_block", open_then_truncate)
    real_block = blockload.StreamReader._block
    running = []

    def tracked(self, j, heads):
        running.append(j)
        try:
            return real_block(self, j, heads)
        finally:
            running.remove(j)

    monkeypatch.setattr(blockload.StreamReader, "_block", tracked)
    whole = first.read_bytes()
    for _ in range(3):
        first.write_bytes(whole)
        exc = refused(tiny_model, path, ids, "block")
        assert exc.path == str(first) and "short read" in exc.detail  # the first failure found
        assert running == []  # no reader still writes into the buffers once the restore fails
    # the threads are the kept pools' (readpool._pool), not new ones for each restore
    named = [t for t in threading.enumerate() if t.name.startswith("permeant-")]
    assert len(named) <= sum(n for _, n in readpool._pools)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_shared_jobs_return_in_order_and_fail_on_the_first_failed_job(workers):
    """readpool.run_shared: results in the jobs' order; when jobs fail, the first one that
    failed (in order) is raised, only after every job a thread had taken has finished."""
    import threading
    import time


    assert readpool.run_shared([lambda i=i: i * i for i in range(9)], workers) == \
        [i * i for i in range(9)]
    done, lock = [], threading.Lock()

    def job(i: int):
        if i in (3, 6):
            raise ValueError(f"job {i}")
        time.sleep(0.02 if i == 2 else 0)  # a slow job taken before the failure
        with lock:
            done.append(i)
        return i

    with pytest.raises(ValueError, match="job 3"):
        readpool.run_shared([lambda i=i: job(i) for i in range(9)], workers)
    assert {0, 1, 2} <= set(done)  # every job before the failure ran to its end
    assert 3 not in done and 6 not in done
    after = list(done)
    time.sleep(0.05)
    assert done == after  # none still running once it raised


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_gets_reading_threads_of_its_own():
    """The reading threads are kept in the process (readpool._pool); a forked child has none
    of them and must start its own rather than wait forever on the parent's."""
    import threading
    import time


    both = threading.Barrier(2, timeout=10)  # two jobs at once: both threads exist, then idle
    assert readpool.run_shared([lambda: both.wait() * 0 + 1, lambda: both.wait() * 0 + 2],
                                2) == [1, 2]
    time.sleep(0.05)
    pid = os.fork()
    if pid == 0:  # the child: only Python, and never back into pytest
        code = 1
        try:
            import signal

            signal.signal(signal.SIGALRM, lambda *_: os._exit(3))  # waiting forever: exit 3
            signal.alarm(20)
            code = 0 if readpool.run_shared([lambda: 3, lambda: 4], 2) == [3, 4] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_an_interrupted_wait_still_lets_the_jobs_taken_finish(monkeypatch):
    """Interrupted while it waits (Ctrl+C in a thread that restores), run_shared lets the jobs
    already taken finish before the interruption goes on: no reader writes into buffers the
    caller is about to drop, and no new job is taken."""
    import threading
    import time

    real_wait, calls = readpool.wait, []

    def interrupted(tasks):
        calls.append(len(tasks))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_wait(tasks)

    monkeypatch.setattr(readpool, "wait", interrupted)
    started, finished, lock = [], [], threading.Lock()

    def job(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.05)
        with lock:
            finished.append(i)
        return i

    with pytest.raises(KeyboardInterrupt):
        readpool.run_shared([lambda i=i: job(i) for i in range(40)], 2)
    assert sorted(finished) == sorted(started)  # every job taken ran to its end
    assert len(started) < 40  # and the others were never taken
