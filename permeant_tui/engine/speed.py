"""Model warm-up at load, and a quick prefill/decode figure for `permeant doctor` (not a
benchmark: see bench/)."""

from __future__ import annotations

import time


def quick_speed(lm, n_prefill: int = 256, n_decode: int = 32) -> tuple[float, float]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from .kvcache import eval_cache, new_cache

    ids = (lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. ") * 64)[:n_prefill]
    cache = new_cache(lm.model)
    t = time.perf_counter()
    lm.model(mx.array([ids]), cache=cache)
    eval_cache(cache)
    prefill = n_prefill / (time.perf_counter() - t)
    cache = new_cache(lm.model)
    gen = generate_step(mx.array(ids[:16]), lm.model, max_tokens=n_decode, prompt_cache=cache)
    next(gen)
    t = time.perf_counter()
    n = sum(1 for _ in gen)
    decode = n / (time.perf_counter() - t)
    return prefill, decode


def warm_up(model) -> float:
    """A 4-token prefill and one decode step on a throwaway cache; returns the ms spent.

    The first forward pass of a process pays once for MLX's first use of each kernel (and
    mlx-lm's compiled functions): about 1 s on the CPU device under load, measured as the
    difference between the first and the second 17-token prefill after a resume
    (bench/first_token.py). Paid here, while the workspace opens, it is not in the person's
    wait for the first token of their next message.
    """
    import mlx.core as mx

    from .kvcache import new_cache

    t = time.perf_counter()
    cache = new_cache(model)
    mx.eval(model(mx.array([[1, 2, 3, 4]]), cache=cache))
    mx.eval(model(mx.array([[5]]), cache=cache))
    return (time.perf_counter() - t) * 1000
