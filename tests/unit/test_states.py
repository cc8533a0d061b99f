"""Each agent's turn state: the machine's rules (engine/states.py) and the states the real Engine
ships in AgentStats.state through a turn, on the scripted model runner (no model needed)."""

from __future__ import annotations

import time

import pytest
from support.fake_runner import FakeRunner

from permeant_tui.engine.errors import TurnCancelled
from permeant_tui.engine.events import Event, TurnDone
from permeant_tui.engine.states import TRANSITIONS, AgentStates, BadTransition
from permeant_tui.engine.worker import Engine


def test_a_turn_goes_queued_prefilling_generating_done():
    s = AgentStates(["a"])
    assert s["a"] == "loading"
    s.model_ready()
    seen = [s["a"]]
    for step in (lambda: s.submitted("a"), lambda: s.started("a"), lambda: s.generating("a"),
                 lambda: s.finished("a", "done")):
        step()
        seen.append(s["a"])
    assert seen == ["idle", "queued", "prefilling", "generating", "done"]


def test_a_second_turn_keeps_the_agent_busy():
    s = AgentStates(["a"])
    s.model_ready()
    s.submitted("a")
    s.started("a")
    s.submitted("a")  # while the first one runs
    assert s["a"] == "prefilling"
    s.finished("a", "done")
    assert s["a"] == "queued"  # the second one waits
    s.finished("a", "cancelled", started=False)  # dropped before it started
    assert s["a"] == "cancelled"


def test_model_failure_and_reset():
    s = AgentStates(["a", "b"])
    s.model_failed()
    assert s["a"] == s["b"] == "unavailable"
    s.submitted("a")
    s.finished("a", "failed", started=False)
    assert s["a"] == "failed"
    s.reset("a")
    assert s["a"] == "idle"
    assert s["new-agent"] == "unavailable"  # added later: the model state applies


def test_transitions_not_in_the_table_are_refused():
    s = AgentStates(["a"])
    with pytest.raises(BadTransition):
        s.started("a")  # loading -> prefilling
    assert all(target in TRANSITIONS for targets in TRANSITIONS.values() for target in targets)


def test_engine_ships_the_states_of_a_turn(tmp_path):
    """The real Engine (queue, worker, states) on the scripted runner: AgentStats.state is
    queued while a held turn waits, done after it, and a cancelled held turn is cancelled."""
    runner = FakeRunner(manual=True)
    events: list[Event] = []
    engine = Engine(tmp_path / "ws", runner=runner, on_event=events.append)
    states = lambda: {a.agent_id: a.state for a in engine.stats().agents}  # noqa: E731
    assert set(states().values()) == {"loading"}
    engine.start()
    try:
        engine.wait_ready(10)
        engine.call(lambda ctx: None).result(10)
        assert set(states().values()) == {"idle"}

        _, done = engine.submit_future("technical", "first")
        _, held = engine.submit_future("business", "second")
        while not runner.blocked:  # the first turn waits at the runner's gate
            time.sleep(0.005)
        assert states()["technical"] == "prefilling" and states()["business"] == "queued"
        runner.release()
        done.result(10)
        while not runner.blocked:
            time.sleep(0.005)
        engine.cancel("business")  # held at the gate, then cancelled
        with pytest.raises(TurnCancelled):
            held.result(10)
        engine.call(lambda ctx: None).result(10)
        assert states() == {"technical": "done", "business": "cancelled", "coordinator": "idle"}
        assert [e.agent_id for e in events if isinstance(e, TurnDone)] == ["technical"]
        assert runner.turns == [("technical", "first"), ("business", "second")]
    finally:
        runner.close()
        engine.shutdown(timeout=10)
