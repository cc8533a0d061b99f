"""Prefill at long context on the CPU device: attention through numpy (engine/cpu_attention.py)
against MLX's own (`mx.fast.scaled_dot_product_attention`, unfused on the CPU), same process.

A short message (17 and 28 tokens, what a resumed agent's next turn prefills) and a 512-token
chunk are forwarded on the default model (SmolLM2-135M) at context offsets 512, 2,048 and 3,072,
the path on and off alternating; the cache is moved back after each forward (O(1)), so every
run sees the same context. Then 24 greedy ids after a message at 2,048 tokens, on against off,
and with --full a whole prefill of --full tokens in 512-token chunks.

    .venv/bin/python bench/prefill_attention.py [--repeats 3] [--full 3584]

Figures are medians in ms; the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

OFFSETS = (512, 2048, 3072)
SIZES = (17, 28, 512)
TEXT = ("The payment API returns intermittent 502 errors under load; the retry logic doubles "
        "traffic and the database connection pool is exhausted. Which fix ships first? ")


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards of each kind")
    ap.add_argument("--full", type=int, default=0,
                    help="also time a whole prefill of this many tokens, on against off")
    args = ap.parse_args()

    from permeant_tui.engine import runtime

    runtime.prepare()
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from permeant_tui.engine import cpu_attention
    from permeant_tui.engine.models import load_model

    lm = load_model(None)
    print(f"{lm.identity.name}, device {runtime.device_label()}, blas {runtime.blas_label()}")
    print(f"attention: {cpu_attention.label()}")
    if not cpu_attention.installed():
        print("the numpy path is not installed here: nothing to compare")
        return 1
    model = lm.model
    need = max(max(OFFSETS) + max(SIZES) + 32, args.full)
    ids = lm.tokenizer.encode(TEXT * (need // 20 + 2))[:need]

    def forward(cache, tokens):
        out = model(mx.array([tokens]), cache=cache)
        mx.eval(out)
        return out

    def timed(cache, tokens, on):
        cpu_attention.set_enabled(on)
        t = time.perf_counter()
        forward(cache, tokens)
        ms = (time.perf_counter() - t) * 1000
        for c in cache:
            c.trim(len(tokens))
        return ms

    print(f"load average at start {load()}; medians of {args.repeats}, on/off alternating\n")
    print(f"{'offset':>6} {'tokens':>6} {'numpy ms':>9} {'mlx ms':>9} {'mlx/numpy':>9}  load")
    cache = make_prompt_cache(model)
    done = 0
    for offset in OFFSETS:
        cpu_attention.set_enabled(True)
        for i in range(done, offset, 512):
            forward(cache, ids[i:min(i + 512, offset)])
        done = offset
        for size in SIZES:
            chunk = ids[offset:offset + size]
            timed(cache, chunk, True), timed(cache, chunk, False)  # first use of each shape
            on, off = [], []
            for r in range(args.repeats):
                order = (True, False) if r % 2 == 0 else (False, True)
                for mode in order:
                    (on if mode else off).append(timed(cache, chunk, mode))
            a, b = statistics.median(on), statistics.median(off)
            print(f"{offset:>6} {size:>6} {a:>9.1f} {b:>9.1f} {b / a:>8.2f}x  {load()}",
                  flush=True)

    # Greedy continuation after a 17-token message at 2,048: on against off, same context.
    cache = make_prompt_cache(model)
    cpu_attention.set_enabled(True)
    for i in range(0, 2048, 512):
        forward(cache, ids[i:i + 512])

    def greedy(on, n=24):
        cpu_attention.set_enabled(on)
        logits = forward(cache, ids[2048:2048 + 17])[0, -1]
        out = []
        for _ in range(n):
            out.append(int(mx.argmax(logits).item()))
            logits = forward(cache, out[-1:])[0, -1]
        for c in cache:
            c.trim(17 + n)
        return out

    with_numpy, with_mlx = greedy(True), greedy(False)
    same = sum(a == b for a, b in zip(with_numpy, with_mlx, strict=True))
    print(f"\n24 greedy ids after a 17-token message at 2,048: {same}/24 identical "
          f"({'same' if with_numpy == with_mlx else 'DIFFERENT'})")

    if args.full:
        print(f"\nwhole prefill of {args.full} tokens in 512-token chunks:")
        for on in (True, False, True, False):
            cpu_attention.set_enabled(on)
            cache = make_prompt_cache(model)
            t = time.perf_counter()
            for i in range(0, args.full, 512):
                forward(cache, ids[i:min(i + 512, args.full)])
            print(f"  {'numpy' if on else 'mlx  '} {(time.perf_counter() - t) * 1000:>8.0f} ms"
                  f"  (load {load()})", flush=True)
    cpu_attention.set_enabled(True)
    print(f"\nload average at end {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
