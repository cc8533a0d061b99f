"""The workspace UI driven with Pilot against the real Engine on a scripted model runner (no
model; tests/support)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

from support.pilot import (  # noqa: F401 (the fixtures are autouse)
    DIGEST,
    ScriptedEngine,
    close_engines,
    fake_migrations,
    no_cursor_blink,
    reply_for,
    settle,
    views,
    wait_until,
    with_stats,
)
from textual.widgets import Button, Label, Markdown

from permeant_tui.app import EngineEvent, PermeantApp
from permeant_tui.engine.events import (
    AgentRestored,
    ModelFailed,
    ModelLoading,
    ModelReady,
    Notice,
    PrefillProgress,
    Tokens,
    TurnQueued,
    TurnStarted,
)
from permeant_tui.screens.confirm import ConfirmScreen
from permeant_tui.widgets import status_bar
from permeant_tui.widgets.agent_pane import FIRST_PAINT_TURNS, AgentPane
from permeant_tui.widgets.chat_turn import ChatTurn

SIZE = (160, 40)


def notes(app: PermeantApp) -> list[tuple[str, str, str]]:
    """(title, message, severity) of every notification shown so far."""
    return [(n.title, n.message, n.severity) for n in app._notifications]


def pane(app: PermeantApp, agent_id: str) -> AgentPane:
    found = app.workspace.pane(agent_id)
    assert found is not None
    return found


async def send(pilot, text: str) -> None:
    for character in text:
        await pilot.press("space" if character == " " else character)
    await pilot.press("enter")


async def test_focus_starts_on_technical_input():
    engine = ScriptedEngine()
    app = PermeantApp(engine, "/tmp/ws")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        assert app.focused is pane(app, "technical").input
        assert engine.calls.started == 1


async def test_function_keys_and_tab_move_between_panes():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("f3")
        await pilot.pause()
        assert app.focused is pane(app, "business").input
        assert app.workspace.active_agent == "business"
        await pilot.press("tab")
        await pilot.pause()
        assert app.focused is pane(app, "coordinator").input
        await pilot.press("tab")
        await pilot.pause()
        assert app.focused is app.workspace.team_prompt.input
        await pilot.press("tab")
        await pilot.pause()
        assert app.focused is pane(app, "technical").input
        await pilot.press("shift+tab")
        await pilot.pause()
        assert app.focused is app.workspace.team_prompt.input
        await pilot.press("f4")
        await pilot.pause()
        assert app.focused is pane(app, "coordinator").input


async def test_sending_a_message_streams_the_reply(monkeypatch):
    full_updates: list[str] = []
    original_update = Markdown.update

    def spy_update(self, markdown: str):
        full_updates.append(markdown)
        return original_update(self, markdown)

    monkeypatch.setattr(Markdown, "update", spy_update)
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await send(pilot, "hello there")
        assert engine.calls.submits == [("technical", "hello there")]
        technical = pane(app, "technical")
        await wait_until(pilot, lambda: technical.state == "done")
        assert technical.input.text == ""
        turn = technical.query(ChatTurn).last()
        expected = reply_for("technical", "hello there")
        assert turn.reply == expected
        assert "first point" in str(turn.query_one(Markdown).source)
        # The reply came in several batches, shown as plain text while it streamed; the
        # Markdown was rendered once, whole, when the turn ended (tests/ui/test_ui_streaming.py).
        batches = [e for e in engine.events if isinstance(e, Tokens)]
        assert len(batches) > 2
        assert full_updates.count(expected) == 1
        assert "tok/s" in str(turn.query_one(".note", Label).content)


async def test_team_flow_runs_technical_and_business_before_coordinator():
    started: list[str] = []

    def hook(message) -> None:
        if isinstance(message, EngineEvent) and isinstance(message.event, TurnStarted):
            started.append(message.event.agent_id)

    engine = ScriptedEngine(manual=True)
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await settle(pilot, engine)
        await pilot.press("ctrl+t")
        await send(pilot, "launch plan")
        assert engine.calls.asks == ["launch plan"]
        await settle(pilot, engine)
        states = lambda: [pane(app, a).state for a in ("technical", "business", "coordinator")]  # noqa: E731
        # the worker has taken technical's turn (held by the script); the others wait
        await wait_until(pilot, lambda: states() == ["prefilling", "queued", "queued"])

        def coordinator_user() -> str:
            turns = pane(app, "coordinator").query(ChatTurn)
            return str(turns.last().query_one(".user").content) if turns else ""

        # The question shows before the brief exists (the coordinator waits for both answers).
        await wait_until(pilot, lambda: coordinator_user() == "Team brief: launch plan")

        engine.release()
        await wait_until(pilot, lambda: states() == ["done", "prefilling", "queued"])
        engine.release()
        await wait_until(pilot, lambda: states() == ["done", "done", "prefilling"])
        engine.release()
        await wait_until(pilot, lambda: states() == ["done", "done", "done"])
        assert started == ["technical", "business", "coordinator"]
        # The coordinator's internal brief shows as the team's question, never its raw text.
        brief = str(pane(app, "coordinator").query(ChatTurn).last().query_one(".user").content)
        assert brief == "Team brief: launch plan"


async def test_pane_shows_prefill_progress_then_generating():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        engine.emit(TurnQueued("business", 7, "why?"))
        engine.emit(TurnStarted("business", 7, "snapshot", 100, 24, "why?"))
        engine.emit(PrefillProgress("business", 7, 12, 24))
        with_stats(engine, "business", state="prefilling")  # what the worker would say
        business = pane(app, "business")
        await wait_until(pilot, lambda: business.state == "prefilling")
        await wait_until(pilot, lambda: business.state_label == "prefilling 12/24")
        engine.emit(Tokens("business", 7, "Because", ()))
        with_stats(engine, "business", state="generating")
        # The state is the engine's, read on the stats timer.
        await wait_until(pilot, lambda: business.state == "generating")
        assert business.state_label == "generating"


async def test_pane_state_is_the_engines():
    """No event at all: the border follows AgentStats.state from the stats timer."""
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        coordinator = pane(app, "coordinator")
        assert coordinator.state == "idle" and not coordinator.busy
        with_stats(engine, "coordinator", state="queued")
        await wait_until(pilot, lambda: coordinator.state == "queued")
        assert coordinator.busy and coordinator.state_label == "queued"
        with_stats(engine, "coordinator", state="done")
        await wait_until(pilot, lambda: coordinator.state_label == "done")


async def test_escape_cancels_the_focused_agents_turn():
    engine = ScriptedEngine(manual=True)
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("f3")
        await send(pilot, "slow question")
        await pilot.press("escape")
        await pilot.pause()
        assert engine.calls.cancels == ["business"]
        business = pane(app, "business")
        note = business.query(ChatTurn).last().query_one(".note", Label)
        await wait_until(pilot, lambda: str(note.content) == "cancelled")
        await wait_until(pilot, lambda: business.state == "cancelled")  # the engine's state
        assert not business.busy


async def test_export_key_shows_path_size_and_hash():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("f4")
        await pilot.press("ctrl+e")
        await settle(pilot, engine)
        assert engine.calls.exports == ["coordinator"]
        exported = [n for n in notes(app) if n[0] == "Exported Coordinator"]
        assert exported, notes(app)
        message = exported[0][1]
        assert "/tmp/permeant-test/exports/coordinator.usxf" in message
        assert "3.2 MB" in message
        assert DIGEST in message
        assert not pane(app, "coordinator").has_class("-exporting")


async def test_export_failure_is_a_notification_with_what_to_do():
    engine = ScriptedEngine(export_error="No space left on device")
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("ctrl+e")
        await settle(pilot, engine)
        [(title, message, severity)] = [n for n in notes(app) if "Export" in n[0]]
        assert severity == "error"
        assert "No space left" in message and "ctrl+e" in message


async def test_context_exhausted_is_explained():
    engine = ScriptedEngine(fail_next={"technical": (
        "ContextExhausted",
        "context exhausted: 8100 tokens in cache + 40 new + 256 to generate = 8396 > limit 8192",
    )})
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await send(pilot, "more")
        await settle(pilot, engine)
        technical = pane(app, "technical")
        assert technical.state == "failed"
        [(title, message, severity)] = [n for n in notes(app) if "ContextExhausted" in n[0]]
        assert title == "Technical: ContextExhausted"
        assert severity == "error"
        assert "limit 8192" in message and "ctrl+r" in message
        assert app.is_running


async def test_resume_notifications_and_rejected_snapshot_warning():
    engine = ScriptedEngine(views(2), restored=[
        AgentRestored("technical", "snapshot", 14.2, 2048),
        AgentRestored("business", "prefill", 3100.0, 0,
                      reason="snapshot checksum check failed (file truncated)"),
    ])
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        engine.emit(Notice("warning", "snapshot business.kv rejected: made by another model",
                           "business"))
        await pilot.pause()
        shown = notes(app)
        assert ("Technical", "restored from snapshot in 14 ms, 2,048 tokens reused",
                "information") in shown
        assert ("Business", "rebuilt by prefill: snapshot checksum check failed (file truncated)",
                "warning") in shown
        assert ("Business", "snapshot business.kv rejected: made by another model",
                "warning") in shown


async def test_resume_shows_recent_turns_and_loads_more():
    engine = ScriptedEngine(views(25))
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        technical = pane(app, "technical")
        assert len(technical.query(ChatTurn)) == FIRST_PAINT_TURNS == 4
        button = technical.query_one("#load-more", Button)
        assert button.display and "21 more" in str(button.label)
        first = technical.query(ChatTurn).first()
        assert "question 21" in str(first.query_one(".user").content)
        button.press()  # what a click on it does (it is scrolled above the anchored end)
        await wait_until(pilot, lambda: len(technical.query(ChatTurn)) == 24)
        assert "1 more" in str(button.label)
        button.press()
        await wait_until(pilot, lambda: len(technical.query(ChatTurn)) == 25)
        await wait_until(pilot, lambda: not button.display)
        assert engine.calls.load_more == [("technical", 21, 20), ("technical", 1, 20)]
        assert "question 0" in str(technical.query(ChatTurn).first().query_one(".user").content)


async def test_model_loading_state_then_ready():
    engine = ScriptedEngine(hold_load=True)
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        status = app.workspace.status
        assert pane(app, "technical").state_label == "waiting for the model"
        engine.emit(ModelLoading("weights", 0.4))
        await pilot.pause()
        assert status.phase == "loading"
        assert "weights" in str(status.query_one("#model", Label).content)
        engine.emit(ModelReady("SmolLM2-135M-Instruct", "cpu", "OpenBLAS", "float32", 8192, 900.0))
        await pilot.pause()
        assert status.phase == "ready"
        assert str(status.query_one("#model", Label).content).startswith("SmolLM2-135M-Instruct")
        assert pane(app, "technical").state == "idle"


class BrokenEngine(ScriptedEngine):
    def submit(self, agent_id: str, text: str, max_tokens: int | None = None) -> int:
        raise RuntimeError("the engine worker has stopped")


async def test_failures_never_take_the_app_down():
    engine = BrokenEngine(hold_load=True)
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        engine.emit(ModelFailed("weights file is truncated: model.gguf"))
        await pilot.pause()
        await send(pilot, "hi")
        await pilot.pause()
        assert app.is_running
        titles = [n[0] for n in notes(app)]
        assert "Model failed to load" in titles and "submit failed" in titles
        assert pane(app, "technical").state == "unavailable"


async def test_gauges_show_engine_stats():
    engine = ScriptedEngine()
    with_stats(engine, "business", tokens=812, bytes=3_355_443, resident=False,
               last_tok_s=21.5, last_ttft_ms=95.0, tok_s_history=(20.0, 21.5))
    app = PermeantApp(engine, "/tmp/ws")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        business = pane(app, "business")
        assert str(business.query_one("#context-count", Label).content) == "812/8,192"
        assert str(business.query_one("#cache", Label).content) == "3.2 MB · on disk · TTFT 95 ms"
        assert str(business.query_one("#speed-value", Label).content) == "21.5"
        memory = str(app.workspace.status.query_one("#memory", Label).content)
        assert memory == "RSS 412 MB · MLX 96.0/180 MB"


async def test_memory_is_shown_every_few_seconds_not_at_every_sample(monkeypatch):
    """The memory figure moves with every stats sample; each change repaints the screen while
    replies stream, so it is shown at most every MEMORY_SECONDS (grown, never shrunk)."""
    engine = ScriptedEngine()
    app = PermeantApp(engine, "/tmp/ws")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        status = app.workspace.status
        label = status.query_one("#memory", Label)
        shown = str(label.content)
        stats = replace(engine.stats(), rss_bytes=2 << 30)
        status.show(stats)  # within MEMORY_SECONDS of the last: not shown yet
        await pilot.pause()
        assert str(label.content) == shown
        monkeypatch.setattr(status_bar, "MEMORY_SECONDS", 0.0)
        status.show(stats)
        await pilot.pause()
        assert str(label.content) == "RSS 2.00 GB · MLX 96.0/180 MB"
        status.show(replace(stats, rss_bytes=500 << 20))
        await pilot.pause()
        assert str(label.content).rstrip() == "RSS 500 MB · MLX 96.0/180 MB"
        assert len(str(label.content)) == len("RSS 2.00 GB · MLX 96.0/180 MB")


async def test_reset_asks_first():
    engine = ScriptedEngine(views(2))
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert engine.calls.resets == [] and engine.calls.cancels == []
        await pilot.press("ctrl+r")
        await pilot.pause()
        await pilot.click("#confirm")
        await settle(pilot, engine)
        assert engine.calls.resets == ["technical"]
        assert len(pane(app, "technical").query(ChatTurn)) == 0
        assert app.focused is pane(app, "technical").input


async def test_save_key_saves_and_says_so():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("ctrl+s")
        await settle(pilot, engine)
        assert engine.calls.saves == 1
        assert ("Saved", "Technical, Business (7 ms)", "information") in notes(app)


async def test_command_palette_runs_workspace_actions():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("ctrl+p")
        await pilot.pause()
        for character in "export":
            await pilot.press(character)
        await pilot.pause(0.3)
        await pilot.press("enter")
        await settle(pilot, engine)
        assert engine.calls.exports == ["technical"]


async def test_quit_shuts_the_engine_down_and_exits_zero():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: app.return_code is not None)
    assert engine.calls.shutdowns == 1
    assert app.return_code == 0
    assert app.engine_stopped


def test_the_ui_never_imports_mlx():
    code = (
        "import sys; import permeant_tui.app, permeant_tui.palette; "
        "bad = sorted(m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


async def _migrate_via_palette(pilot, engine, target: str) -> None:
    await settle(pilot, engine)
    await pilot.press("f3")
    await pilot.press("ctrl+p")
    await pilot.pause()
    for character in "migrate":
        await pilot.press(character)
    await pilot.pause(0.3)
    await pilot.press("enter")
    await pilot.pause(0.3)
    for character in target:
        await pilot.press(character)
    await pilot.press("enter")
    await settle(pilot, engine)


async def test_palette_migrates_the_focused_agent():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await _migrate_via_palette(pilot, engine, "10.0.0.2:8765")
        await wait_until(pilot, lambda: any(t == "Migrated Business" for t, _, _ in notes(app)))
        assert engine.migrations == [("business", "10.0.0.2:8765", None, "none", False)]
        assert any("exact 16/16" in text for t, text, _ in notes(app) if t == "Migrated Business")


async def test_failed_migration_is_explained():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await _migrate_via_palette(pilot, engine, "bad:1")
        await wait_until(pilot, lambda: any(s == "error" for _, _, s in notes(app)))
        errors = [(t, text) for t, text, s in notes(app) if s == "error"]
        assert errors[0][0] == "Migration of Business failed"
        assert "fingerprint mismatch" in errors[0][1] and "unchanged" in errors[0][1]


async def test_a_stats_sample_or_event_after_the_screens_close_is_ignored():
    """The stats timer and the engine can still call in while the app closes its screens (CI
    once saw an IndexError from a timer firing there): nothing reaches the gone workspace."""
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
    assert not app.screen_stack
    app._sample_stats()
    await app.on_engine_event(EngineEvent(Tokens("technical", 1, "late", (1,))))
