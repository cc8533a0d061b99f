"""Prefill as you type (engine/drafts.py): the words typed so far go into the agent's cache before
Enter. On llama, qwen3 and gemma3 (sliding layers) tiny models: a turn after a draft (whatever
the person changed before Enter) gives the same greedy ids and next-token logits as the same
turn without one, and prefills only what the draft did not cover; a dropped draft leaves the
cache holding exactly the transcript; a draft is never made where trimming could not take it
back (a sliding layer it would fill); a cancelled draft leaves ids and K/V in agreement."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from support.tiny_models import WINDOW, tiny_model

from permeant_tui.engine import drafts, kvcache, kvrewind
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.generation import TurnParams, prefill, run_turn

ARCHS = ("llama", "qwen3", "gemma3_text")
HISTORY = "Our payment API returns 502 errors under load."
NEXT = "Which service should we look at first, the gateway or the database?"
SHORT = "Which service first?"  # (a whole prompt within the gemma3 model's 64-token window)
GREEDY = TurnParams(max_tokens=8)


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


def agent() -> Agent:
    return Agent("technical", "technical", "Technical", "You are a technical expert.", [])


def turn(lm, a: Agent, text: str):
    return run_turn(lm.model, lm.tokenizer, a, text, GREEDY, context_limit=4096, turn_id=1,
                    emit=lambda e: None, cancel=threading.Event(), source="new")


def next_logits(lm, a: Agent) -> np.ndarray:
    """The logits after the cache's last token, on a copy (the agent's cache is unchanged)."""
    cache = kvcache.copy_cache(a.cache)
    kvrewind.rewind(cache, 1) if kvrewind.can_rewind(cache, 1) else None
    out = lm.model(mx.array([[a.cache_ids[-1]]]), cache=cache)
    return np.array(out[0, -1].astype(mx.float32))


def with_history(lm) -> Agent:
    a = agent()
    turn(lm, a, HISTORY)
    return a


def at_rest(lm, a: Agent) -> None:
    expected = a.expected_ids(lm.tokenizer)
    assert a.cache_ids == expected
    assert kvcache.cache_offset(a.cache) == len(expected)
    assert not a.draft


@pytest.mark.parametrize("arch", ARCHS)
def test_a_turn_after_a_draft_equals_the_same_turn_without_one(arch, tok):
    _, lm = tiny_model(arch, tok)
    plain = with_history(lm)
    r_plain = turn(lm, plain, NEXT)

    drafted = with_history(lm)
    n = drafts.prepare(lm.model, lm.tokenizer, drafted, NEXT[:40], context_limit=4096)
    assert n > 0 and drafted.draft
    assert kvcache.cache_offset(drafted.cache) == len(drafted.cache_ids)
    r = turn(lm, drafted, NEXT)
    assert r.generated_ids == r_plain.generated_ids
    assert r.cached > r_plain.cached and r.prefilled < r_plain.prefilled
    assert r.cached + r.prefilled == r_plain.cached + r_plain.prefilled
    at_rest(lm, drafted)
    assert np.abs(next_logits(lm, drafted) - next_logits(lm, plain)).max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_a_message_changed_after_its_draft_is_trimmed_back_and_still_right(arch, tok):
    _, lm = tiny_model(arch, tok)
    plain = with_history(lm)
    sent = "Which database should we tune?"
    r_plain = turn(lm, plain, sent)

    a = with_history(lm)
    drafts.prepare(lm.model, lm.tokenizer, a, "Which service owns the retries and", context_limit=4096)
    r = turn(lm, a, sent)  # the person rewrote it before Enter
    assert r.generated_ids == r_plain.generated_ids
    at_rest(lm, a)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_dropped_draft_leaves_exactly_the_transcript(arch, tok):
    _, lm = tiny_model(arch, tok)
    a = with_history(lm)
    before = list(a.cache_ids)
    assert drafts.prepare(lm.model, lm.tokenizer, a, SHORT, context_limit=4096) > 0
    assert len(a.cache_ids) > len(before)
    drafts.drop(lm.model, lm.tokenizer, a)
    assert a.cache_ids == before
    at_rest(lm, a)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("params", [GREEDY, TurnParams(max_tokens=8, repetition_penalty=1.3),
                                    TurnParams(max_tokens=8, temp=0.8, top_p=0.9, seed=7,
                                               repetition_penalty=1.1)],
                         ids=["greedy", "penalty", "sampled"])
def test_enter_on_an_unchanged_draft_prefills_nothing_and_samples_the_same(arch, params, tok):
    """The draft holds the whole prompt and the logits after it: the first token comes from
    them, with the same sampler, penalty and seed as a turn that prefilled the message."""
    _, lm = tiny_model(arch, tok)
    plain = with_history(lm)
    r_plain = run_turn(lm.model, lm.tokenizer, plain, SHORT, params, context_limit=4096,
                       turn_id=2, emit=lambda e: None, cancel=threading.Event(), source="new")
    a = with_history(lm)
    drafts.prepare(lm.model, lm.tokenizer, a, SHORT + " ", context_limit=4096)
    prompt = a.prompt_ids(lm.tokenizer, SHORT)
    assert a.cache_ids == prompt and a.draft_logits is not None
    r = run_turn(lm.model, lm.tokenizer, a, SHORT, params, context_limit=4096, turn_id=2,
                 emit=lambda e: None, cancel=threading.Event(), source="new")
    assert r.prefilled == 0 and r.cached == len(prompt)
    assert r.generated_ids == r_plain.generated_ids
    at_rest(lm, a)
    assert a.draft_logits is None


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_repetition_penalty_sees_the_same_tokens_with_or_without_a_draft(arch, tok):
    """mlx_lm hands a penalty only the tokens fed in its call; the engine puts the cached ones in
    front, so a message the model would echo is penalised the same when the draft fed it."""
    _, lm = tiny_model(arch, tok)
    echo = with_history(lm).turns[-1].reply.strip()  # the words this model likes to say
    penalty = TurnParams(max_tokens=8, repetition_penalty=3.0)

    def reply(drafted: bool, params: TurnParams) -> tuple[int, ...]:
        a = with_history(lm)
        if drafted:
            drafts.prepare(lm.model, lm.tokenizer, a, echo, context_limit=4096)
        return run_turn(lm.model, lm.tokenizer, a, echo, params, context_limit=4096,
                        turn_id=2, emit=lambda e: None, cancel=threading.Event(),
                        source="new").generated_ids

    assert reply(False, penalty) != reply(False, GREEDY)  # the penalty bites here
    assert reply(True, penalty) == reply(False, penalty)


@pytest.mark.parametrize("max_tokens", [1, 3])
def test_a_reply_that_ends_on_its_first_token_leaves_it_in_the_cache(max_tokens, tok):
    """The first token from kept logits is fed into the cache even when the reply ends on it
    (EOS, or a one-token limit): ids and K/V agree at rest."""
    _, lm = tiny_model("llama", tok)
    a = with_history(lm)
    drafts.prepare(lm.model, lm.tokenizer, a, SHORT, context_limit=4096)
    n, logits = a.draft_logits
    eos = lm.tokenizer.eos_token_id
    a.draft_logits = (n, mx.where(mx.arange(logits.shape[0]) == eos, 1e4, logits))
    r = run_turn(lm.model, lm.tokenizer, a, SHORT, TurnParams(max_tokens=max_tokens),
                 context_limit=4096, turn_id=2, emit=lambda e: None, cancel=threading.Event(),
                 source="new")
    assert r.generated_ids == (eos,) and r.prefilled == 0
    at_rest(lm, a)


def test_kept_logits_are_used_only_for_the_prompt_they_follow(tok):
    _, lm = tiny_model("llama", tok)
    plain = with_history(lm)
    r_plain = turn(lm, plain, SHORT + " Now")
    a = with_history(lm)
    drafts.prepare(lm.model, lm.tokenizer, a, SHORT, context_limit=4096)
    r = turn(lm, a, SHORT + " Now")  # typed on after the pause
    assert r.prefilled > 0 and r.generated_ids == r_plain.generated_ids
    at_rest(lm, a)


def test_no_draft_into_a_sliding_layer_it_would_fill(tok):
    _, lm = tiny_model("gemma3_text", tok)
    a = agent()
    a.cache = kvcache.new_cache(lm.model)
    words = " ".join(["retry"] * WINDOW)
    assert drafts.prepare(lm.model, lm.tokenizer, a, words + " and", context_limit=4096) == 0
    assert a.cache_ids == [] and not a.draft


def test_a_cancelled_draft_keeps_ids_and_kv_in_agreement(tok, monkeypatch):
    """A job arriving mid-draft stops it after the chunk in flight; the turn then reuses it."""
    _, lm = tiny_model("llama", tok)
    a = with_history(lm)
    cancel = threading.Event()
    monkeypatch.setattr(drafts, "DRAFT_CHUNK", 4)

    def stop_after_first_chunk(model, ag, ids, **kw):
        return prefill(model, ag, ids, progress=lambda done, total: cancel.set(), **kw)

    monkeypatch.setattr(drafts, "prefill", stop_after_first_chunk)
    text = "the gateway retries every request twice before it gives up " * 3
    start = len(a.cache_ids)
    assert drafts.prepare(lm.model, lm.tokenizer, a, text, context_limit=4096,
                          cancel=cancel) == 4
    assert len(a.cache_ids) >= start  # (trimmed to the common prefix, then one chunk)
    assert kvcache.cache_offset(a.cache) == len(a.cache_ids) and a.draft
    r_plain = turn(lm, with_history(lm), text.strip())
    assert turn(lm, a, text.strip()).generated_ids == r_plain.generated_ids
    at_rest(lm, a)
