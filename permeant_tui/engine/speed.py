"""A quick prefill/decode figure for `permeant doctor` (not a benchmark: see bench/)."""

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
