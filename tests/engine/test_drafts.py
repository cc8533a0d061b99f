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

from permeant_tui.engine import drafts, kvcache
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.generation import TurnParams, prefill, run_turn

ARCHS = ("llama", "qwen3", "gemma3_text")
HISTORY = "Our payment API returns 502 errors under load."
NEXT = "Which service should we look at first, the gateway or the database?"
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
    kvcache.rewind(cache, 1) if kvcache.can_rewind(cache, 1) else None
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
    assert drafts.prepare(lm.model, lm.tokenizer, a, NEXT, context_limit=4096) > 0
    assert len(a.cache_ids) > len(before)
    drafts.drop(lm.model, lm.tokenizer, a)
    assert a.cache_ids == before
    at_rest(lm, a)


def test_the_draft_stops_before_the_word_being_typed(tok):
    _, lm = tiny_model("llama", tok)
    a = with_history(lm)
    ids = drafts.stable_ids(a, lm.tokenizer, "Which service sho")
    full = a.prompt_ids(lm.tokenizer, "Which service should we look at")
    assert full[:len(ids)] == ids  # a prefix of what will be sent
    assert lm.tokenizer.decode(ids).endswith("Which service")
    # a typed draft only ever grows the prompt as it is sent: "Which service" is kept
    drafts.prepare(lm.model, lm.tokenizer, a, "Which service sho", context_limit=4096)
    assert a.cache_ids == ids


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
