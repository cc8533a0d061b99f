"""What the snapshot tests compare a restored cache with (an agent built by prefill, next-token
logits and greedy ids, each computed on a copy so the cache under test never moves), and how
they save, restore and expect a refusal."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from permeant_tui.engine import kvcache
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.blockstore import BlockStore
from permeant_tui.engine.errors import SnapshotCorrupt
from permeant_tui.engine.generation import prefill
from permeant_tui.engine.snapshot import attach, read_header, read_snapshot, write_snapshot

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


def saved_snapshot(tmp_path: Path, lm, tok):
    """An agent of len(TEXT) tokens saved as a manifest plus blocks -> (path, ids, agent, info)."""
    ids = tok.encode(TEXT)
    agent = built(lm, ids)
    path = tmp_path / "agents/technical/kv.safetensors"
    info = write_snapshot(path, agent.cache, ids, lm.identity, "technical")
    return path, ids, agent, info


def restore(lm, path: Path, ids: list[int], store: BlockStore | None = None) -> list:
    """Verify and attach the snapshot at `path`, which must hold exactly `ids`."""
    states, got, _ = read_snapshot(path, lm.identity, ids, store)
    assert got == ids
    return attach(lm.model, states)


def blocks_of(path: Path) -> list[str]:
    return json.loads(read_header(path)["__metadata__"]["blocks"])


def refused(lm, path, ids, check: str, store=None) -> SnapshotCorrupt:
    """The restore fails `check`, with a one-line message."""
    with pytest.raises(SnapshotCorrupt) as ei:
        restore(lm, path, ids, store)
    assert ei.value.check == check, ei.value
    assert "\n" not in str(ei.value)  # one line
    return ei.value


def session(folder: Path, loaded, msgs, **kw):
    """An Engine on `folder` asks technical each of `msgs` (24 tokens each), then shuts down
    -> (the replies, every event)."""
    from permeant_tui.engine.worker import Engine

    events: list = []
    engine = Engine(folder, loaded=loaded, eager_restore=False, on_event=events.append, **kw)
    engine.start()
    try:
        engine.wait_ready(60)
        results = [engine.submit_future("technical", m, max_tokens=24)[1].result(120)
                   for m in msgs]
    finally:
        engine.shutdown()
    return results, events
