"""The agent settings dialog (issue 15): f8 opens it on the focused agent with its current
values; Save checks them with the engine's rules (a bad one is a line in the dialog) and the
engine saves them in the workspace; screenshots at 200x50 and 80x24."""

from __future__ import annotations

import asyncio

from support.pilot import (  # noqa: F401 (the fixtures are autouse)
    ScriptedEngine,
    close_engines,
    no_cursor_blink,
    settle,
    views,
    wait_until,
)
from textual.widgets import Input, Label

from permeant_tui.app import PermeantApp
from permeant_tui.screens.agent_settings import AgentSettingsScreen

SIZE = (160, 40)
LABEL = "~/.local/share/permeant/default"


async def set_field(pilot, app, field: str, text: str) -> None:
    box = app.screen.query_one(f"#{field}", Input)
    box.value = text
    await pilot.pause()


async def test_settings_dialog_saves_checked_values_in_the_workspace():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("f3")  # the business pane
        await pilot.press("f8")
        await pilot.pause()
        assert isinstance(app.screen, AgentSettingsScreen)
        assert app.screen.query_one("#temp", Input).value == "0.2"
        assert app.screen.query_one("#max_tokens", Input).value == ""
        await set_field(pilot, app, "top_p", "1.5")
        await pilot.click("#save")
        await pilot.pause()
        assert isinstance(app.screen, AgentSettingsScreen), "a bad value keeps the dialog open"
        assert "top_p must be above 0 and at most 1" in str(
            app.screen.query_one("#error", Label).render())
        await set_field(pilot, app, "top_p", "0.95")
        await set_field(pilot, app, "temp", "0.7")
        await set_field(pilot, app, "max_tokens", "512")
        await pilot.click("#save")
        await settle(pilot, engine)
        assert not isinstance(app.screen, AgentSettingsScreen)
        spec = engine.settings().agent("business")
        assert (spec.temp, spec.top_p, spec.max_tokens) == (0.7, 0.95, 512)
        assert engine.settings().agent("technical").temp == 0.2
        saved = (engine.folder / "workspace.json").read_text()
        assert '"temp": 0.7' in saved and '"max_tokens": 512' in saved
        assert app.focused is app.workspace.pane("business").input


async def test_escape_closes_the_dialog_without_changes():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("f8")
        await pilot.pause()
        await set_field(pilot, app, "temp", "1.0")
        await pilot.press("escape")
        await settle(pilot, engine)
        assert not isinstance(app.screen, AgentSettingsScreen)
        assert engine.settings().agent("technical").temp == 0.2
        assert engine.calls.cancels == []  # escape closed the dialog, it cancelled no turn


def _dialog(engine):
    async def run_before(pilot) -> None:
        await settle(pilot, engine)
        await pilot.press("f8")
        await settle(pilot, engine)
        await asyncio.sleep(0.3)
        await pilot.pause()

    return run_before


def test_settings_dialog_large(snap_compare):
    engine = ScriptedEngine()
    assert snap_compare(PermeantApp(engine, LABEL), terminal_size=(200, 50),
                        run_before=_dialog(engine))


def test_settings_dialog_narrow(snap_compare):
    engine = ScriptedEngine()
    assert snap_compare(PermeantApp(engine, LABEL), terminal_size=(80, 24),
                        run_before=_dialog(engine))


def notes(app: PermeantApp) -> list[tuple[str, str, str]]:
    return [(n.title, n.message, n.severity) for n in app._notifications]


async def test_first_start_on_the_embedded_model_says_it_is_a_demonstration_model():
    from permeant_tui.engine.events import ModelReady

    for history, expected in ((0, True), (1, False)):
        engine = ScriptedEngine(views(history))
        app = PermeantApp(engine)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, engine)
            assert not [n for n in notes(app) if n[0] == "Demonstration model"]  # a fake model
            engine.emit(ModelReady("SmolLM2-135M-Instruct (Q4_1 GGUF)", "cpu", "OpenBLAS",
                                   "float32", 8192, 10.0))
            await settle(pilot, engine)
            shown = [m for t, m, _ in notes(app) if t == "Demonstration model"]
            assert bool(shown) is expected, (history, shown)
            if expected:
                assert "--model path/to/model.gguf" in shown[0]
