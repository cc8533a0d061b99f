"""Gauges follow a reply while it streams (issue 15): the context count and tok/s move with the
Tokens events, not only when the turn ends; the engine's own figures take over afterwards."""

from __future__ import annotations

import sys

from support.pilot import (  # noqa: F401 (the fixtures are autouse)
    ScriptedEngine,
    close_engines,
    no_cursor_blink,
    settle,
    views,
)
from textual.widgets import ProgressBar

from permeant_tui.app import PermeantApp
from permeant_tui.engine.events import Tokens, TurnCancelled, TurnQueued, TurnStarted
from permeant_tui.screens.workspace import GIL_SWITCH_SECONDS
from permeant_tui.widgets import agent_pane
from permeant_tui.widgets.agent_pane import LIVE_GAUGE_SECONDS, LiveFigures
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
        await pilot.pause(LIVE_GAUGE_SECONDS)  # they follow the stream at this cadence
        engine.emit(Tokens("technical", 41, " keep it", (102, 103, 104, 105)))
        await settle(pilot, engine)
        assert gauge_text(app, "technical", "context-count").startswith("2,065/")
        assert gauge_text(app, "technical", "speed-value") not in ("–", "18.9")  # live speed
        # the stats timer's samples (the engine's figures before the turn) do not undo it
        app._sample_stats()
        await pilot.pause()
        assert gauge_text(app, "technical", "context-count").startswith("2,065/")


async def test_no_cursor_blinks_while_a_reply_streams():
    """Each blink repaints the screen; while any agent streams every input holds a steady
    cursor, and gets its own setting back when the last reply ends."""
    engine = ScriptedEngine(views(1))
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        screen = app.workspace
        inputs = [pane.input for pane in screen.panes] + [screen.team_prompt.input]
        for widget in inputs[:2]:
            widget.cursor_blink = True  # the fixture turned them all off; two are on here
        blinks = [widget.cursor_blink for widget in inputs]
        for agent_id, turn_id in (("technical", 41), ("business", 42)):
            engine.emit(TurnQueued(agent_id, turn_id, "question"))
            engine.emit(TurnStarted(agent_id, turn_id, "snapshot", 10, 2, "question"))
        engine.emit(Tokens("technical", 41, "We", (101,)))
        await settle(pilot, engine)
        assert not any(widget.cursor_blink for widget in inputs)
        engine.emit(TurnCancelled("technical", 41))
        await settle(pilot, engine)
        assert not any(widget.cursor_blink for widget in inputs)  # business still streams
        engine.emit(TurnCancelled("business", 42))
        await settle(pilot, engine)
        assert [widget.cursor_blink for widget in inputs] == blinks


def test_live_figures():
    live = LiveFigures(100)
    live.prefilled = 20
    assert live.tok_s == 0.0
    live.generated(1, 10.0)
    assert (live.tokens_out, live.tok_s) == (1, 0.0)  # one token says nothing about speed
    live.generated(10, 11.0)
    assert live.tok_s == 10.0 and live.cached + live.prefilled + live.tokens_out == 131


async def test_the_workspace_hands_the_gil_back_within_a_millisecond():
    """The decode thread waits for the GIL each time the UI has it: while the workspace is up
    the switch interval is GIL_SWITCH_SECONDS, and the process's own comes back after."""
    before = sys.getswitchinterval()
    assert before != GIL_SWITCH_SECONDS
    engine = ScriptedEngine(views(1))
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        assert sys.getswitchinterval() == GIL_SWITCH_SECONDS
    assert sys.getswitchinterval() == before


async def test_the_gauges_repaint_with_the_text_at_most_every_live_gauge_seconds(monkeypatch):
    """A frame that repaints the gauges costs several times one that repaints the text: while a
    reply streams they change only when its text is shown, at most every LIVE_GAUGE_SECONDS,
    and the stats timer does not add frames of its own in between. The cadence runs on a
    clock the test moves (on a loaded machine, real seconds passed between the steps once made
    the timer's 2 s rule fire)."""
    now = [1000.0]
    monkeypatch.setattr(agent_pane, "clock", lambda: now[0])
    engine = ScriptedEngine(views(1))
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        engine.emit(TurnQueued("technical", 41, "How do we cache the KV state?"))
        engine.emit(TurnStarted("technical", 41, "snapshot", 2048, 12,
                                "How do we cache the KV state?"))
        engine.emit(Tokens("technical", 41, "We", (101,)))
        await settle(pilot, engine)
        assert gauge_text(app, "technical", "context-count").startswith("2,061/")  # at once
        engine.emit(Tokens("technical", 41, " keep it", (102, 103, 104, 105)))
        await settle(pilot, engine)
        await pilot.pause(0.3)  # the text is shown (FLUSH_SECONDS), the gauges wait
        pane = app.workspace.pane("technical")
        assert pane is not None and "We keep it" in str(pane.query(".live").last().render())
        assert gauge_text(app, "technical", "context-count").startswith("2,061/")
        now[0] += LIVE_GAUGE_SECONDS  # a second without text: the stats timer leaves them
        app._sample_stats()
        await pilot.pause()
        assert gauge_text(app, "technical", "context-count").startswith("2,061/")
        engine.emit(Tokens("technical", 41, " on disk", (106, 107)))  # text: they follow
        await settle(pilot, engine)
        await pilot.pause(0.3)
        assert gauge_text(app, "technical", "context-count").startswith("2,067/")
        engine.emit(Tokens("technical", 41, " and", (108,)))  # text within the second: not
        await settle(pilot, engine)
        await pilot.pause(0.3)
        assert "on disk and" in str(pane.query(".live").last().render())
        assert gauge_text(app, "technical", "context-count").startswith("2,067/")
        now[0] += 2 * LIVE_GAUGE_SECONDS  # no text for two seconds (a long prefill): the timer
        app._sample_stats()
        await pilot.pause()
        assert gauge_text(app, "technical", "context-count").startswith("2,068/")


async def test_the_context_bar_does_not_repaint_itself_every_second():
    """Textual's ProgressBar updates itself every second for an ETA the gauges never show: in a
    streaming pane, one more repaint of the screen a second."""
    engine = ScriptedEngine(views(1))
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        pane = app.workspace.pane("technical")
        assert pane is not None
        bar = pane.query_one(AgentGauges).query_one("#context", ProgressBar)
        refreshes = []
        real = bar.refresh

        def counted(*args, **kwargs):
            refreshes.append(args)
            return real(*args, **kwargs)

        bar.refresh = counted  # type: ignore[method-assign]
        bar.update(total=1000, progress=100)  # at this pace an ETA would count down each second
        await pilot.pause(1.1)  # Textual's ETA wants samples a second apart
        bar.update(progress=104)
        await pilot.pause()
        before = len(refreshes)
        assert before > 0  # it moves when told
        await pilot.pause(2.2)
        assert len(refreshes) == before
