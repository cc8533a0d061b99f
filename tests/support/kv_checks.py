"""What the snapshot tests compare a restored cache with: an agent built by prefill, next-token
logits and greedy ids, each computed on a copy so the cache under test never moves."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from permeant_tui.engine import kvcache
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.generation import prefill

TEXT = "The payment API returns 502 on retries; the queue backs up and the workers stall. " * 16


def built(lm, ids: list[int]) -> Agent:
    """An agent whose cache holds `ids`, by prefill."""
    agent = Agent("technical", "technical", "Technical", "system")
    prefill(lm.model, agent, ids)
    return agent


def logits(lm, cache) -> np.ndarray:
    """Next-token logits after `cache` (token 198 fed), computed on a copy."""
    out = lm.model(mx.array([[198]]), cache=kvcache.copy_cache(cache))
    return np.array(out[0, -1].astype(mx.float32))


def greedy(lm, cache, first: int = 198, n: int = 8) -> list[int]:
    """n greedy ids after `cache`, starting from `first`, computed on a copy."""
    cache, x, out = kvcache.copy_cache(cache), first, []
    for _ in range(n):
        x = int(mx.argmax(lm.model(mx.array([[x]]), cache=cache)[0, -1]).item())
        out.append(x)
    return out
