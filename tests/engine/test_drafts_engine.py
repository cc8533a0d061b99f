"""Prefill as you type, through the real Engine on tiny models (llama; gemma3 with sliding layers):
`Engine.prepare` prefills what was typed while the agent is idle; Enter then prefills only the
rest and the reply equals one without a draft; a draft never reaches a snapshot (save, shutdown,
eviction), and the reopened workspace restores exactly the transcript; a draft waits for every
other job and never runs while the agent's turn is queued."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from support.tiny_models import tiny_model

from permeant_tui.engine import kvcache
from permeant_tui.engine.errors import TurnCancelled
from permeant_tui.engine.events import Tokens
from permeant_tui.engine.generation import TurnParams
from permeant_tui.engine.worker import Engine

AGENT = "technical"
GREEDY = TurnParams(max_tokens=8)
HISTORY = "Our payment API returns 502 errors under load."
NEXT = "Which service should we look at first, the gateway or the database?"


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


def open_engine(folder: Path, lm, **kw) -> Engine:
    engine = Engine(folder, loaded=lm, eager_restore=False, on_event=lambda e: None, **kw)
    engine.start()
    engine.wait_ready(60)
    return engine


def agrees(engine: Engine, agent_id: str = AGENT) -> int:
    """On the worker (a `call` job, which drops any draft first): the KV ids equal the
    transcript's and the cache holds that many tokens. -> tokens."""

    def check(ctx):
        a = ctx.workspace.agent(agent_id)
        expected = a.expected_ids(ctx.model.tokenizer)
        if a.cache is not None:
            assert a.cache_ids == expected and not a.draft
            assert kvcache.cache_offset(a.cache) == len(expected)
        return len(expected)

    return engine.call(check).result(60)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_enter_after_typing_prefills_only_the_rest_and_answers_the_same(arch, tok, tmp_path):
    lm = tiny_model(arch, tok)[1]
    replies = {}
    for drafted in (False, True):
        engine = open_engine(tmp_path / f"ws-{drafted}", lm)
        try:
            engine.submit_future(AGENT, HISTORY, params=GREEDY)[1].result(120)
            if drafted:
                for cut in (12, 30, len(NEXT) - 4):  # typing: each pause sends the text so far
                    engine.prepare(AGENT, NEXT[:cut]).result(60)
                agent = engine._ws.agent(AGENT)  # the worker is idle: read, not raced
                assert agent.draft and len(agent.cache_ids) > len(
                    agent.expected_ids(lm.tokenizer))
            r = engine.submit_future(AGENT, NEXT, params=GREEDY)[1].result(120)
            replies[drafted] = r
            agrees(engine)
        finally:
            engine.shutdown()
    assert replies[True].generated_ids == replies[False].generated_ids
    assert replies[True].prefilled < replies[False].prefilled
    if arch == "llama":  # (gemma3's 64-token window stops the draft where trimming would end)
        assert replies[True].prefilled <= 12  # the last word and the chat template's tail


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_a_draft_never_reaches_a_snapshot(arch, tok, tmp_path):
    lm = tiny_model(arch, tok)[1]
    folder = tmp_path / "ws"
    engine = open_engine(folder, lm, autosave=False)
    try:
        engine.submit_future(AGENT, HISTORY, params=GREEDY)[1].result(120)
        typed = NEXT[:24]  # within the gemma3 model's 64-token window
        assert engine.prepare(AGENT, typed).result(60) > 0
        engine.save().result(60)  # the save job drops the draft first
        n = agrees(engine)
        assert engine.prepare(AGENT, typed).result(60) > 0  # typed again, then quit
    finally:
        engine.shutdown()
    engine = open_engine(folder, lm)
    try:
        report = engine.restore(AGENT).result(60)
        assert report.source == "snapshot" and report.tokens == n
        assert agrees(engine) == n
    finally:
        engine.shutdown()


def test_an_evicted_agent_keeps_no_draft(tok, tmp_path):
    """max_resident 1: typing to the business agent evicts the technical one, whose own
    draft is dropped before its snapshot is written."""
    lm = tiny_model("llama", tok)[1]
    engine = open_engine(tmp_path / "ws", lm, max_resident=1)
    try:
        engine.submit_future(AGENT, HISTORY, params=GREEDY)[1].result(120)
        assert engine.prepare(AGENT, NEXT).result(60) > 0
        assert engine.prepare("business", "What will it cost us").result(60) > 0
        tech = engine._ws.agent(AGENT)
        assert not tech.resident and not tech.draft
        assert engine.restore(AGENT).result(60).source == "snapshot"
        agrees(engine)
    finally:
        engine.shutdown()


def test_a_draft_waits_for_other_jobs_and_for_the_agents_own_turn(tok, tmp_path):
    lm = tiny_model("llama", tok)[1]
    engine = open_engine(tmp_path / "ws", lm)
    gate = threading.Event()
    try:
        held = engine.call(lambda ctx: gate.wait(60))
        draft = engine.prepare(AGENT, NEXT)
        again = engine.prepare(AGENT, NEXT + " And")  # the newest text, the same job
        assert again is draft
        turn = engine.submit_future(AGENT, HISTORY, params=GREEDY)[1]
        gate.set()
        held.result(60)
        assert draft.result(60) == 0  # a turn was queued behind it: the draft stood aside
        r = turn.result(120)
        assert r.cached == 0 or r.cached < len(r.user)  # nothing drafted into it
        assert engine.prepare(AGENT, NEXT).result(60) > 0  # idle again: it prefills
        agrees(engine)
    finally:
        gate.set()
        engine.shutdown()


def test_drafts_can_be_turned_off(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PERMEANT_DRAFTS", "0")
    lm = tiny_model("llama", tok)[1]
    engine = open_engine(tmp_path / "ws", lm)
    try:
        engine.submit_future(AGENT, HISTORY, params=GREEDY)[1].result(120)
        assert engine.prepare(AGENT, NEXT).result(60) == 0
        assert not engine._ws.agent(AGENT).draft
        assert engine.submit_future(AGENT, NEXT, params=GREEDY)[1].result(120).prefilled > 12
    finally:
        engine.shutdown()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("typed", ["Which service first? And", "Which service"],
                         ids=["unchanged", "typed-on"])
def test_a_turn_cancelled_at_its_first_token_after_a_draft_leaves_the_transcript(arch, typed,
                                                                               tok, tmp_path):
    """Enter on a drafted message (its first token from the kept logits, or after prefilling
    what changed), cancelled at the first token: ids and K/V agree with the transcript, and the
    same message sent again answers as in a workspace that never drafted."""
    lm = tiny_model(arch, tok)[1]
    engine_ref = {}

    def sink(event):
        if isinstance(event, Tokens) and engine_ref.get("armed"):
            engine_ref["armed"] = False
            engine_ref["engine"].cancel(AGENT)

    sent = "Which service first? And"
    replies = []
    for drafted in (True, False):
        engine = Engine(tmp_path / f"ws-{drafted}", loaded=lm, eager_restore=False,
                        on_event=sink)
        engine_ref["engine"] = engine
        engine.start()
        engine.wait_ready(60)
        try:
            engine.submit_future(AGENT, HISTORY, params=GREEDY)[1].result(120)
            if drafted:
                assert engine.prepare(AGENT, typed).result(60) > 0
                engine_ref["armed"] = True
                with pytest.raises(TurnCancelled):
                    engine.submit_future(AGENT, sent, params=GREEDY)[1].result(120)
                agrees(engine)
            replies.append(engine.submit_future(AGENT, sent, params=GREEDY)[1].result(120))
            agrees(engine)
        finally:
            engine.shutdown()
    assert replies[0].generated_ids == replies[1].generated_ids


def test_a_team_question_drafted_for_both_first_agents_is_answered_the_same(tok, tmp_path):
    """The team prompt drafts the question into technical and business (one draft does not drop
    the other's); the batched answers then prefill only the last token each and equal the
    answers of a workspace that never drafted."""
    lm = tiny_model("llama", tok)[1]
    question = "Should we cache the payment tokens?"
    answers = {}
    for drafted in (True, False):
        engine = open_engine(tmp_path / f"ws-{drafted}", lm)
        try:
            if drafted:
                for agent_id in ("technical", "business"):
                    assert engine.prepare(agent_id, question).result(60) > 0
                assert all(engine._ws.agent(a).draft for a in ("technical", "business"))
            out = engine.ask_team(question, max_tokens=6).result(300)
            answers[drafted] = out
            for agent_id in ("technical", "business", "coordinator"):
                agrees(engine, agent_id)
        finally:
            engine.shutdown()
    for agent_id in ("technical", "business"):
        assert answers[True][agent_id].prefilled == 1 < answers[False][agent_id].prefilled
        assert answers[True][agent_id].generated_ids == answers[False][agent_id].generated_ids
    assert (answers[True]["coordinator"].generated_ids
            == answers[False]["coordinator"].generated_ids)
