"""Per-agent incremental generation: prefix reuse, exactness against a fresh prefill, context
limits, cancellation, events, and the worker thread."""

import threading

import numpy as np
import pytest

from permeant_tui.engine import kvcache
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.errors import ContextExhausted, TurnCancelled
from permeant_tui.engine.events import PrefillProgress, Tokens, TurnDone, TurnQueued
from permeant_tui.engine.generation import TurnParams, prefill, run_turn
from permeant_tui.engine.worker import Engine


def _agent():
    return Agent("technical", "technical", "Technical",
                 "You are a technical expert specializing in API debugging and system architecture.")


def _turn(lm, agent, text, max_tokens=12, events=None, cancel=None, limit=None):
    return run_turn(lm.model, lm.tokenizer, agent, text, TurnParams(max_tokens=max_tokens),
                    context_limit=limit or lm.context_limit, turn_id=1,
                    emit=(events.append if events is not None else lambda e: None),
                    cancel=cancel or threading.Event(), source="memory")


def _next_logits(lm, agent, text):
    """Logits of the first reply token: cache holds the prompt minus its last token."""
    import mlx.core as mx

    prompt = agent.prompt_ids(lm.tokenizer, text)
    from permeant_tui.engine.generation import common_prefix, trim_to

    keep = min(common_prefix(agent.cache_ids, prompt), len(prompt) - 1)
    trim_to(agent, keep)
    prefill(lm.model, agent, prompt[keep:-1])
    logits = lm.model(mx.array([prompt[-1:]]), cache=agent.cache)
    return np.array(logits[0, -1].astype(mx.float32)), keep


@pytest.mark.parametrize("which", ["tiny_model", "real_model"])
def test_cached_turns_equal_fresh_reprefill(which, request):
    lm = request.getfixturevalue(which)
    cached = _agent()
    r1 = _turn(lm, cached, "We have a critical API bug affecting payment processing.")
    r2 = _turn(lm, cached, "What should we fix first?")
    # The second turn reused everything the first left in the cache, reply included.
    assert r2.cached == r1.in_cache and r2.prefilled < r2.cached
    assert cached.cache_ids == cached.expected_ids(lm.tokenizer)
    assert kvcache.cache_offset(cached.cache) == len(cached.cache_ids)

    fresh = _agent()
    fresh.turns = list(cached.turns)
    prefill(lm.model, fresh, fresh.expected_ids(lm.tokenizer))
    lc, kept = _next_logits(lm, cached, "And then?")
    lf, _ = _next_logits(lm, fresh, "And then?")
    assert kept == len(cached.expected_ids(lm.tokenizer))
    np.testing.assert_allclose(lc, lf, rtol=0, atol=1e-4)
    assert int(lc.argmax()) == int(lf.argmax())

    # And the next greedy replies are identical.
    a, b = _agent(), _agent()
    a.turns = list(cached.turns)
    b.turns = list(cached.turns)
    prefill(lm.model, a, a.expected_ids(lm.tokenizer))  # as if resumed
    ra = _turn(lm, a, "And then?")
    rb_agent = cached
    rb_agent.turns = list(cached.turns)
    rb = _turn(lm, rb_agent, "And then?")
    assert ra.generated_ids == rb.generated_ids
    assert r1.generated_ids and r2.generated_ids


def test_context_exhausted_is_checked_before_the_turn(tiny_model):
    agent = _agent()
    with pytest.raises(ContextExhausted) as err:
        _turn(tiny_model, agent, "hello " * 50, max_tokens=8, limit=40)
    assert "limit 40" in str(err.value) and err.value.limit == 40
    assert agent.turns == [] and agent.cache_ids == []


def test_cancel_between_tokens_records_nothing_and_keeps_cache_consistent(tiny_model):
    agent = _agent()
    _turn(tiny_model, agent, "first message", max_tokens=6)
    before = list(agent.turns)
    cancel = threading.Event()
    events = []

    def emit_and_cancel(ev):
        events.append(ev)
        if isinstance(ev, Tokens):
            cancel.set()

    with pytest.raises(TurnCancelled):
        run_turn(tiny_model.model, tiny_model.tokenizer, agent, "second " * 5,
                 TurnParams(max_tokens=200), context_limit=2048, turn_id=2,
                 emit=emit_and_cancel, cancel=cancel, source="memory")
    assert agent.turns == before
    assert agent.cache_ids == agent.expected_ids(tiny_model.tokenizer)
    assert kvcache.cache_offset(agent.cache) == len(agent.cache_ids)


def test_prefill_is_chunked_with_progress(tiny_model):
    agent = _agent()
    events = []
    _turn(tiny_model, agent, "word " * 1200, max_tokens=2, events=events)
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert len(progress) >= 2 and progress[-1].done < progress[-1].total
    assert all(a.done < b.done for a, b in zip(progress, progress[1:], strict=False))


def test_tokens_are_batched_not_per_token(tiny_model):
    agent = _agent()
    events = []
    r = _turn(tiny_model, agent, "tell me a story", max_tokens=60, events=events)
    batches = [e for e in events if isinstance(e, Tokens)]
    assert sum(len(b.ids) for b in batches) == len([t for t in r.generated_ids
                                                    if t not in tiny_model.tokenizer.eos_token_ids])
    assert "".join(b.text for b in batches) == r.reply.lstrip(" ")


def test_engine_worker_runs_turns_on_one_thread_and_emits_events(tiny_model, tmp_path):
    events = []
    engine = Engine(tmp_path / "ws", loaded=tiny_model, eager_restore=False,
                    on_event=events.append)
    engine.start()
    engine.wait_ready(30)
    tid, fut = engine.submit_future("business", "What is the ROI?", max_tokens=5)
    result = fut.result(60)
    team = engine.ask_team("Ship or wait?", max_tokens=4).result(120)
    engine.shutdown()
    assert result.agent == "business" and result.source == "new"
    kinds = [type(e).__name__ for e in events if getattr(e, "turn_id", None) == tid]
    assert kinds[0] == "TurnQueued" and kinds[-1] == "TurnDone" and "TurnStarted" in kinds
    done_order = [e.agent_id for e in events if isinstance(e, TurnDone)][1:]
    assert done_order == ["technical", "business", "coordinator"]
    assert "Technical expert's answer" in team["coordinator"].user
    assert team["technical"].reply in team["coordinator"].user
    assert any(isinstance(e, TurnQueued) and e.agent_id == "coordinator" for e in events)
    # Transcripts were made durable.
    assert (tmp_path / "ws" / "agents" / "coordinator" / "transcript.jsonl").exists()


def test_engine_cancel_queued_turn(tiny_model, tmp_path):
    engine = Engine(tmp_path / "ws", loaded=tiny_model, eager_restore=False)
    gate = threading.Event()
    engine.start()
    engine.wait_ready(30)
    engine.call(lambda ctx: gate.wait(30))  # keep the worker busy
    _, fut = engine.submit_future("technical", "hello", max_tokens=4)
    engine.cancel("technical")
    gate.set()
    with pytest.raises(TurnCancelled):
        fut.result(30)
    engine.shutdown()
    assert engine.agent("technical").turns == ()
