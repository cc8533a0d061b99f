"""Restore of one 4,096-token agent (snapshot blocks, SmolLM2's float32 KV): how the new
buffers are faulted in, and the block hashes overlapped with the reads, against plain reads of
the same bytes, all in one run, interleaved.

    .venv/bin/python bench/restore_populate.py [--tokens 4096] [--repeats 9]

- restore            a restore into new memory (a start-up restore): buffers populated by
                     one madvise call each (MADV_POPULATE_WRITE, Linux) in another thread while
                     the blocks are read, each block read and then hashed by one of
                     blockload.readers() threads (two here)
- after eviction     the same restore right after the LRU evicted an agent of this size to make
                     room for it, as the engine does: the blocks are read straight into the
                     evicted agent's K/V buffers (blockload.Donors, handed over by MLX's
                     donation), no allocation
- after eviction, 64 the same from a snapshot of the same agent in 64-token blocks only (the
                     layout before compaction, format 4), against "read, 64-token files", a
                     plain read of that snapshot's files
- evicted, MLX cache the same when the evicted buffers do not fit the restore's shapes: they go
                     to MLX's cache (runtime.keep_freed_buffers), which hands them back through
                     an allocation, already faulted in
- evicted, 1 reader  "after eviction" with one reading thread (each block read, then hashed)
- faulting reads     a restore into new memory with the pages faulted in one by one inside the
                     reads (before 2026-11-30)
- read               a plain read of the same files into one reused, faulted-in buffer
- read + hash        that read plus one xxh3-128 pass over the bytes (what verifying costs at
                     least, on one thread)
- verified read      the floor of a restore's reading: each file read into one reused buffer and
                     hashed right after, by blockload.readers() threads, as the restore does
- allocate           the restore's allocation alone (blockload._allocate: one mx.load of a
                     file object, each tensor evaluated on its own), right after an eviction
- fresh read         the same files read into new memory (page faults included)

Medians of --repeats; the order alternates each round so the machine's load drifts equally, and
the main ratio is also taken within each round (its median printed with its range).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()

    from permeant_tui.engine import runtime

    runtime.prepare()
    import xxhash
    from resume import prefilled_agent
    from resume_incremental import PlainReader, fresh, fresh_read, restore_fn, snapshot_files

    from permeant_tui.engine import blockload
    from permeant_tui.engine.snapshot import write_snapshot

    lm, ids, live = prefilled_agent(args.tokens)
    folder = Path(tempfile.mkdtemp(prefix="permeant-bench-populate-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "agents" / "a" / "kv.safetensors"
    path.parent.mkdir(parents=True)
    fresh(path, live.cache)
    write_snapshot(path, live.cache, ids, lm.identity, "a")
    files = snapshot_files(path)
    size = sum(p.stat().st_size for p in files)
    reader = PlainReader(size)
    restore = restore_fn(lm, path, ids)
    # the same agent in 64-token blocks only (format 4's layout, before compaction), in a
    # workspace of its own
    folder64 = Path(tempfile.mkdtemp(prefix="permeant-bench-populate64-"))
    atexit.register(shutil.rmtree, folder64, True)
    path64 = folder64 / "agents/a/kv.safetensors"
    path64.parent.mkdir(parents=True)
    write_snapshot(path64, live.cache, ids, lm.identity, "a", compact_tokens=0)
    files64 = snapshot_files(path64)
    restore64 = restore_fn(lm, path64, ids)
    populate, readers = blockload.populate, blockload.readers

    import mlx.core as mx

    default_limit = mx.set_cache_limit(0)
    mx.set_cache_limit(default_limit)

    import ctypes

    libc = ctypes.CDLL(None)

    def new_memory() -> None:
        """What a start-up restore meets: no freed buffers kept by MLX or by malloc (untimed,
        before every kind but the eviction's and the plain reads)."""
        mx.set_cache_limit(0)
        mx.clear_cache()
        mx.set_cache_limit(default_limit)
        runtime._keep_freed = 0
        if sys.platform == "linux":
            libc.malloc_trim(0)

    def product() -> None:
        restore()

    from permeant_tui.engine import kvcache
    from permeant_tui.engine.snapshot import attach, read_header, read_snapshot

    def after_eviction(timed: list[float] | None = None, which: Path = path) -> None:
        # the state as the engine's eviction leaves it: the evicted agent's buffers offered
        runtime.keep_freed_buffers(size)
        victim = restore()
        mx.eval([c.keys for c in victim])
        donors = blockload.Donors(kvcache.buffers(victim))
        del victim
        t = time.perf_counter()
        states, _, _ = read_snapshot(which, lm.identity, ids, donors=donors)
        attach(lm.model, states)
        (evicted if timed is None else timed).append((time.perf_counter() - t) * 1000)
        assert not donors.arrays  # every buffer was taken
    evicted: list[float] = []

    def after_eviction64() -> None:
        after_eviction(evicted64, path64)
    evicted64: list[float] = []
    restore64()  # checks it restores

    def mlx_cache(timed: list[float] | None = None) -> None:
        # the eviction's buffers released into MLX's cache, handed back by the allocation
        runtime.keep_freed_buffers(size)
        victim = restore()
        mx.eval([c.keys for c in victim])
        del victim
        t = time.perf_counter()
        restore()
        recycled.append((time.perf_counter() - t) * 1000)
    recycled: list[float] = []

    def faulting_reads() -> None:
        blockload.populate = lambda address, nbytes: False
        try:
            restore()
        finally:
            blockload.populate = populate

    def one_reader() -> None:
        blockload.readers = lambda: 1
        try:
            after_eviction(one)
        finally:
            blockload.readers = readers
    one: list[float] = []

    def read() -> None:
        reader.read(files)

    def read64() -> None:
        reader.read(files64)

    def read_hash() -> None:
        got = reader.read(files)
        xxhash.xxh3_128_digest(reader.view[:got])

    def new_memory_read() -> None:
        fresh_read(files, size)

    from concurrent.futures import ThreadPoolExecutor

    spans, at = [], 0
    for p in files:
        spans.append((p, at, p.stat().st_size))
        at += spans[-1][2]

    def verified_one(span) -> bytes:
        p, at, n = span
        fd = os.open(p, os.O_RDONLY)
        try:
            got = os.preadv(fd, [reader.view[at:at + n]], 0)
        finally:
            os.close(fd)
        return xxhash.xxh3_128_digest(reader.view[at:at + got])

    def verified_read() -> None:
        with ThreadPoolExecutor(readers()) as pool:
            list(pool.map(verified_one, spans))

    streams: list = []
    real_allocate = blockload._allocate

    def recorded(s, *args, **kw):
        streams[:] = s
        return real_allocate(s, *args, **kw)

    blockload._allocate = recorded
    restore()
    blockload._allocate = real_allocate

    def allocate() -> None:
        runtime.keep_freed_buffers(size)
        victim = restore()
        mx.eval([c.keys for c in victim])
        del victim
        t = time.perf_counter()
        out = blockload._allocate(streams)
        allocated.append((time.perf_counter() - t) * 1000)
        del out
    allocated: list[float] = []

    kinds = {"restore": product, "after eviction": after_eviction,
             "after eviction, 64": after_eviction64, "read, 64-token files": read64,
             "evicted, MLX cache": mlx_cache, "evicted, 1 reader": one_reader, "faulting reads": faulting_reads,
             "read": read, "read + hash": read_hash, "verified read": verified_read,
             "allocate": allocate, "fresh read": new_memory_read}
    for fn in kinds.values():
        fn()  # first calls: imports, caches
    times: dict[str, list[float]] = {k: [] for k in kinds}
    loads = []
    for i in range(args.repeats):
        order = list(kinds.items())
        for name, fn in (order if i % 2 == 0 else reversed(order)):
            if name not in ("read", "read + hash", "verified read", "fresh read",
                            "read, 64-token files"):
                new_memory()
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1000)
            if name == "after eviction":  # only the restore itself is timed
                times[name][-1] = evicted[-1]
            if name == "after eviction, 64":
                times[name][-1] = evicted64[-1]
            if name == "evicted, 1 reader":
                times[name][-1] = one[-1]
            if name == "evicted, MLX cache":
                times[name][-1] = recycled[-1]
            if name == "allocate":
                times[name][-1] = allocated[-1]
        loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    spans = read_header(path)["__metadata__"]["block_spans"]
    print(f"restore of a {len(ids):,}-token agent: {len(files)} files (blocks of {spans} "
          f"tokens; 64-token layout: {len(files64)} files), {size / 1e6:.1f} MB; "
          f"median of {args.repeats}, load average {min(loads):.1f}-{max(loads):.1f} "
          f"({os.cpu_count()} cores)")
    print(f"{'':19}{'ms':>8}  {'x restore':>9}  runs")
    for name, ms in med.items():
        runs = ", ".join(f"{x:.0f}" for x in times[name])
        print(f"{name:19}{ms:8.1f}  {ms / med['restore']:9.2f}  {runs}")
    # the same ratio taken within each round (both kinds a few ms apart), then the median: the
    # machine's drift between rounds (a shared VM's read varied 21-31 ms within ten minutes)
    # then cancels out of it
    paired = sorted(a / b for a, b in zip(times["after eviction"], times["read"], strict=True))
    print(f"after eviction / read within each round: median {statistics.median(paired):.2f}x "
          f"(range {paired[0]:.2f}-{paired[-1]:.2f}x, {len(paired)} rounds)")
    paired64 = sorted(a / b for a, b in zip(times["after eviction, 64"],
                                            times["read, 64-token files"], strict=True))
    print(f"64-token layout, after eviction / read of its files within each round: median "
          f"{statistics.median(paired64):.2f}x (range {paired64[0]:.2f}-{paired64[-1]:.2f}x); "
          f"compacted x{med['after eviction, 64'] / med['after eviction']:.2f} faster")
    print(f"after eviction / read {med['after eviction'] / med['read']:.2f}x; after eviction "
          f"/ (read + hash) {med['after eviction'] / med['read + hash']:.2f}x; restore / after "
          f"eviction x{med['restore'] / med['after eviction']:.2f}; one reader / "
          f"{readers()} readers x{med['evicted, 1 reader'] / med['after eviction']:.2f}")
    print(f"evicted into MLX's cache / read {med['evicted, MLX cache'] / med['read']:.2f}x; "
          f"into the evicted buffers x{med['evicted, MLX cache'] / med['after eviction']:.2f} "
          "faster")
    print(f"verified read ({readers()} threads) / read {med['verified read'] / med['read']:.2f}x; "
          f"allocate / read {med['allocate'] / med['read']:.2f}x; after eviction - verified read "
          f"= {med['after eviction'] - med['verified read']:.1f} ms (manifest, checks, block opens, "
          "rows scattered and hashed part by part, tails)")
    print(f"restore / read {med['restore'] / med['read']:.2f}x; restore / (read + hash) "
          f"{med['restore'] / med['read + hash']:.2f}x; restore / fresh read "
          f"{med['restore'] / med['fresh read']:.2f}x; faulting reads / restore "
          f"x{med['faulting reads'] / med['restore']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
