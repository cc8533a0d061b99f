"""Prompt-lookup decoding (engine/lookup.py): drafts from the context, kept only while they are
what the model samples. Greedy ids equal plain decoding's, the cache ends holding exactly the
conversation (next-token logits equal a rebuild's), a sliding-window cache never drafts, and a
cancel mid-reply leaves ids and K/V in agreement; on llama and qwen3 tiny models and SmolLM2."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from support.tiny_models import tiny_model

from permeant_tui.engine import kvcache, kvrewind, lookup
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.errors import TurnCancelled
from permeant_tui.engine.events import Tokens
from permeant_tui.engine.generation import TurnParams, run_turn

# a brief that quotes two answers: the coordinator's reply restates long runs of it
BRIEF = ("Technical said: the payment API returns 502 under load because the retry logic "
         "retries every request three times without backoff. Business said: the payment API "
         "returns 502 under load, customers abandon checkout, and refunds cost us money. "
         "Restate both points: the payment API returns 502 under load because")


@pytest.fixture(autouse=True)
def lookup_on(monkeypatch):
    monkeypatch.setenv("PERMEANT_LOOKUP", "1")  # off by default (see engine/lookup.py)


def test_lookup_is_off_unless_asked(monkeypatch, real_model):
    monkeypatch.delenv("PERMEANT_LOOKUP")
    monkeypatch.setattr(lookup, "lookup_generate_step",
                        lambda *a, **k: pytest.fail("drafted without PERMEANT_LOOKUP=1"))
    r = turn(real_model, agent_for(real_model), BRIEF, use_lookup=True, max_tokens=4)
    assert len(r.generated_ids) == 4


def test_find_draft_takes_what_followed_the_latest_match():
    ids = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup.find_draft(ids, 3, 2) == [7, 8]  # the most recent earlier "1 2 3"
    assert lookup.find_draft([4, 5, 6, 4, 5], 3, 8, least=2) == [6, 4, 5]  # falls back to 2
    assert lookup.find_draft([4, 5, 6, 4, 5], 3, 8) == []  # a 2-token match is not enough
    assert lookup.find_draft([1, 2, 3, 4], 3, 8) == []
    assert lookup.find_draft([7], 3, 8) == []


def agent_for(lm, system: str = "You are the coordinator.") -> Agent:
    return Agent("coordinator", "coordinator", "Coordinator", system, [])


def turn(lm, agent, text, *, use_lookup, max_tokens=40, cancel=None, emit=None):
    params = TurnParams(max_tokens=max_tokens, lookup=use_lookup)
    return run_turn(lm.model, lm.tokenizer, agent, text, params, context_limit=4096,
                    turn_id=1, emit=emit or (lambda e: None), cancel=cancel or threading.Event(),
                    source="new")


def next_logits(lm, cache, ids) -> np.ndarray:
    return np.array(lm.model(mx.array([ids[-1:]]), cache=cache)[0, -1].astype(mx.float32))


def rebuilt_logits(lm, ids) -> np.ndarray:
    cache = kvcache.new_cache(lm.model)
    lm.model(mx.array([ids[:-1]]), cache=cache)
    return next_logits(lm, cache, ids)


def check_same_as_plain(lm, monkeypatch):
    drafts = []
    real = lookup.lookup_generate_step

    def counting(*a, **kw):
        kw["on_draft"] = lambda p, k: drafts.append((p, k))
        return real(*a, **kw)

    monkeypatch.setattr(lookup, "lookup_generate_step", counting)
    plain, drafted = agent_for(lm), agent_for(lm)
    a = turn(lm, plain, BRIEF, use_lookup=False)
    b = turn(lm, drafted, BRIEF, use_lookup=True)
    assert b.generated_ids == a.generated_ids
    assert sum(k for _, k in drafts) > 0, drafts  # drafts were proposed and some kept
    # the cache holds exactly the conversation, nothing a rejected draft left behind (the last
    # token sampled is not fed yet: generate_step feeds it ahead, lookup on the next turn)
    assert kvcache.cache_offset(drafted.cache) == len(drafted.cache_ids)
    assert drafted.cache_ids == plain.cache_ids[:len(plain.cache_ids) - 1]
    got = next_logits(lm, drafted.cache, drafted.cache_ids + [drafted.cache_ids[-1]])
    want = rebuilt_logits(lm, drafted.cache_ids + [drafted.cache_ids[-1]])
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())
    # a second turn reuses the cache as usual
    a2 = turn(lm, plain, "And the fix?", use_lookup=False)
    b2 = turn(lm, drafted, "And the fix?", use_lookup=True)
    assert b2.generated_ids == a2.generated_ids and b2.cached == a2.cached - 1


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_ids_equal_plain_decoding_tiny(arch, real_model, monkeypatch):
    _, lm = tiny_model(arch, real_model.tokenizer)
    check_same_as_plain(lm, monkeypatch)


def test_greedy_ids_equal_plain_decoding_smollm2(real_model, monkeypatch):
    check_same_as_plain(real_model, monkeypatch)


def test_sliding_window_cache_never_drafts(real_model, monkeypatch):
    _, lm = tiny_model("gemma3_text", real_model.tokenizer)
    monkeypatch.setattr(lookup, "lookup_generate_step",
                        lambda *a, **k: pytest.fail("drafted on a sliding-window cache"))
    agent = agent_for(lm)
    r = turn(lm, agent, BRIEF, use_lookup=True, max_tokens=8)
    assert len(r.generated_ids) == 8 and not kvrewind.always_trimmable(agent.cache)


@pytest.mark.parametrize("after", [1, 5, 12])
def test_cancel_mid_reply_leaves_ids_and_kv_agreeing(real_model, after):
    lm = real_model
    agent = agent_for(lm)
    turn(lm, agent, "Say hello.", use_lookup=True, max_tokens=8)
    before = list(agent.cache_ids)
    cancel, seen = threading.Event(), []

    def emit(e):
        if isinstance(e, Tokens):
            seen.extend(e.ids)
            if len(seen) >= after:
                cancel.set()

    with pytest.raises(TurnCancelled):
        turn(lm, agent, BRIEF, use_lookup=True, max_tokens=60, cancel=cancel, emit=emit)
    # back to the transcript: what was there, plus at most the reply's last token, which the
    # cancelled turn had fed (lookup leaves a reply's last token to the next turn)
    assert agent.cache_ids[:len(before)] == before and len(agent.cache_ids) <= len(before) + 1
    assert len(agent.turns) == 1
    assert kvcache.cache_offset(agent.cache) == len(agent.cache_ids)
    got = next_logits(lm, agent.cache, agent.cache_ids + [agent.cache_ids[-1]])
    want = rebuilt_logits(lm, agent.cache_ids + [agent.cache_ids[-1]])
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())
