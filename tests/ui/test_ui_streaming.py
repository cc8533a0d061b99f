"""A streaming reply costs the UI little (issue: UI under 5% of decode): its text is shown as
plain text while it grows, the Markdown takes finished blocks only every MARKDOWN_SECONDS and
is rendered once, whole, when the turn ends, exactly as the same turn loaded from disk."""

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
from textual.content import Content
from textual.widgets import Markdown
from textual.widgets.markdown import MarkdownBlock

from permeant_tui.app import PermeantApp
from permeant_tui.engine.api import AgentView, TurnView
from permeant_tui.engine.events import Tokens, TurnDone, TurnQueued, TurnResult, TurnStarted
from permeant_tui.widgets import chat_turn
from permeant_tui.widgets.agent_pane import AgentPane
from permeant_tui.widgets.chat_turn import ChatTurn

SIZE = (160, 40)
CHUNKS = ("Keep one **safetensors** snapshot", " per agent and write it\n\n",
          "1. atomically (temp file,", " fsync, rename)\n2. after", " the transcript\n\n",
          "```python\nsave(", "agent)\n\n", "load(agent)\n```\n\n", "Then *resume*.")
REPLY = "".join(CHUNKS)
QUESTION = "How do we cache the KV state?"


def pane(app: PermeantApp, agent_id: str) -> AgentPane:
    found = app.workspace.pane(agent_id)
    assert found is not None
    return found


def blocks(turn: ChatTurn) -> list[tuple[str, str]]:
    """What a reply's Markdown shows: each block's kind and text, nested blocks included."""
    return [(type(b).__name__, b._content.plain)
            for b in turn.query_one(Markdown).query(MarkdownBlock)]


def with_history() -> list[AgentView]:
    """Business has the same exchange in its transcript, as a restart shows it."""
    agent_views = views()
    agent_views[1] = AgentView("business", "business", "Business", "system",
                               (TurnView(QUESTION, REPLY),))
    return agent_views


def spy_markdown(monkeypatch) -> tuple[list[str], list[str]]:
    """Record what is given to every Markdown: whole documents and appended fragments."""
    updates: list[str] = []
    appends: list[str] = []
    update, append = Markdown.update, Markdown.append

    def spy_update(self, markdown: str):
        if markdown:  # not the empty document a new turn's Markdown starts with
            updates.append(markdown)
        return update(self, markdown)

    def spy_append(self, markdown: str):
        appends.append(markdown)
        return append(self, markdown)

    monkeypatch.setattr(Markdown, "update", spy_update)
    monkeypatch.setattr(Markdown, "append", spy_append)
    return updates, appends


async def stream(pilot, engine: ScriptedEngine, pause: float) -> None:
    """The technical agent's reply arrives in CHUNKS, `pause` seconds apart (a real decode)."""
    engine.emit(TurnQueued("technical", 41, QUESTION))
    engine.emit(TurnStarted("technical", 41, "snapshot", 0, 12, QUESTION))
    for text in CHUNKS:
        engine.emit(Tokens("technical", 41, text, ()))
        await asyncio.sleep(pause)
        await pilot.pause()


def finish(engine: ScriptedEngine) -> None:
    engine.emit(TurnDone("technical", 41, TurnResult(
        agent="technical", user=QUESTION, reply=REPLY, generated_ids=(), source="snapshot",
        cached=0, prefilled=12, generated=40, in_cache=52, context_limit=8192,
        decode_tok_s=20.0)))


async def test_streaming_shows_plain_text_and_renders_markdown_once(monkeypatch):
    # longer than this stream (raising=False: the test ran before the constant existed)
    monkeypatch.setattr(chat_turn, "MARKDOWN_SECONDS", 30.0, raising=False)
    engine = ScriptedEngine(with_history())
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        updates, appends = spy_markdown(monkeypatch)
        await stream(pilot, engine, pause=2 * chat_turn.FLUSH_SECONDS)
        turn = pane(app, "technical").query(ChatTurn).last()
        # No Markdown was parsed per chunk; each chunk was shown (a flush passed after each),
        # as plain text.
        assert appends == [] and updates == []
        live = turn._live_view
        assert str(live.render()) == REPLY
        # laid out only when its text outgrew its box, which grows LIVE_LINES_STEP lines at a
        # time: always room for every line, never a whole step of blank ones
        lines = len(Content(REPLY).wrap(live.content_region.width))
        step = chat_turn.LIVE_LINES_STEP
        assert lines > 1 and live.size.height % step == 0
        assert lines <= live.size.height < lines + step
        finish(engine)
        await wait_until(pilot, lambda: turn.has_class("-done"))
        await pilot.pause()
        assert updates == [REPLY]  # rendered once, whole
        assert not turn._live_view.display
        assert turn.query_one(Markdown).source == REPLY
        loaded = pane(app, "business").query_one(ChatTurn)
        assert blocks(turn) == blocks(loaded)
        assert ("MarkdownFence", "save(agent)\n\nload(agent)") in blocks(turn)


async def test_finished_blocks_reach_the_markdown_on_a_slow_cadence(monkeypatch):
    monkeypatch.setattr(chat_turn, "MARKDOWN_SECONDS", 0.5, raising=False)
    engine = ScriptedEngine(with_history())
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        updates, appends = spy_markdown(monkeypatch)
        await stream(pilot, engine, pause=0.15)  # 1.35 s: two or three Markdown writes
        turn = pane(app, "technical").query(ChatTurn).last()
        assert 1 <= len(appends) <= 3 < len(CHUNKS)
        # The Markdown holds whole blocks (up to a blank line); the plain text what follows.
        markdown = turn.query_one(Markdown).source
        assert markdown.endswith("\n\n") and REPLY.startswith(markdown)
        assert str(turn._live_view.render()) == REPLY[len(markdown):]
        finish(engine)
        await wait_until(pilot, lambda: turn.has_class("-done"))
        await pilot.pause()
        assert updates == [REPLY]
        assert blocks(turn) == blocks(pane(app, "business").query_one(ChatTurn))


async def test_a_replys_first_words_show_at_once_then_at_most_every_flush(monkeypatch):
    """The first batch of a reply is on screen without waiting for the cadence (time to first
    token is what a person sees); batches right behind it wait for FLUSH_SECONDS together."""
    monkeypatch.setattr(chat_turn, "FLUSH_SECONDS", 2.0)
    engine = ScriptedEngine(with_history())
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        engine.emit(TurnQueued("technical", 41, QUESTION))
        engine.emit(TurnStarted("technical", 41, "snapshot", 0, 12, QUESTION))
        engine.emit(Tokens("technical", 41, CHUNKS[0], ()))
        def replies() -> list[str]:
            return [each.reply for each in pane(app, "technical").query(ChatTurn)]

        await wait_until(pilot, lambda: any(replies()))
        turn = pane(app, "technical").query(ChatTurn).last()
        await pilot.pause()
        assert str(turn._live_view.render()) == CHUNKS[0]  # shown at once
        engine.emit(Tokens("technical", 41, CHUNKS[1], ()))
        engine.emit(Tokens("technical", 41, CHUNKS[2], ()))
        await wait_until(pilot, lambda: turn.reply == "".join(CHUNKS[:3]))
        await pilot.pause()
        assert str(turn._live_view.render()) == CHUNKS[0]  # the rest waits for the cadence
        await wait_until(pilot, lambda: str(turn._live_view.render()) == "".join(CHUNKS[:3]))
        finish(engine)
        await wait_until(pilot, lambda: turn.has_class("-done"))
