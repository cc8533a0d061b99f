"""Agents decoded in one batch (engine/batch.py) against the same turns run one after another:
greedy ids, the ids the caches hold and the next-token logits from the caches are the same, on
llama, qwen2 and gemma3 (sliding layers past their window). A stream cancelled mid-batch, or one
that cannot fit, leaves its agent on its transcript and does not disturb the others."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from support.tiny_models import WINDOW, tiny_model

from permeant_tui.engine import kvcache
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.batch import BatchTurn, batchable, run_turns
from permeant_tui.engine.errors import ContextExhausted, TurnCancelled
from permeant_tui.engine.events import Tokens
from permeant_tui.engine.generation import TurnParams, run_turn

ARCHS = ["llama", "qwen2", "gemma3_text"]
ROLES = ("technical", "business", "coordinator")
HISTORY = ("Our payment API returns 502 errors under load.",
           "Which service should we look at first? " * 6)
QUESTIONS = ("What would you log to confirm it?", "And what does it cost us per hour?",
             "Summarise both in one plan.")


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


def agents_with_history(lm, n: int, turns: int) -> list[Agent]:
    """n agents with different histories (different cache lengths), built by real turns."""
    out = []
    for k in range(n):
        a = Agent(ROLES[k], ROLES[k], ROLES[k].title(), f"You are the {ROLES[k]} expert.")
        for i in range(turns + k):
            run_turn(lm.model, lm.tokenizer, a, HISTORY[i % 2], TurnParams(max_tokens=10),
                     context_limit=4096, turn_id=0, emit=lambda e: None,
                     cancel=threading.Event(), source="test")
        out.append(a)
    return out


def clone(a: Agent) -> Agent:
    return Agent(a.agent_id, a.role, a.title, a.system, list(a.turns),
                 kvcache.copy_cache(a.cache), list(a.cache_ids))


def next_logits(lm, agent: Agent, token: int) -> np.ndarray:
    cache = kvcache.copy_cache(agent.cache)
    out = lm.model(mx.array([[token]]), cache=cache)
    return np.array(out[0, -1].astype(mx.float32))


def bt(agent, text, max_tokens=24, cancel=None, emit=None) -> BatchTurn:
    return BatchTurn(agent, text, TurnParams(max_tokens=max_tokens), 1,
                     emit or (lambda e: None), cancel or threading.Event(), "test")


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_sequential(arch, tok):
    lm = tiny_model(arch, tok)[1]
    assert batchable(lm.model)
    base = agents_with_history(lm, 3, 2)
    if arch == "gemma3_text":  # the sliding layers must be past their window
        assert all(len(a.cache_ids) > WINDOW for a in base)
    seq = [clone(a) for a in base]
    seq_res = [run_turn(lm.model, lm.tokenizer, a, q, TurnParams(max_tokens=24),
                        context_limit=4096, turn_id=1, emit=lambda e: None,
                        cancel=threading.Event(), source="test")
               for a, q in zip(seq, QUESTIONS, strict=True)]
    bat = [clone(a) for a in base]
    streamed: dict[str, list[int]] = {a.agent_id: [] for a in bat}

    def emit(e):
        if isinstance(e, Tokens):
            streamed[e.agent_id].extend(e.ids)

    res = run_turns(lm.model, lm.tokenizer, [bt(a, q, emit=emit) for a, q in zip(bat, QUESTIONS, strict=True)],
                    context_limit=4096)
    for s, b, rs, rb in zip(seq, bat, seq_res, res, strict=True):
        assert not isinstance(rb, BaseException), rb
        assert rb.generated_ids == rs.generated_ids, s.agent_id
        assert rb.finish_reason == rs.finish_reason
        assert b.cache_ids == s.cache_ids
        assert b.cache_ids == b.expected_ids(lm.tokenizer)
        kvcache.check_offsets(b.cache, len(b.cache_ids))
        probe = b.cache_ids[-1]
        np.testing.assert_allclose(next_logits(lm, b, probe), next_logits(lm, s, probe),
                                   atol=1e-4, rtol=1e-4)
        eos = set(lm.tokenizer.eos_token_ids)
        assert streamed[b.agent_id] == [t for t in rb.generated_ids if t not in eos]
    # the next turn runs on the split-back caches exactly as on the sequential ones
    again_s = run_turn(lm.model, lm.tokenizer, seq[0], "Go on.", TurnParams(max_tokens=12),
                       context_limit=4096, turn_id=2, emit=lambda e: None,
                       cancel=threading.Event(), source="test")
    again_b = run_turn(lm.model, lm.tokenizer, bat[0], "Go on.", TurnParams(max_tokens=12),
                       context_limit=4096, turn_id=2, emit=lambda e: None,
                       cancel=threading.Event(), source="test")
    assert again_b.generated_ids == again_s.generated_ids
    assert again_b.cached == again_s.cached


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_cancel_one_stream_mid_batch(arch, tok):
    lm = tiny_model(arch, tok)[1]
    base = agents_with_history(lm, 2, 2)
    seq = clone(base[1])
    ref = run_turn(lm.model, lm.tokenizer, seq, QUESTIONS[1], TurnParams(max_tokens=40),
                   context_limit=4096, turn_id=1, emit=lambda e: None,
                   cancel=threading.Event(), source="test")
    a, b = clone(base[0]), clone(base[1])
    before = list(a.cache_ids)
    stop = threading.Event()

    def emit(e):  # cancel the first stream once it has produced text
        if isinstance(e, Tokens) and e.agent_id == a.agent_id:
            stop.set()

    res = run_turns(lm.model, lm.tokenizer,
                    [bt(a, QUESTIONS[0], 40, stop, emit), bt(b, QUESTIONS[1], 40)],
                    context_limit=4096)
    assert isinstance(res[0], TurnCancelled)
    assert a.cache_ids == before == a.expected_ids(lm.tokenizer)  # back on its transcript
    kvcache.check_offsets(a.cache, len(a.cache_ids))
    assert len(a.turns) == len(base[0].turns)
    assert not isinstance(res[1], BaseException)
    assert res[1].generated_ids == ref.generated_ids
    assert b.cache_ids == seq.cache_ids


def test_turn_that_cannot_fit_does_not_stop_the_others(tok):
    lm = tiny_model("llama", tok)[1]
    base = agents_with_history(lm, 2, 1)
    a, b = clone(base[0]), clone(base[1])
    before = list(a.cache_ids)
    big = BatchTurn(a, QUESTIONS[0], TurnParams(max_tokens=5000), 1, lambda e: None,
                    threading.Event(), "test")
    res = run_turns(lm.model, lm.tokenizer, [big, bt(b, QUESTIONS[1])], context_limit=4096)
    assert isinstance(res[0], ContextExhausted)
    assert a.cache_ids == before
    assert not isinstance(res[1], BaseException) and res[1].generated > 0


def test_one_turn_per_agent(tok):
    lm = tiny_model("llama", tok)[1]
    a = agents_with_history(lm, 1, 1)[0]
    with pytest.raises(ValueError, match="one turn per agent"):
        run_turns(lm.model, lm.tokenizer, [bt(a, "x"), bt(a, "y")], context_limit=4096)


def test_repetition_penalty_batched_equals_sequential(tok):
    """The penalty looks back over the same tokens in a batch as in a single turn."""
    lm = tiny_model("llama", tok)[1]
    base = agents_with_history(lm, 2, 1)
    params = TurnParams(max_tokens=24, repetition_penalty=1.5)
    seq = [clone(a) for a in base]
    ref = [run_turn(lm.model, lm.tokenizer, a, q, params, context_limit=4096, turn_id=1,
                    emit=lambda e: None, cancel=threading.Event(), source="test")
           for a, q in zip(seq, QUESTIONS, strict=False)]
    bat = [clone(a) for a in base]
    res = run_turns(lm.model, lm.tokenizer,
                    [BatchTurn(a, q, params, 1, lambda e: None, threading.Event(), "test")
                     for a, q in zip(bat, QUESTIONS, strict=False)], context_limit=4096)
    plain = run_turn(lm.model, lm.tokenizer, clone(base[0]), QUESTIONS[0],
                     TurnParams(max_tokens=24), context_limit=4096, turn_id=1,
                     emit=lambda e: None, cancel=threading.Event(), source="test")
    assert plain.generated_ids != ref[0].generated_ids  # the penalty changes this reply
    for r, b in zip(ref, res, strict=True):
        assert not isinstance(b, BaseException), b
        assert b.generated_ids == r.generated_ids
