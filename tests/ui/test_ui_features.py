"""Workspace features driven with Pilot on the real Engine with a scripted runner: keys and keymap, help, the message
box (multi-line, recall, paging), copy, Markdown export, history search, gauges after a reset,
and text from files that must render literally (issue 14 item 5, issue 15)."""

from __future__ import annotations

from support.pilot import (  # noqa: F401 (no_cursor_blink is an autouse fixture)
    ScriptedEngine,
    close_engines,
    no_cursor_blink,
    settle,
    views,
    wait_until,
    with_stats,
)
from textual import events
from textual.widgets import Footer, Markdown, Sparkline
from textual.widgets._footer import FooterKey

from permeant_tui.app import PermeantApp
from permeant_tui.conversation import code_blocks, search_turns, team_question
from permeant_tui.engine.api import AgentView, TurnView
from permeant_tui.engine.events import AgentReset, Notice, TurnDone, TurnQueued, TurnResult
from permeant_tui.preferences import Preferences, load_preferences
from permeant_tui.screens.help import HelpScreen
from permeant_tui.widgets.agent_pane import AgentPane
from permeant_tui.widgets.chat_turn import ChatTurn
from permeant_tui.widgets.gauges import AgentGauges
from permeant_tui.widgets.message_input import MessageInput

SIZE = (160, 40)
NO_PREFS = Preferences()


def pane(app: PermeantApp, agent_id: str) -> AgentPane:
    found = app.workspace.pane(agent_id)
    assert found is not None
    return found


def notes(app: PermeantApp) -> list[tuple[str, str, str]]:
    return [(n.title, n.message, n.severity) for n in app._notifications]


async def type_text(pilot, text: str) -> None:
    for character in text:
        await pilot.press({" ": "space", "?": "question_mark", "*": "asterisk"}.get(character,
                                                                                    character))


def done(agent_id: str, turn_id: int, user: str, reply: str) -> TurnDone:
    return TurnDone(agent_id, turn_id, TurnResult(
        agent=agent_id, user=user, reply=reply, generated_ids=(), source="snapshot", cached=0,
        prefilled=10, generated=20, in_cache=30, context_limit=8192, decode_tok_s=20.0))


# keys and keymap


async def test_keymap_from_the_config_file_rebinds_a_pane_key(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[keymap]\n"pane.2" = "ctrl+n"\n"no.such" = "f9"\n"pane.3" = 3\n')
    preferences = load_preferences(config)
    assert preferences.keymap == {"pane.2": "ctrl+n", "no.such": "f9"}
    engine = ScriptedEngine()
    app = PermeantApp(engine, preferences=preferences)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.focused is pane(app, "business").input
        await pilot.press("f3")  # replaced by ctrl+n, not added to
        await pilot.pause()
        assert app.focused is pane(app, "business").input and app.focused.text == ""
        await pilot.press("f4")
        await pilot.pause()
        assert app.focused is pane(app, "coordinator").input
        warnings = [text for title, text, severity in notes(app) if title == "Keymap"]
        assert any("no.such" in text for text in warnings), warnings
        assert any("pane.3" in text for text in warnings), warnings


async def test_keys_typed_right_after_a_pane_key_reach_the_new_pane():
    """A terminal delivers "F3 x y" in one read: the characters must not land in the old pane."""
    engine = ScriptedEngine()
    app = PermeantApp(engine, preferences=NO_PREFS)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        for key, character in (("f3", None), ("x", "x"), ("y", "y")):
            app.post_message(events.Key(key, character))
        await wait_until(pilot, lambda: pane(app, "business").input.text == "xy")
        assert pane(app, "technical").input.text == ""
        # An editing key typed just before a pane key edits the pane it was typed in; Enter
        # sends what was typed before it.
        for key, character in (("f4", None), ("w", "w"), ("backspace", "\x7f"), ("f2", None),
                               ("h", "h"), ("i", "i"), ("enter", "\r")):
            app.post_message(events.Key(key, character))
        await wait_until(pilot, lambda: engine.calls.submits == [("technical", "hi")])
        assert pane(app, "coordinator").input.text == ""
        assert pane(app, "business").input.text == "xy"


def test_an_unreadable_config_file_is_a_problem_not_a_crash(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[keymap\n")
    preferences = load_preferences(config)
    assert preferences.keymap == {} and "unreadable" in preferences.problems[0]
    assert load_preferences(tmp_path / "missing.toml") == Preferences(
        path=tmp_path / "missing.toml")


async def test_footer_fits_80_columns():
    engine = ScriptedEngine()
    app = PermeantApp(engine, preferences=NO_PREFS)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, engine)
        footer = app.workspace.query_one(Footer)
        assert footer.compact
        keys = {key.key for key in footer.query(FooterKey)}
        assert {"ctrl+r", "escape", "ctrl+e", "ctrl+q", "f1", "f2", "ctrl+p"} <= keys
        for key in footer.query(FooterKey):
            assert key.region.right <= 80, (key.key, key.region)


async def test_f1_opens_help_with_every_key_and_escape_closes_it():
    engine = ScriptedEngine()
    app = PermeantApp(engine, preferences=Preferences(keymap={"copy.reply": "ctrl+y"}))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        rows = {row.binding_id: row for section in app.screen._sections for row in section.rows}
        for binding_id in ("export", "save", "cancel", "reset", "quit", "help", "search",
                           "pane.1", "pane.2", "pane.3", "pane.next", "team.focus",
                           "copy.reply", "copy.code", "message.send", "message.newline",
                           "message.recall", "conversation.page_up"):
            assert binding_id in rows, binding_id
        assert rows["pane.1"].keys == "f2"
        assert rows["copy.reply"].keys == "^y"  # the keymap's key, not the default
        assert rows["help"].keys == "f1 ?"
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)
        assert engine.calls.cancels == []  # escape closed the help, cancelled nothing


async def test_question_mark_opens_help_only_outside_a_text_box():
    engine = ScriptedEngine(views(2))
    app = PermeantApp(engine, preferences=NO_PREFS)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        technical = pane(app, "technical")
        await pilot.press("question_mark")
        await pilot.pause()
        assert technical.input.text == "?" and not isinstance(app.screen, HelpScreen)
        technical.query_one(".conversation").focus()
        await pilot.pause()
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)


# the message box


async def test_multi_line_message_and_enter_sends_it():
    engine = ScriptedEngine()
    app = PermeantApp(engine, preferences=NO_PREFS)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await type_text(pilot, "first line")
        await pilot.press("ctrl+j")
        await type_text(pilot, "second")
        await pilot.press("shift+enter")
        await type_text(pilot, "third")
        technical = pane(app, "technical")
        assert technical.input.text == "first line\nsecond\nthird"
        assert technical.input.size.height == 3  # it grows with its text
        await pilot.press("enter")
        await settle(pilot, engine)
        assert engine.calls.submits == [("technical", "first line\nsecond\nthird")]
        assert technical.input.text == ""


async def test_up_in_an_empty_box_recalls_the_last_message_to_edit_and_resend():
    engine = ScriptedEngine(views(1))
    app = PermeantApp(engine, preferences=NO_PREFS)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        technical = pane(app, "technical")
        await pilot.press("up")  # nothing sent yet this session: the transcript's last message
        assert technical.input.text == "Technical question 0"
        technical.input.clear()
        await type_text(pilot, "how fast?")
        await pilot.press("enter")
        await settle(pilot, engine)
        await pilot.press("up")
        assert technical.input.text == "how fast?"
        await pilot.press("backspace", "!", "enter")
        await settle(pilot, engine)
        assert engine.calls.submits[-1] == ("technical", "how fast!")


async def test_page_keys_scroll_the_conversation_while_the_box_has_focus():
    long_reply = "\n\n".join(f"Paragraph {k}." for k in range(12))  # 4 turns: pages of them
    engine = ScriptedEngine([AgentView(v.agent_id, v.role, v.title, v.system,
                                       tuple(TurnView(t.user, long_reply) for t in v.turns))
                             for v in views(20)])
    app = PermeantApp(engine, preferences=NO_PREFS)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        technical = pane(app, "technical")
        conversation = technical.query_one(".conversation")
        await wait_until(pilot, lambda: conversation.scroll_y == conversation.max_scroll_y > 0)
        bottom = conversation.scroll_y
        await pilot.press("pageup")
        await wait_until(pilot, lambda: conversation.scroll_y < bottom)
        assert app.focused is technical.input
        await pilot.press("pagedown")
        await wait_until(pilot, lambda: conversation.scroll_y == bottom)


# copy, export, search


async def test_copy_reply_and_code_block_to_the_clipboard():
    engine = ScriptedEngine()
    app = PermeantApp(engine, preferences=NO_PREFS)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert ("Nothing copied", "no code block in the replies shown", "warning") in notes(app)
        reply = "Use this:\n\n```python\nprint('one')\n```\n\nor\n\n```sh\necho two\n```\n"
        engine.emit(TurnQueued("technical", 9, "how?"))
        engine.emit(done("technical", 9, "how?", reply))
        await wait_until(pilot, lambda: pane(app, "technical").last_reply == reply)
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert app.clipboard == reply
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert app.clipboard == "echo two"
        assert any(title == "Copied" for title, _, _ in notes(app))


async def test_export_conversation_to_markdown_from_the_palette(tmp_path):
    engine = ScriptedEngine(views(2))
    engine.folder = tmp_path
    app = PermeantApp(engine, preferences=NO_PREFS)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        await pilot.press("f3", "ctrl+p")
        await pilot.pause()
        await type_text(pilot, "markdown")
        await pilot.pause(0.3)
        await pilot.press("enter")
        path = tmp_path / "exports" / "business.md"
        await wait_until(pilot, path.exists)
        text = path.read_text()
        assert text.startswith("# Business\n")
        assert "Business question 1" in text and "Business answer **1**: noted." in text
        assert any(title == "Exported Business as Markdown" for title, _, _ in notes(app))
        assert not list((tmp_path / "exports").glob(".*.tmp"))


async def test_search_jumps_to_a_turn_loading_earlier_turns_first():
    engine = ScriptedEngine(views(25))
    app = PermeantApp(engine, preferences=NO_PREFS)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        business = pane(app, "business")
        assert business.first_index == 21
        await pilot.press("ctrl+f")
        await pilot.pause()
        await type_text(pilot, "Business question 3")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_until(pilot, lambda: bool(business.query(".-found")))
        assert app.workspace.active_agent == "business"
        assert app.focused is business.input
        assert engine.calls.load_more == [("business", 21, 18)]
        found = business.query_one(".-found", ChatTurn)
        assert found.index == 3
        assert "Business question 3" in str(found.query_one(".user").content)


def test_search_finds_turns_in_every_agent_newest_first():
    matches = search_turns(views(12), "QUESTION 1")
    assert [(m.agent_id, m.index) for m in matches[:4]] == [
        ("technical", 11), ("technical", 10), ("technical", 1), ("business", 11)]
    assert matches[0].field == "user" and matches[0].snippet == "Technical question 11"
    # As shown, not as written: "answer **1**" is found by "answer 1".
    [match] = search_turns(views(2), "business answer 1:")
    assert (match.agent_id, match.index, match.field) == ("business", 1, "reply")
    assert match.snippet == "Business answer 1: noted."


def test_code_blocks_and_team_question():
    assert code_blocks("a\n```\nx = 1\n```\nb\n~~~py\ny\n~~~\n") == ["x = 1", "y"]
    assert code_blocks("cut short:\n```python\ndef f():\n    return") == [
        "def f():\n    return"]
    assert team_question("The team was asked: Launch?\n\nTechnical expert's answer:\n**x**") \
        == "Launch?"
    assert team_question("an ordinary message") is None


# gauges


async def test_one_turn_sparkline_is_one_bar_and_a_reset_clears_the_gauges():
    engine = ScriptedEngine()
    with_stats(engine, "technical", tokens=300, last_tok_s=20.0, tok_s_history=(20.0,))
    app = PermeantApp(engine, preferences=NO_PREFS)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        gauges = pane(app, "technical").query_one(AgentGauges)
        sparkline = gauges.query_one(Sparkline)
        assert sparkline.display and sparkline.size.width == 1
        # The engine (for now) keeps the speed figures after a reset: they are not shown.
        with_stats(engine, "technical", tokens=0, bytes=0, last_tok_s=20.0,
                   tok_s_history=(20.0,), last_ttft_ms=90.0)
        engine.emit(AgentReset("technical"))
        await settle(pilot, engine)
        assert not sparkline.display
        assert str(gauges.query_one("#speed-value").content) == "–"
        assert str(gauges.query_one("#context-count").content) == "0/8,192"
        assert str(gauges.query_one("#cache").content) == "empty cache · resident"
        # A new turn after the reset shows only its own speed.
        with_stats(engine, "technical", tokens=120, bytes=1 << 20, last_tok_s=30.0,
                   tok_s_history=(20.0, 30.0), last_ttft_ms=80.0)
        await wait_until(pilot, lambda: str(gauges.query_one("#speed-value").content) == "30.0")
        # the figure is painted at once; the sparkline's new width needs the next layout (a
        # frame later under load: CI once asserted in between and saw width 0)
        await wait_until(pilot, lambda: sparkline.size.width > 0)
        assert sparkline.data == [30.0] and sparkline.size.width == 1


# text from files renders literally


HOSTILE_TITLES = ("[/unbalanced]", "[@click=app.quit]Click[/]", "evil\x1b]0;pwned\x07title")


def hostile_views() -> list[AgentView]:
    return [
        AgentView(f"agent{i}", "role", title, "system",
                  (TurnView("[b]not bold[/b] and [/]", "Reply with [b]x[/b] and [@click=app.quit]q[/]"),))
        for i, title in enumerate(HOSTILE_TITLES)
    ]


async def test_titles_and_messages_from_files_render_literally():
    engine = ScriptedEngine(hostile_views())
    app = PermeantApp(engine, preferences=NO_PREFS)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, engine)
        panes = app.workspace.panes
        assert [p.agent_title for p in panes] == [
            "[/unbalanced]", "[@click=app.quit]Click[/]", "evil\\x1b]0;pwned\\x07title"]
        assert [p._border_title.plain for p in panes] == [p.agent_title for p in panes]
        turn = panes[0].query_one(ChatTurn)
        assert str(turn.query_one(".user").content) == "[b]not bold[/b] and [/]"
        paragraph = turn.query_one(Markdown).query_one("MarkdownParagraph")
        assert paragraph._content.plain == "Reply with [b]x[/b] and [@click=app.quit]q[/]"
        # Notifications naming the agent, and a notice from the engine, render literally too.
        await pilot.press("f3", "ctrl+e")
        await settle(pilot, engine)
        engine.emit(Notice("warning", "snapshot [/bad] rejected\x1b[2J", "agent2"))
        await pilot.pause()
        assert ("Exported [@click=app.quit]Click[/]" in [t for t, _, _ in notes(app)])
        assert ("evil\\x1b]0;pwned\\x07title", "snapshot [/bad] rejected\\x1b[2J",
                "warning") in notes(app)
        # Clicking the titles does nothing: the app keeps running.
        await pilot.click(AgentPane, offset=(3, 0))
        await pilot.pause()
        assert app.is_running and app.return_code is None
        await pilot.press("f1")  # help lists the titles' panes without choking
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)


def test_message_input_binding_ids_are_documented():
    ids = {b.id for b in MessageInput.BINDINGS}  # type: ignore[union-attr]
    assert ids == {"message.send", "message.newline", "message.recall",
                   "conversation.page_up", "conversation.page_down"}

