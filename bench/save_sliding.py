"""A turn's save on a sliding-window model past its window: window blocks (format permeant-kv/4)
against whole windows in the manifest (format 3), in one run, on a Gemma 3 12B-shaped KV cache
(48 layers, 40 of them sliding with a 1,024-token window, 8 KV heads of 256, bfloat16 as MLX
runs it on Metal), and the restore of each against a plain read of the same bytes.

    .venv/bin/python bench/save_sliding.py [--tokens 4096] [--turn 100] [--repeats 5] [--dir DIR]
    .venv/bin/python bench/save_sliding.py --model gemma3-270m --tokens 2048   # a real model

The cache is mlx-lm's own (KVCache and RotatingKVCache from the model's make_cache, filled by
update_and_fetch with random K/V: a prompt in 512-token chunks, then the turn one token at a
time, as decode writes it), so the rings rotate exactly as in a conversation; no forward pass
is run (the weights of a 12B model are not here, and a save only reads the cache). With
--model, that model's own cache is built by its forward passes instead (prefill, then the turn
one token at a time), e.g. the embedded Gemma 3 270M (15 of 18 layers sliding, window 512, one
KV head of 256, float32 as loaded on the CPU). Each repeat
saves the agent at `tokens` into a new folder (untimed), then the same `turn` tokens on a copy
that remembers that save, timed: a synchronous save (write, fsync, rename) as Ctrl+S does it.
The restore is timed until the cache is ready to decode (format 3 reorders each ring lazily,
which the first decode step would otherwise pay): into new memory (a start-up restore), and
right after the LRU released an agent of the same size ("evicted": its buffers handed back by
MLX), each against a plain page-cache read of the same files into one reused buffer. Last, the checkpoint each turn takes on such a
model, against copying every window as it did before. Medians; the load average is printed.
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
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

GEMMA3_12B = {  # the KV layout of mlx-community/gemma-3-12b-it-4bit (text config)
    "model_type": "gemma3_text", "num_hidden_layers": 48, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 256, "sliding_window": 1024,
    "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072,
    # tiny where the KV does not depend on it
    "hidden_size": 64, "intermediate_size": 64, "vocab_size": 49152,
}


def shaped_model(folder: Path, tokenizer, config: dict):
    """An MLX model directory with `config`'s KV layout and random bfloat16 weights, loaded."""
    from support.tiny_models import write_model_dir

    from permeant_tui.engine.models import load_model

    return load_model(str(write_model_dir(folder, config, tokenizer, dtype="bfloat16")),
                      weights_mode="as stored")


def feed(cache: list, n: int, heads: int, dim: int, chunk: int) -> None:
    import mlx.core as mx

    done = 0
    while done < n:
        m = min(chunk, n - done)
        for layer in cache:
            k = mx.random.normal((1, heads, m, dim)).astype(mx.bfloat16)
            layer.update_and_fetch(k, -k)
        mx.eval([layer.state for layer in cache])
        done += m


def checkpoints(cache: list, repeats: int) -> None:
    """The checkpoint taken at every turn's start on a sliding model (what a cancel goes back
    to): kvrewind's, which holds each ring by reference, against a copy of every window in
    order (kvcache.layer_state, evaluated: what it took before 2026-12-01)."""
    import mlx.core as mx

    from permeant_tui.engine import kvcache, kvrewind

    def copied() -> None:
        states = [kvcache.layer_state(x) for x in cache if type(x).__name__ == "RotatingKVCache"]
        mx.eval([(st.keys, st.values) for st in states])

    times: dict[str, list[float]] = {"checkpoint": [], "copy of every window": []}
    for _ in range(repeats):
        for name, fn in (("checkpoint", lambda: kvrewind.checkpoint(cache)),
                         ("copy of every window", copied)):
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1000)
    cp, copy = (statistics.median(v) for v in times.values())
    print(f"turn-start checkpoint: {cp:.2f} ms; a copy of every window in order (before): "
          f"{copy:.1f} ms; load average {os.getloadavg()[0]:.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--turn", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=None, help="a model to run instead of the Gemma 3 "
                    "12B-shaped cache (e.g. gemma3-270m)")
    ap.add_argument("--dir", default=None, help="where the snapshots go (default: beside the "
                    "repo, not /tmp, which can be a RAM disk)")
    args = ap.parse_args()

    from permeant_tui.engine import runtime

    runtime.prepare()
    import mlx.core as mx
    from resume_incremental import PlainReader, restore_fn, snapshot_files

    from permeant_tui.engine import kvcache, snapshot_format, snapshot_write
    from permeant_tui.engine.models import load_model
    from permeant_tui.engine.snapshot import write_snapshot

    root = Path(tempfile.mkdtemp(prefix="permeant-bench-sliding-",
                                 dir=args.dir or os.path.join(os.path.dirname(__file__), "..")))
    try:
        ids = [1000 + (i * 7919) % 40000 for i in range(args.tokens + args.turn)]
        if args.model:
            lm = load_model(args.model)
            base = kvcache.new_cache(lm.model)
            for i in range(0, args.tokens, 512):
                lm.model(mx.array([ids[i:min(i + 512, args.tokens)]]), cache=base)
                kvcache.eval_cache(base)

            def grow(cache: list) -> None:
                for t in ids[args.tokens:args.tokens + args.turn]:
                    lm.model(mx.array([[t]]), cache=cache)
                    kvcache.eval_cache(cache)
            shape = f"{lm.identity.name} ({sum(1 for w in lm.identity.layer_windows() if w)} " \
                    f"of {lm.identity.n_layers} layers sliding, {lm.identity.kv_dtype})"
        else:
            lm = shaped_model(root / "model", load_model(None).tokenizer, GEMMA3_12B)
            heads, dim = GEMMA3_12B["num_key_value_heads"], GEMMA3_12B["head_dim"]
            mx.random.seed(0)
            base = kvcache.new_cache(lm.model)
            feed(base, args.tokens, heads, dim, 512)

            def grow(cache: list) -> None:
                feed(cache, args.turn, heads, dim, 1)
            shape = "Gemma 3 12B-shaped KV (40 of 48 layers sliding, window 1,024, bfloat16)"
        real = (snapshot_write.FORMAT, snapshot_write.window_plan, snapshot_write._covered)

        def save(kind: str, folder: Path, cache: list, n: int) -> object:
            if kind == "format 3":  # the writer as it was: whole windows in the manifest
                snapshot_write.FORMAT = snapshot_format.FORMAT_V3
                snapshot_write.window_plan = lambda metas, n, b: None
                snapshot_write._covered = lambda meta, blocks, b, *window: \
                    snapshot_format._covered(meta, blocks, b)
            try:
                return write_snapshot(folder / "agents/a/kv.safetensors", cache, ids[:n],
                                      lm.identity, "a")
            finally:
                snapshot_write.FORMAT, snapshot_write.window_plan, snapshot_write._covered = real

        kinds = ["window blocks", "format 3"]
        ms: dict[str, list[float]] = {k: [] for k in kinds}
        written: dict[str, list[int]] = {k: [] for k in kinds}
        restore_ms: dict[str, list[float]] = {k: [] for k in kinds}
        read_ms: dict[str, list[float]] = {k: [] for k in kinds}
        evicted_ms: dict[str, list[float]] = {k: [] for k in kinds}
        loads = []
        for r in range(args.repeats):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                folder = root / f"{kind.replace(' ', '-')}-{r}"
                save(kind, folder, base, args.tokens)  # the agent as last saved (untimed)
                turn = kvcache.copy_cache(base)
                kvcache.set_persisted(turn, *kvcache.persisted(base))
                mx.random.seed(100 + r)
                grow(turn)
                t = time.perf_counter()
                info = save(kind, folder, turn, args.tokens + args.turn)
                ms[kind].append((time.perf_counter() - t) * 1000)
                written[kind].append(info.written)  # type: ignore[attr-defined]
                path = folder / "agents/a/kv.safetensors"
                files = snapshot_files(path)
                reader = PlainReader(sum(p.stat().st_size for p in files))
                restore = restore_fn(lm, path, ids[:args.tokens + args.turn])
                restore()  # first: page cache warm, like the other kind
                mx.set_cache_limit(0), mx.clear_cache(), mx.set_cache_limit(32 << 20)
                t = time.perf_counter()
                mx.eval([layer.state for layer in restore()])  # ready to decode: nothing
                restore_ms[kind].append((time.perf_counter() - t) * 1000)  # left lazy
                # after an eviction: the LRU released an agent of this size (its buffers kept
                # by MLX, runtime.keep_freed_buffers), then this one is restored
                runtime.keep_freed_buffers(reader.view.nbytes)
                victim = restore()
                mx.eval([layer.state for layer in victim])
                del victim
                t = time.perf_counter()
                mx.eval([layer.state for layer in restore()])
                evicted_ms[kind].append((time.perf_counter() - t) * 1000)
                mx.set_cache_limit(0), mx.clear_cache(), mx.set_cache_limit(32 << 20)
                runtime._keep_freed = 0
                t = time.perf_counter()
                reader.read(files)
                read_ms[kind].append((time.perf_counter() - t) * 1000)
                del turn
                shutil.rmtree(folder)
            loads.append(os.getloadavg()[0])
        med = {k: statistics.median(v) for k, v in ms.items()}
        mb = {k: statistics.median(v) / 1e6 for k, v in written.items()}
        print(f"{shape}, {args.tokens:,} tokens + a {args.turn}-token turn; median of {args.repeats}, "
              f"load average {min(loads):.1f}-{max(loads):.1f} ({os.cpu_count()} cores)")
        print(f"{'':16}{'save ms':>9}{'MB written':>12}{'restore ms':>12}{'evicted ms':>12}"
              f"{'read ms':>9}{'restore/read':>14}{'evicted/read':>14}  save runs")
        for k in kinds:
            rs, rd = statistics.median(restore_ms[k]), statistics.median(read_ms[k])
            ev = statistics.median(evicted_ms[k])
            runs = ", ".join(f"{x:.0f}" for x in ms[k])
            print(f"{k:16}{med[k]:9.1f}{mb[k]:12.1f}{rs:12.1f}{ev:12.1f}{rd:9.1f}"
                  f"{rs / rd:14.2f}{ev / rd:14.2f}  {runs}")
        print(f"format 3 / window blocks: save x{med['format 3'] / med['window blocks']:.1f}, "
              f"bytes written x{mb['format 3'] / mb['window blocks']:.1f}")
        after = kvcache.copy_cache(base)  # a cache whose rings have wrapped: after a turn
        grow(after)
        checkpoints(after, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
