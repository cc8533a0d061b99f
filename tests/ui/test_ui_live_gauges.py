"""Gauges follow a reply while it streams (issue 15): the context count and tok/s move with the
Tokens events, not only when the turn ends; the engine's own figures take over afterwards."""

from __future__ import annotations

from support.pilot import (  # noqa: F401 (the fixtures are autouse)
    ScriptedEngine,
    close_engines,
    no_cursor_blink,
    settle,
    views,
)

from permeant_tui.app import PermeantApp
from permeant_tui.engine.events import Tokens, TurnQueued, TurnStarted
from permeant_tui.widgets.agent_pane import LiveFigures
from permeant_tui.widgets.gauges import AgentGauges

SIZE = (160, 40)


def gauge_text(app: PermeantApp, agent_id: str, widget_id: str) -> str:
    pane = app.workspace.pane(agent_id)
    assert pane is not None
    return str(pane.query_one(AgentGauges).query_one(f"#{widget_id}").render())


async def test_context_and_speed_update_while_the_reply_streams():
    engine = ScriptedEngine(views(1))
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        before = gauge_text(app, "technical", "context-count")
        engine.emit(TurnQueued("technical", 41, "How do we cache the KV state?"))
        engine.emit(TurnStarted("technical", 41, "snapshot", 2048, 12,
                                "How do we cache the KV state?"))
        engine.emit(Tokens("technical", 41, "We", (101,)))
        await settle(pilot, engine)
        assert gauge_text(app, "technical", "context-count").startswith("2,061/"), before
        engine.emit(Tokens("technical", 41, " keep it", (102, 103, 104, 105)))
        await settle(pilot, engine)
        assert gauge_text(app, "technical", "context-count").startswith("2,065/")
        assert gauge_text(app, "technical", "speed-value") not in ("–", "18.9")  # live speed
        # the stats timer's samples (the engine's figures before the turn) do not undo it
        app._sample_stats()
        await pilot.pause()
        assert gauge_text(app, "technical", "context-count").startswith("2,065/")


def test_live_figures():
    live = LiveFigures(100)
    live.prefilled = 20
    assert live.tok_s == 0.0
    live.generated(1, 10.0)
    assert (live.tokens_out, live.tok_s) == (1, 0.0)  # one token says nothing about speed
    live.generated(10, 11.0)
    assert live.tok_s == 10.0 and live.cached + live.prefilled + live.tokens_out == 131
