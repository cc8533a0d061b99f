"""The free room a restore leaves after the last token (full layers get room for the next turn)
is never read before a turn writes it, so the restore leaves whatever the buffer held there (a
new allocation's bytes, or an evicted agent's K/V) instead of zeroing it. Poisoned with NaN,
the room changes nothing: next-token logits bit for bit, greedy ids, a multi-token prefill
into it, and a save and restore after it, on llama, qwen2 and gemma3 (sliding layers past
their window, whose rings have no room)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as mlx_cache
from support.kv_checks import TEXT, built, greedy, logits
from support.tiny_models import WINDOW, tiny_model

from permeant_tui.engine import kvcache
from permeant_tui.engine.generation import prefill
from permeant_tui.engine.snapshot import attach, read_snapshot, write_snapshot


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


def poison(cache: list) -> int:
    """NaN in every full layer's rows past its offset -> how many rows were poisoned."""
    rows = 0
    for c in cache:
        if type(c) is not mlx_cache.KVCache or c.keys is None:
            continue
        n, cap = c.offset, int(c.keys.shape[2])
        if cap > n:
            c.keys[..., n:, :] = mx.nan
            c.values[..., n:, :] = mx.nan
            rows += cap - n
    mx.eval([c.state for c in cache])
    return rows


def has_nan(cache: list, rows: str = "all") -> bool:
    """NaN anywhere in the buffers (`rows="all"`), or in the rows holding tokens ("tokens")."""
    if rows == "all":
        arrays = kvcache.buffers(cache)
    else:
        states = kvcache.layer_states(cache)
        arrays = [a for st in states if st.keys is not None
                  for a in kvcache.parts(st.keys) + kvcache.parts(st.values)]
    return any(bool(mx.any(mx.isnan(a)).item()) for a in arrays)


def restored(lm, path, ids) -> list:
    states, got, _ = read_snapshot(path, lm.identity, ids)
    assert got == ids
    return attach(lm.model, states)


def decode(lm, cache, first: int = 198, n: int = 8) -> tuple[list[int], np.ndarray]:
    """n greedy ids run on `cache` itself (not a copy: kv_checks' copies hold no room), and the
    last step's logits."""
    x, out = first, []
    for _ in range(n):
        step = lm.model(mx.array([[x]]), cache=cache)[0, -1]
        x = int(mx.argmax(step).item())
        out.append(x)
    return out, np.array(step.astype(mx.float32))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_a_poisoned_room_changes_nothing(arch, tok, tmp_path):
    _, lm = tiny_model(arch, tok)
    ids = tok.encode(TEXT * 2)
    n = 3 * WINDOW + 5  # past the sliding layers' window
    live = built(lm, ids[:n])
    path = tmp_path / "agents/a/kv.safetensors"
    write_snapshot(path, live.cache, ids[:n], lm.identity, "a")
    # decoding one token at a time into the room, as a reply does
    cache = restored(lm, path, ids[:n])
    assert poison(cache) > 0  # the restore left room, and it now holds NaN
    got, last = decode(lm, cache)
    want, want_last = decode(lm, kvcache.copy_cache(live.cache))
    assert got == want and np.array_equal(last, want_last)
    # a new message prefilled into the room, several tokens at once, as a turn does
    agent = built(lm, [])
    agent.cache = restored(lm, path, ids[:n])
    poison(agent.cache)
    more = ids[n:n + 19]
    prefill(lm.model, agent, more)
    prefill(lm.model, live, more)
    assert np.array_equal(logits(lm, agent.cache), logits(lm, live.cache))
    assert has_nan(agent.cache)  # the rest of the room is still poisoned
    # saved so: nothing of the room reaches the disk (the room of the new restore may hold
    # anything, NaN included: its buffers can be the poisoned ones, freed and reused)
    write_snapshot(path, agent.cache, ids[:n + 19], lm.identity, "a")
    again = restored(lm, path, ids[:n + 19])
    assert not has_nan(again, "tokens")
    assert np.array_equal(logits(lm, again), logits(lm, live.cache))
    assert greedy(lm, again) == greedy(lm, live.cache)
