"""The first paint mounts only the last FIRST_PAINT_TURNS turns of each pane (a resumed
workspace of long conversations painted in seconds), the first frame only the newest, the rest
of those once start-up's work is over; earlier turns are mounted when the person scrolls to the
top, and none is lost or shown twice."""

from __future__ import annotations

from support.pilot import (  # noqa: F401 (the fixtures are autouse)
    ScriptedEngine,
    close_engines,
    no_cursor_blink,
    settle,
    wait_until,
)
from textual.widgets import Button, ProgressBar

from permeant_tui.app import PermeantApp
from permeant_tui.engine.agent import DEFAULT_AGENTS
from permeant_tui.engine.api import AgentView, TurnView
from permeant_tui.engine.events import AgentRestored, ModelFailed, ModelLoading, ModelReady
from permeant_tui.widgets import agent_pane
from permeant_tui.widgets.agent_pane import (
    FIRST_FRAME_TURNS,
    FIRST_PAINT_TURNS,
    RECENT_TURNS,
    AgentPane,
)
from permeant_tui.widgets.chat_turn import ChatTurn

SIZE = (160, 40)
TURNS = 30


def long_views() -> list[AgentView]:
    """Three agents with TURNS turns each, every reply taller than a pane."""
    reply = "\n\n".join(f"Paragraph {k} of the answer." for k in range(8))
    return [AgentView(agent_id, agent_id, title, "system",
                      tuple(TurnView(f"{title} question {i}", reply) for i in range(TURNS)))
            for agent_id, _, title, _ in DEFAULT_AGENTS]


def shown(pane: AgentPane) -> list[int | None]:
    return [turn.index for turn in pane.query(ChatTurn)]


async def test_scrolling_to_the_top_mounts_earlier_turns():
    engine = ScriptedEngine(long_views())
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        for pane in app.workspace.panes:
            assert shown(pane) == list(range(TURNS - FIRST_PAINT_TURNS, TURNS))
        technical = app.workspace.panes[0]
        conversation = technical._conversation
        assert conversation.scroll_y == conversation.max_scroll_y > 0  # at the newest reply
        top = technical.query(ChatTurn).first()
        offset = top.virtual_region.y  # below the load-more button: where it shows at the top

        conversation.scroll_home(animate=False, immediate=True)  # the person scrolls up
        first = TURNS - FIRST_PAINT_TURNS - RECENT_TURNS
        await wait_until(pilot, lambda: shown(technical) == list(range(first, TURNS)))
        await pilot.pause()
        # What was at the top stays in view: the new turns are above it, not loaded again.
        await wait_until(pilot, lambda: conversation.scroll_y > 0)
        assert top.virtual_region.y - conversation.scroll_y == offset
        assert engine.calls.load_more == [("technical", TURNS - FIRST_PAINT_TURNS,
                                           RECENT_TURNS)]

        conversation.scroll_home(animate=False, immediate=True)
        await wait_until(pilot, lambda: shown(technical) == list(range(TURNS)))
        assert not technical.query_one("#load-more", Button).display
        users = [str(turn.query_one(".user").content) for turn in technical.query(ChatTurn)]
        assert users == [f"Technical question {i}" for i in range(TURNS)]
        # The other panes were not touched.
        for pane in app.workspace.panes[1:]:
            assert len(shown(pane)) == FIRST_PAINT_TURNS


async def test_a_repeated_request_does_not_show_turns_twice():
    engine = ScriptedEngine(long_views())
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        technical = app.workspace.panes[0]
        technical.request_more()  # the key, and a scroll to the top, before either is served
        technical.request_more()
        first = TURNS - FIRST_PAINT_TURNS - RECENT_TURNS
        await wait_until(pilot, lambda: len(engine.calls.load_more) == 2)
        await pilot.pause()
        assert shown(technical) == list(range(first, TURNS))


async def test_the_first_frame_holds_the_newest_turn_and_the_others_follow(monkeypatch):
    """Each pane composes only its newest turn (the first frame a person sees); the other
    initial turns are mounted above it right after, in order, and the view stays at the end."""
    composed: dict[str, list[int | None]] = {}
    on_mount = AgentPane.on_mount

    def record(self: AgentPane) -> None:
        composed[self.agent_id] = shown(self)
        on_mount(self)

    monkeypatch.setattr(AgentPane, "on_mount", record)
    engine = ScriptedEngine(long_views())
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        newest = list(range(TURNS - FIRST_FRAME_TURNS, TURNS))
        assert composed == {agent_id: newest for agent_id, *_ in DEFAULT_AGENTS}
        for pane in app.workspace.panes:
            await wait_until(pilot, lambda p=pane: len(shown(p)) == FIRST_PAINT_TURNS)
            assert shown(pane) == list(range(TURNS - FIRST_PAINT_TURNS, TURNS))
            assert pane.first_index == TURNS - FIRST_PAINT_TURNS
        conversation = app.workspace.panes[0]._conversation
        # at the newest reply once the mounts above it are laid out
        await wait_until(pilot, lambda: conversation.scroll_y == conversation.max_scroll_y > 0)


def newest(n: int) -> list[int | None]:
    return list(range(TURNS - n, TURNS))


async def test_the_earlier_turns_wait_for_start_up_to_settle(monkeypatch):
    """While the model loads, each pane holds only its newest turn: mounting the other initial
    turns took ~0.5 s of the UI thread while the weights loaded. They come with the engine's
    "settled", which follows the model and the restores."""
    monkeypatch.setattr(agent_pane, "HISTORY_SECONDS", 600.0)  # no fallback within the test
    engine = ScriptedEngine(long_views(), hold_load=True)
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        for _ in range(5):
            await pilot.pause()
        assert [shown(p) for p in app.workspace.panes] == [newest(FIRST_FRAME_TURNS)] * 3
        engine.runner.release_load()
        for pane in app.workspace.panes:
            await wait_until(pilot, lambda p=pane: shown(p) == newest(FIRST_PAINT_TURNS))
        stages = [e for e in engine.events
                  if isinstance(e, ModelReady | AgentRestored | ModelLoading)]
        kinds = [type(e).__name__ for e in stages]
        assert kinds.index("ModelReady") < kinds.index("AgentRestored")
        assert stages[-1] == ModelLoading("settled", 1.0)
        assert [e for e in stages if e == ModelLoading("settled", 1.0)] == [stages[-1]]
        assert engine.calls.load_more == []


async def test_scrolling_up_before_start_up_settles_shows_the_initial_turns_first(monkeypatch):
    """The turns above the newest are the initial ones, not older ones from disk: the load-more
    key (or a scroll to the top) before "settled" mounts those, in order, and the next one
    loads earlier turns."""
    monkeypatch.setattr(agent_pane, "HISTORY_SECONDS", 600.0)
    engine = ScriptedEngine(long_views(), hold_load=True)
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        technical = app.workspace.panes[0]
        technical.request_more()
        await wait_until(pilot, lambda: shown(technical) == newest(FIRST_PAINT_TURNS))
        await pilot.pause()
        assert engine.calls.load_more == []
        assert [shown(p) for p in app.workspace.panes[1:]] == [newest(FIRST_FRAME_TURNS)] * 2
        technical.request_more()
        await wait_until(pilot, lambda: shown(technical) == newest(FIRST_PAINT_TURNS
                                                                   + RECENT_TURNS))
        assert engine.calls.load_more == [("technical", TURNS - FIRST_PAINT_TURNS,
                                           RECENT_TURNS)]


async def test_the_earlier_turns_come_when_the_model_fails_or_start_up_takes_long(monkeypatch):
    monkeypatch.setattr(agent_pane, "HISTORY_SECONDS", 600.0)
    engine = ScriptedEngine(long_views(), hold_load=True)
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        engine.emit(ModelFailed("weights file is truncated: model.gguf"))
        for pane in app.workspace.panes:
            await wait_until(pilot, lambda p=pane: shown(p) == newest(FIRST_PAINT_TURNS))
    monkeypatch.setattr(agent_pane, "HISTORY_SECONDS", 0.3)
    engine = ScriptedEngine(long_views(), hold_load=True)
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        for pane in app.workspace.panes:
            await wait_until(pilot, lambda p=pane: shown(p) == newest(FIRST_PAINT_TURNS))
        assert not any(isinstance(e, ModelReady) for e in engine.events)  # still loading


async def test_the_export_bar_is_mounted_on_the_first_export():
    engine = ScriptedEngine()
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        technical = app.workspace.panes[0]
        assert not technical.query("#export-progress")  # nothing hidden in the first frame
        technical.export_progress(0.25)
        await pilot.pause()
        bar = technical.query_one("#export-progress", ProgressBar)
        assert technical.has_class("-exporting") and bar.display and bar.percentage == 0.25
        technical.export_progress(None)
        technical.export_progress(0.5)  # a second export reuses it
        await pilot.pause()
        assert len(technical.query("#export-progress")) == 1 and bar.percentage == 0.5
        technical.export_progress(None)
        await pilot.pause()
        assert not technical.has_class("-exporting")
