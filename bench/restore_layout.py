"""How the block layout bounds a restore's reads: the restore's reading step (each block read
with one `preadv` scattering its rows into the K/V buffers, then hashed row group by row group,
on blockload.readers() threads, as engine/blockload.py does) against a plain read of the same
files, for blocks of 64 tokens (the format's), 256 and 1,024.

    .venv/bin/python bench/restore_layout.py [--tokens 4096] [--repeats 21]

A block holds B tokens of every layer: per layer, K and V, per KV head, a run of B rows that
lands in its own place in that head's buffer. SmolLM2's shape (30 layers, 3 KV heads, 64 dims,
float32: 180 runs a block, 16 KB each at B = 64) with random bytes in place of K/V; the files
are written once under a temporary folder and read from the page cache. What it isolates is the
reading step alone: no manifest, no block checks, no allocation (buffers reused, in memory).
Medians of --repeats, the order alternating each round; the ratio to the plain read is also
taken within each round.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

LAYERS, HEADS, DIM, ITEM = 30, 3, 64, 4
HEADER = 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()

    import numpy as np
    import xxhash

    from permeant_tui.engine.blockload import readers
    from permeant_tui.engine.blockstore import content_hash

    row = DIM * ITEM
    streams = LAYERS * 2
    capacity = -(-(args.tokens + 1) // 256) * 256
    bufs = [np.ones((HEADS, capacity, row), np.uint8) for _ in range(streams)]
    regions = [memoryview(b).cast("B")[h * capacity * row:(h + 1) * capacity * row]
               for b in bufs for h in range(HEADS)]
    folder = tempfile.mkdtemp(prefix="permeant-bench-layout-")
    rng = np.random.default_rng(0)
    layouts: dict[int, list[str]] = {}
    try:
        for bt in (64, 256, 1024):
            files = []
            for j in range(args.tokens // bt):
                path = os.path.join(folder, f"{bt}-{j}")
                payload = rng.integers(0, 256, HEADER + len(regions) * bt * row, dtype=np.uint8)
                payload.tofile(path)
                files.append(path)
            for path in files:  # into the page cache
                with open(path, "rb") as f:
                    f.read()
            layouts[bt] = files
        size = sum(os.path.getsize(p) for p in layouts[64])
        plain = bytearray(size)
        plain[:] = b"\1" * size  # faulted in before timing
        view = memoryview(plain)

        def read_plain(files: list[str]) -> None:
            got = 0
            for path in files:
                fd = os.open(path, os.O_RDONLY)
                try:
                    while (n := os.readv(fd, [view[got:]])):
                        got += n
                finally:
                    os.close(fd)

        def read_block(bt: int, path: str, j: int) -> bytes:
            a = j * bt * row
            parts = [m[a:a + bt * row] for m in regions]
            fd = os.open(path, os.O_RDONLY)
            try:
                os.preadv(fd, parts, HEADER)
            finally:
                os.close(fd)
            return content_hash(parts)

        pool = ThreadPoolExecutor(readers())

        def restore_reads(bt: int) -> None:
            files = layouts[bt]
            list(pool.map(lambda j: read_block(bt, files[j], j), range(len(files))))

        # the scatter lands the bytes where they belong: check one block against the file
        restore_reads(64)
        with open(layouts[64][1], "rb") as f:
            raw = f.read()[HEADER:]
        first = regions[0][64 * row:128 * row]
        assert bytes(first) == raw[:64 * row]
        assert xxhash.xxh3_128_digest(raw) == read_block(64, layouts[64][1], 1)

        kinds = {}
        for bt in layouts:
            kinds[f"plain read, {bt}"] = functools.partial(read_plain, layouts[bt])
            kinds[f"restore reads, {bt}"] = functools.partial(restore_reads, bt)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        loads = []
        for i in range(args.repeats):
            order = list(kinds.items())
            for name, fn in (order if i % 2 == 0 else reversed(order)):
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1000)
            loads.append(os.getloadavg()[0])
        pool.shutdown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{args.tokens:,} tokens of SmolLM2-shaped K/V, {size / 1e6:.1f} MB; median of "
          f"{args.repeats}, load average {min(loads):.1f}-{max(loads):.1f} "
          f"({os.cpu_count()} cores, {readers()} reading threads)")
    print(f"{'block tokens':>12} {'runs a block':>12} {'run KB':>7} {'plain ms':>9} "
          f"{'restore ms':>11} {'restore/plain':>14} {'within rounds':>14}")
    for bt in layouts:
        p, r = times[f"plain read, {bt}"], times[f"restore reads, {bt}"]
        paired = statistics.median(a / b for a, b in zip(r, p, strict=True))
        print(f"{bt:>12} {len(regions):>12} {bt * row / 1024:>7.0f} {statistics.median(p):>9.1f} "
              f"{statistics.median(r):>11.1f} {statistics.median(r) / statistics.median(p):>13.2f}x"
              f" {paired:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
