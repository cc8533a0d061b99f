"""Continue and regenerate in the workspace (issue 15), with Pilot on the real Engine and the
scripted runner: ctrl+l extends the last reply in its own turn, f5 replaces it, a cancelled
regenerate keeps the old reply, and both are in the command palette and the help."""

from __future__ import annotations

from support.fake_runner import CONTINUED, REGENERATED
from support.pilot import (  # noqa: F401 (the fixtures are autouse)
    ScriptedEngine,
    close_engines,
    no_cursor_blink,
    reply_for,
    settle,
    wait_until,
)

from permeant_tui.app import PermeantApp
from permeant_tui.widgets.agent_pane import AgentPane
from permeant_tui.widgets.chat_turn import ChatTurn

SIZE = (160, 40)


def pane(app: PermeantApp, agent_id: str = "technical") -> AgentPane:
    found = app.workspace.pane(agent_id)
    assert found is not None
    return found


def notes(app: PermeantApp) -> list[tuple[str, str, str]]:
    return [(n.title, n.message, n.severity) for n in app._notifications]


async def send(pilot, text: str) -> None:
    for character in text:
        await pilot.press("space" if character == " " else character)
    await pilot.press("enter")


async def test_continue_extends_the_last_reply_in_place():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await send(pilot, "long answer please")
        await settle(pilot, engine)
        turns = list(pane(app).query(ChatTurn))
        assert len(turns) == 1 and "stopped: length" in str(turns[0]._note_view.render())
        assert pane(app).last_finish == "length"
        await pilot.press("ctrl+l")
        await settle(pilot, engine)
        turns = list(pane(app).query(ChatTurn))
        assert len(turns) == 1, "a continue streams into the same turn"
        first = reply_for("technical", "long answer please")
        assert turns[0].reply == first + CONTINUED
        assert engine.calls.continues == ["technical"]
        assert engine.agent("technical").turns[-1].reply == first + CONTINUED
        assert len(engine.agent("technical").turns) == 1


async def test_regenerate_replaces_the_reply_and_a_cancel_keeps_the_old_one():
    engine = ScriptedEngine(manual=True)
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await send(pilot, "hello")
        engine.release()
        await settle(pilot, engine)
        first = reply_for("technical", "hello")
        await pilot.press("f5")
        await settle(pilot, engine)  # held at the gate: the old reply is cleared while it runs
        turn = pane(app).query_one(ChatTurn)
        assert turn.reply == ""
        await pilot.press("escape")
        await settle(pilot, engine)
        assert turn.reply == first and "cancelled" in str(turn._note_view.render())
        assert engine.agent("technical").turns[-1].reply == first
        await pilot.press("f5")
        engine.release()
        await settle(pilot, engine)
        assert len(pane(app).query(ChatTurn)) == 1
        assert turn.reply == first + REGENERATED
        assert engine.agent("technical").turns[-1].reply == first + REGENERATED
        assert engine.calls.regenerates == ["technical", "technical"]


async def test_continue_with_nothing_to_continue_says_so_in_one_line():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert any("no reply to continue" in message for _, message, _ in notes(app))
        assert not pane(app).query(ChatTurn)


async def test_continue_and_regenerate_are_in_the_palette():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await send(pilot, "long answer")
        await settle(pilot, engine)
        await pilot.press("ctrl+p")
        await pilot.pause()
        for character in "continue":
            await pilot.press(character)
        await pilot.pause(0.3)
        await pilot.press("enter")
        await settle(pilot, engine)
        assert engine.calls.continues == ["technical"]


async def test_continue_waits_for_the_turn_in_flight():
    engine = ScriptedEngine(manual=True)
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await send(pilot, "hello")
        await settle(pilot, engine)  # held at the gate
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert engine.calls.continues == []
        assert any("Wait for the turn in flight" in message for _, message, _ in notes(app))
        engine.release()
        await settle(pilot, engine)
