"""Screenshots (SVG) of the workspace at fixed terminal sizes (pytest-textual-snapshot).

Deterministic: the real Engine runs on a scripted model runner with fixed figures
(tests/support), events are emitted and handled before the screenshot, and the cursor does not
blink. Regenerate with `--snapshot-update`, then look at
the SVGs in tests/ui/__snapshots__/.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from support.pilot import (  # noqa: F401 (the fixtures are autouse)
    ScriptedEngine,
    close_engines,
    no_cursor_blink,
    settle,
    views,
    with_stats,
)

from permeant_tui.app import PermeantApp
from permeant_tui.engine.events import (
    AgentRestored,
    PrefillProgress,
    Tokens,
    TurnQueued,
    TurnStarted,
)
from permeant_tui.preferences import Preferences
from permeant_tui.widgets import chat_turn

WIDE = (150, 36)
LARGE = (200, 50)
NARROW = (80, 24)
LABEL = "~/.local/share/permeant/default"


def resumed_engine(**options) -> ScriptedEngine:
    return ScriptedEngine(views(3), restored=[
        AgentRestored("technical", "snapshot", 14.2, 2048),
        AgentRestored("business", "snapshot", 9.8, 1536),
        AgentRestored("coordinator", "prefill", 3100.0, 0,
                      reason="snapshot made by another model"),
    ], **options)


def settled(engine: ScriptedEngine, then=None):
    async def run_before(pilot) -> None:
        await settle(pilot, engine)
        if then is not None:
            await then(pilot)
            await settle(pilot, engine)
        await asyncio.sleep(0.3)  # streamed text is shown every FLUSH_SECONDS (0.2 s)
        await pilot.pause()

    return run_before


def test_fresh_workspace(snap_compare):
    engine = ScriptedEngine()
    assert snap_compare(PermeantApp(engine, LABEL), terminal_size=WIDE,
                        run_before=settled(engine))


def test_resumed_workspace(snap_compare):
    engine = resumed_engine()
    assert snap_compare(PermeantApp(engine, LABEL), terminal_size=WIDE,
                        run_before=settled(engine))


def test_mid_stream(snap_compare, monkeypatch):
    # Mid-stream the reply is plain text; its finished blocks would move into the Markdown after
    # MARKDOWN_SECONDS, which a loaded CI machine reached before the screenshot (a flaky frame).
    monkeypatch.setattr(chat_turn, "MARKDOWN_SECONDS", 0)
    engine = ScriptedEngine(views(3))

    async def streaming(pilot) -> None:
        engine.emit(TurnQueued("technical", 41, "How do we cache the KV state?"))
        engine.emit(TurnQueued("business", 42, "What does it cost?"))
        engine.emit(TurnStarted("technical", 41, "snapshot", 2048, 12,
                                "How do we cache the KV state?"))
        engine.emit(PrefillProgress("technical", 41, 12, 12))
        for text in ("Keep one **safetensors** snapshot", " per agent and write it\n\n",
                     "1. atomically (temp file,", " fsync, rename)\n2. after"):
            engine.emit(Tokens("technical", 41, text, ()))
        engine.emit(TurnStarted("coordinator", 43, "snapshot", 900, 300, "brief"))
        engine.emit(PrefillProgress("coordinator", 43, 120, 300))
        # what the worker's state machine says at this moment (the runner cannot hold three)
        for agent_id, state in (("technical", "generating"), ("business", "queued"),
                                ("coordinator", "prefilling")):
            with_stats(engine, agent_id, state=state)

    assert snap_compare(PermeantApp(engine, LABEL), terminal_size=WIDE,
                        run_before=settled(engine, streaming))


def test_export_notification(snap_compare):
    engine = ScriptedEngine(views(1))

    async def export(pilot) -> None:
        await pilot.press("ctrl+e")

    assert snap_compare(PermeantApp(engine, LABEL), terminal_size=WIDE,
                        run_before=settled(engine, export))


def test_reset_confirmation(snap_compare):
    engine = ScriptedEngine(views(1))

    async def reset(pilot) -> None:
        await pilot.press("f3", "ctrl+r")

    assert snap_compare(PermeantApp(engine, LABEL), terminal_size=WIDE,
                        run_before=settled(engine, reset))


def test_narrow_80_columns(snap_compare):
    engine = resumed_engine()

    async def business(pilot) -> None:
        await pilot.press("f3")

    assert snap_compare(PermeantApp(engine, LABEL), terminal_size=NARROW,
                        run_before=settled(engine, business))


def test_narrow_fresh_footer(snap_compare):
    """80x24: the compact footer shows reset, cancel, export, quit, help, panes and palette."""
    engine = ScriptedEngine()
    assert snap_compare(PermeantApp(engine, LABEL), terminal_size=NARROW,
                        run_before=settled(engine))


# The help names the config file: a fixed path, whoever runs the tests.
PREFERENCES = Preferences(path=Path("~/.config/permeant/config.toml"))


def help_screen(size):
    engine = ScriptedEngine(views(1))

    async def press_f1(pilot) -> None:
        await pilot.press("f1")

    return PermeantApp(engine, LABEL, preferences=PREFERENCES), settled(engine, press_f1), size


def test_help_large(snap_compare):
    app, run_before, size = help_screen(LARGE)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_help_narrow(snap_compare):
    app, run_before, size = help_screen(NARROW)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


def history_search(size):
    engine = ScriptedEngine(views(12))

    async def search(pilot) -> None:
        await pilot.press("ctrl+f")
        await pilot.pause()
        for key in "answer 1":
            await pilot.press("space" if key == " " else key)
        await asyncio.sleep(0.5)  # the palette searches in a worker
        await pilot.pause()

    return PermeantApp(engine, LABEL), settled(engine, search), size


def test_history_search_large(snap_compare):
    app, run_before, size = history_search(LARGE)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_history_search_narrow(snap_compare):
    app, run_before, size = history_search(NARROW)
    assert snap_compare(app, terminal_size=size, run_before=run_before)
