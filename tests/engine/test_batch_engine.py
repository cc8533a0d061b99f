"""The engine's worker batches turns of different agents queued together (the team's two first
answers, or two agents asked at the same time), and the outcome is the sequential one: the same
replies, transcripts and snapshots; a cancel hits only its own agent."""

from __future__ import annotations

import threading

import pytest
from support.fake_runner import FakeRunner

from permeant_tui.engine.errors import TurnCancelled
from permeant_tui.engine.events import Tokens
from permeant_tui.engine.worker import Engine


def team(tiny_model, folder, q="Ship now or wait a week?", batch=True):
    engine = Engine(folder, loaded=tiny_model, eager_restore=False, batch=batch)
    engine.start()
    engine.wait_ready(30)
    out = engine.ask_team(q, max_tokens=12).result(300)
    engine.shutdown()
    return out


def test_team_batched_equals_sequential(tiny_model, tmp_path):
    batched = team(tiny_model, tmp_path / "a")
    assert batched["technical"].timing_ms.get("batched") == 1.0
    assert batched["business"].timing_ms.get("batched") == 1.0
    assert "batched" not in batched["coordinator"].timing_ms  # it waits for both answers
    sequential = team(tiny_model, tmp_path / "b", batch=False)
    assert "batched" not in sequential["technical"].timing_ms
    for agent in ("technical", "business", "coordinator"):
        assert batched[agent].generated_ids == sequential[agent].generated_ids, agent
    # the next start resumes every agent from its snapshot, with ids equal to its transcript
    engine = Engine(tmp_path / "a", loaded=tiny_model, eager_restore=False)
    engine.start()
    engine.wait_ready(30)
    for agent in ("technical", "business"):
        report = engine.restore(agent).result(60)
        assert report.source == "snapshot", report

        def check(ctx, agent=agent):
            a = ctx.workspace.agent(agent)
            return a.cache_ids == a.expected_ids(ctx.model.tokenizer)

        assert engine.call(check).result(60)
    engine.shutdown()


def busy_engine(tmp_path, runner):
    engine = Engine(tmp_path / "ws", runner=runner, eager_restore=False)
    engine.start()
    engine.wait_ready(30)
    gate = threading.Event()
    engine.call(lambda ctx: gate.wait(30))  # the worker is busy while turns queue up
    return engine, gate


def test_turns_queued_together_are_grouped(tmp_path):
    runner = FakeRunner(batch=3)
    engine, gate = busy_engine(tmp_path, runner)
    f1 = engine.submit_future("technical", "one")[1]
    f2 = engine.submit_future("business", "two")[1]
    f3 = engine.submit_future("technical", "three")[1]  # same agent: waits for its first turn
    gate.set()
    for f in (f1, f2, f3):
        f.result(30)
    engine.shutdown()
    assert runner.batches == [("technical", "business")]
    assert [a for a, _ in runner.turns] == ["technical", "business", "technical"]


def test_cancelled_queued_turn_is_not_grouped(tmp_path):
    runner = FakeRunner(batch=3)
    engine, gate = busy_engine(tmp_path, runner)
    f1 = engine.submit_future("technical", "one")[1]
    f2 = engine.submit_future("business", "two")[1]
    engine.cancel("technical")
    gate.set()
    with pytest.raises(TurnCancelled):
        f1.result(30)
    f2.result(30)
    engine.shutdown()
    assert runner.batches == []
    assert [a for a, _ in runner.turns] == ["business"]


def test_no_grouping_when_the_runner_cannot_batch(tmp_path):
    runner = FakeRunner(batch=1)
    engine, gate = busy_engine(tmp_path, runner)
    futures = [engine.submit_future(a, "q")[1] for a in ("technical", "business")]
    gate.set()
    for f in futures:
        f.result(30)
    engine.shutdown()
    assert runner.batches == []


@pytest.mark.parametrize("history", [True, False], ids=["with-history", "first-turn"])
def test_cancel_one_agent_mid_batch_then_save_quit_resume(tiny_model, tmp_path, history):
    folder = tmp_path / "ws"
    seen = threading.Event()
    engine = None

    def sink(ev):
        if isinstance(ev, Tokens) and ev.agent_id == "technical" and not seen.is_set():
            seen.set()
            engine.cancel("technical")

    engine = Engine(folder, loaded=tiny_model, eager_restore=False, on_event=sink)
    engine.start()
    engine.wait_ready(30)
    if history:
        seen.set()  # no cancel during this turn
        engine.submit_future("technical", "Hello.", max_tokens=6)[1].result(120)
        seen.clear()
    before = len(engine.agent("technical").turns)
    gate = threading.Event()
    engine.call(lambda ctx: gate.wait(30))
    f_tech = engine.submit_future("technical", "Explain the outage.", max_tokens=40)[1]
    f_biz = engine.submit_future("business", "What does it cost?", max_tokens=12)[1]
    gate.set()
    with pytest.raises(TurnCancelled):
        f_tech.result(120)
    biz = f_biz.result(120)
    assert biz.timing_ms.get("batched") == 1.0
    assert len(engine.agent("technical").turns) == before
    engine.save().result(60)
    engine.shutdown(timeout=30)
    engine = Engine(folder, loaded=tiny_model, eager_restore=False)
    engine.start()
    engine.wait_ready(30)
    assert len(engine.agent("business").turns) == 1
    r = engine.submit_future("technical", "Explain the outage.", max_tokens=6)[1].result(120)
    assert r.generated > 0

    def agree(ctx):
        return {a: ctx.workspace.agent(a).cache_ids
                == ctx.workspace.agent(a).expected_ids(ctx.model.tokenizer)
                for a in ("technical", "business") if ctx.workspace.agent(a).resident}

    assert all(engine.call(agree).result(60).values())
    engine.shutdown()
