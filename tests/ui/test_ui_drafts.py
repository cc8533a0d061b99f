"""Prefill as you type, from the UI: a pause in typing sends the text so far to the engine
(`engine.prepare`), once per pause and only while the agent is idle; Enter still sends the
whole message. Pilot against the real Engine on a scripted runner (tests/support)."""

from __future__ import annotations

from support.pilot import (  # noqa: F401 (the fixtures are autouse)
    ScriptedEngine,
    close_engines,
    fake_migrations,
    no_cursor_blink,
    settle,
    wait_until,
)

from permeant_tui.app import PermeantApp
from permeant_tui.widgets import message_input
from permeant_tui.widgets.message_input import PAUSE_SECONDS

SIZE = (160, 40)


async def type_text(pilot, text: str) -> None:
    for character in text:
        await pilot.press("space" if character == " " else character)


async def test_a_pause_in_typing_prefills_the_text_so_far(monkeypatch):
    # Keys must come faster than the pause: on a loaded machine Pilot's key presses were once
    # 0.4 s apart (a real pause, and a draft of "which s"), so this test waits 1.5 s for one.
    pause = 1.5
    monkeypatch.setattr(message_input, "PAUSE_SECONDS", pause)
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await type_text(pilot, "which service")
        assert engine.calls.drafts == []  # still typing (keys come faster than the pause)
        await pilot.pause(pause + 0.3)
        assert engine.calls.drafts == [("technical", "which service")]
        await wait_until(pilot, lambda: ("technical", "which service") in engine.runner.drafts)
        await type_text(pilot, " first")
        await pilot.pause(pause + 0.3)
        assert engine.calls.drafts[-1] == ("technical", "which service first")
        await pilot.press("enter")
        assert engine.calls.submits == [("technical", "which service first")]
        await pilot.pause(pause + 0.3)
        assert len(engine.calls.drafts) == 2  # the cleared box sends nothing


async def test_no_draft_while_the_agent_is_busy_or_for_blank_text():
    engine = ScriptedEngine(manual=True)
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await type_text(pilot, "   ")
        await pilot.pause(PAUSE_SECONDS + 0.3)
        assert engine.calls.drafts == []
        await type_text(pilot, "first question")
        await pilot.press("enter")
        technical = app.workspace.pane("technical")
        assert technical is not None
        await wait_until(pilot, lambda: technical.busy)
        drafts_before = list(engine.calls.drafts)
        await type_text(pilot, "the next one")
        await pilot.pause(PAUSE_SECONDS + 0.3)
        assert engine.calls.drafts == drafts_before  # the reply is still coming
        engine.release()
        await wait_until(pilot, lambda: technical.state == "done")
        await type_text(pilot, " please")
        await pilot.pause(PAUSE_SECONDS + 0.3)
        assert engine.calls.drafts[-1] == ("technical", "the next one please")


async def test_a_pause_in_the_team_question_drafts_it_for_technical_and_business():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("ctrl+t")
        await type_text(pilot, "ship it")
        await pilot.pause(PAUSE_SECONDS + 0.3)
        assert sorted(engine.calls.drafts) == [("business", "ship it"), ("technical", "ship it")]
        await pilot.press("enter")
        await pilot.pause(PAUSE_SECONDS + 0.3)
        assert len(engine.calls.drafts) == 2 and engine.calls.asks == ["ship it"]
