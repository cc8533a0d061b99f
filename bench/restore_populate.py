"""Restore of one 4,096-token agent (format permeant-kv/3, SmolLM2's float32 KV): how the new
buffers are faulted in, and the block hashes overlapped with the reads, against plain reads of
the same bytes, all in one run, interleaved.

    .venv/bin/python bench/restore_populate.py [--tokens 4096] [--repeats 9]

- restore            a restore into new memory (a start-up restore): buffers populated by
                     one madvise call each (MADV_POPULATE_WRITE, Linux) in another thread while
                     the blocks are read, each block read and then hashed by one of
                     blockload.readers() threads (two here)
- after eviction     the same restore right after the LRU released an agent of this size
                     (runtime.keep_freed_buffers, then the agent's cache dropped): MLX hands the
                     released buffers back, already faulted in
- evicted, 1 reader  the same with one reading thread (each block read, then hashed)
- faulting reads     a restore into new memory with the pages faulted in one by one inside the
                     reads (before 2026-11-30)
- read               a plain read of the same files into one reused, faulted-in buffer
- read + hash        that read plus one xxh3-128 pass over the bytes (what verifying costs at
                     least)
- fresh read         the same files read into new memory (page faults included)

Medians of --repeats; the order alternates each round so the machine's load drifts equally.
"""

from __future__ import annotations

import argparse
import os
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
    path = folder / "agents" / "a" / "kv.safetensors"
    path.parent.mkdir(parents=True)
    fresh(path, live.cache)
    write_snapshot(path, live.cache, ids, lm.identity, "a")
    files = snapshot_files(path)
    size = sum(p.stat().st_size for p in files)
    reader = PlainReader(size)
    restore = restore_fn(lm, path, ids)
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

    def after_eviction(timed: list[float] | None = None) -> None:
        # the state as an eviction leaves it: an agent's buffers released into MLX's cache
        runtime.keep_freed_buffers(size)
        victim = restore()
        mx.eval([c.keys for c in victim])
        del victim
        t = time.perf_counter()
        restore()
        (evicted if timed is None else timed).append((time.perf_counter() - t) * 1000)
    evicted: list[float] = []

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

    def read_hash() -> None:
        got = reader.read(files)
        xxhash.xxh3_128_digest(reader.view[:got])

    def new_memory_read() -> None:
        fresh_read(files, size)

    kinds = {"restore": product, "after eviction": after_eviction,
             "evicted, 1 reader": one_reader, "faulting reads": faulting_reads,
             "read": read, "read + hash": read_hash,
             "fresh read": new_memory_read}
    for fn in kinds.values():
        fn()  # first calls: imports, caches
    times: dict[str, list[float]] = {k: [] for k in kinds}
    loads = []
    for i in range(args.repeats):
        order = list(kinds.items())
        for name, fn in (order if i % 2 == 0 else reversed(order)):
            if name not in ("read", "read + hash", "fresh read"):
                new_memory()
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1000)
            if name == "after eviction":  # only the restore itself is timed
                times[name][-1] = evicted[-1]
            if name == "evicted, 1 reader":
                times[name][-1] = one[-1]
        loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"restore of a {len(ids):,}-token agent: {len(files)} files, {size / 1e6:.1f} MB; "
          f"median of {args.repeats}, load average {min(loads):.1f}-{max(loads):.1f} "
          f"({os.cpu_count()} cores)")
    print(f"{'':16}{'ms':>8}  {'x restore':>9}  runs")
    for name, ms in med.items():
        runs = ", ".join(f"{x:.0f}" for x in times[name])
        print(f"{name:16}{ms:8.1f}  {ms / med['restore']:9.2f}  {runs}")
    print(f"after eviction / read {med['after eviction'] / med['read']:.2f}x; after eviction "
          f"/ (read + hash) {med['after eviction'] / med['read + hash']:.2f}x; restore / after "
          f"eviction x{med['restore'] / med['after eviction']:.2f}; one reader / "
          f"{readers()} readers x{med['evicted, 1 reader'] / med['after eviction']:.2f}")
    print(f"restore / read {med['restore'] / med['read']:.2f}x; restore / (read + hash) "
          f"{med['restore'] / med['read + hash']:.2f}x; restore / fresh read "
          f"{med['restore'] / med['fresh read']:.2f}x; faulting reads / restore "
          f"x{med['faulting reads'] / med['restore']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
