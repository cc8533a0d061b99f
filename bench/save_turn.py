"""A turn's save on a 4,000-token agent (the embedded SmolLM2-135M, float32 KV), all in one run:
how long the worker is held (what the next turn waits) and how long until the snapshot is
durable, against the synchronous save, the full rewrite of format 2 and the disk's floor.

    .venv/bin/python bench/save_turn.py [--tokens 4096] [--repeats 9] [--dir DIR]

- background save   what the product does (engine/durable.py): the worker writes the new blocks
                    and the manifest to temp files and returns; the flusher thread fsyncs and
                    renames them. "worker" is until write_snapshot returns, "durable" until the
                    flusher has landed it (measured from the same start).
- synchronous save  the same save with every fsync and rename on the caller (before this change)
- full rewrite      format 2: the whole KV in one file, written, fsynced, renamed
- plain write       the turn's own KV bytes as one file, written, fsynced, renamed, folder
                    fsynced: the disk's floor for a durable save of that turn

The agent is built by prefill once; each repeat restores the "before" state (a saved agent of
`base` tokens) and saves after +20 and +100 tokens. Medians; the load average is printed with
each row. `--dir` puts the files on another disk (default: a temp folder beside the repo, not
/tmp, which can be a RAM disk).
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()

    from permeant_tui.engine import runtime

    runtime.prepare()
    from resume import prefilled_agent
    from resume_incremental import fresh, legacy_save, plain_write

    from permeant_tui.engine.durable import Flusher
    from permeant_tui.engine.snapshot import COMPACT_TOKENS, write_snapshot

    t = time.perf_counter()
    lm, ids, live = prefilled_agent(args.tokens)
    print(f"model loaded and {len(ids)} tokens prefilled in {time.perf_counter() - t:.1f} s")
    base_dir = args.dir or os.path.join(os.path.dirname(__file__), "..")
    folder = Path(tempfile.mkdtemp(prefix=".bench-save-", dir=base_dir))
    print(f"files in {folder} ({_fs(folder)})\n")
    flusher = Flusher()
    rows = []
    try:
        # 3996 + 100 completes the fourth 1,024-token run: that save also writes the run as
        # one compacted block (snapshot_format.COMPACT_TOKENS); 3900 + 100 does not
        for base, turn in ((4000, 20), (3900, 100), (3996, 100)):
            path = folder / f"t{base}-{turn}" / "agents" / "a" / "kv.safetensors"
            old = folder / f"t{base}-{turn}" / "old.safetensors"
            worker, durable, sync, full, floor, written = [], [], [], [], [], []

            def before(path=path, base=base):
                fresh(path, live.cache)
                write_snapshot(path, live.cache, ids[:base], lm.identity, "a")

            la = os.getloadavg()
            for i in range(args.repeats):
                # the kinds alternate their order each round so drift in load hits all alike
                kinds = ["bg", "sync", "full", "floor"]
                for kind in kinds if i % 2 == 0 else kinds[::-1]:
                    if kind == "bg":
                        before()
                        t0 = time.perf_counter()
                        info = write_snapshot(path, live.cache, ids[:base + turn], lm.identity,
                                              "a", flusher=flusher)
                        t1 = time.perf_counter()
                        flusher.wait()
                        t2 = time.perf_counter()
                        assert not flusher.take_failed()
                        worker.append((t1 - t0) * 1e3)
                        durable.append((t2 - t0) * 1e3)
                        written.append(info.written)
                    elif kind == "sync":
                        before()
                        t0 = time.perf_counter()
                        write_snapshot(path, live.cache, ids[:base + turn], lm.identity, "a")
                        sync.append((time.perf_counter() - t0) * 1e3)
                    elif kind == "full":
                        t0 = time.perf_counter()
                        legacy_save(old, live.cache, ids[:base + turn], lm.identity)
                        full.append((time.perf_counter() - t0) * 1e3)
                    else:
                        nbytes = (old.stat().st_size if old.exists() else 0) * turn // (base + turn)
                        t0 = time.perf_counter()
                        plain_write(path.parent / "plain.bin", max(nbytes, 1))
                        floor.append((time.perf_counter() - t0) * 1e3)
            la2 = os.getloadavg()
            m = statistics.median
            rows.append((base, turn, m(worker), m(durable), m(sync), m(full), m(floor),
                         m(written) / 1e6, f"{la[0]:.2f}-{la2[0]:.2f}"))
    finally:
        flusher.close(60)
        shutil.rmtree(folder, ignore_errors=True)

    print("| agent | turn | worker ms (background save) | durable ms | synchronous save ms "
          "| full rewrite ms | plain write of the turn ms | MB written | sync / worker "
          "| full / worker | durable / plain | load avg (1 min) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for base, turn, w, d, s, f, p, mb, la in rows:
        run = (base + turn) // COMPACT_TOKENS > base // COMPACT_TOKENS
        print(f"| {base} | +{turn}{' (completes a run)' if run else ''} | **{w:.1f}** | {d:.1f} | {s:.1f} | {f:.1f} | {p:.1f} | "
              f"{mb:.1f} | {s / w:.1f}x | {f / w:.0f}x | {d / p:.2f}x | {la} |")
    print(f"\nmedians of {args.repeats}; worker = until the save returns (what the next turn "
          "waits); durable = until its blocks and manifest are fsynced and renamed")
    return 0


def _fs(folder: Path) -> str:
    try:
        import psutil

        best = max((p for p in psutil.disk_partitions(all=True)
                    if str(folder.resolve()).startswith(p.mountpoint)),
                   key=lambda p: len(p.mountpoint))
        return f"{best.fstype} on {best.device}"
    except Exception:  # noqa: BLE001 - a label only
        return "filesystem unknown"


if __name__ == "__main__":
    raise SystemExit(main())
