"""The figures a transcript keeps for each reply are shown under it after a restart (issue 15);
turns recorded before they were kept show no footnote."""

from __future__ import annotations

from support.pilot import (  # noqa: F401 (the fixtures are autouse)
    ScriptedEngine,
    close_engines,
    no_cursor_blink,
    settle,
)

from permeant_tui.app import PermeantApp
from permeant_tui.engine.api import AgentView, TurnView
from permeant_tui.widgets.chat_turn import ChatTurn


async def test_the_pane_shows_kept_figures_after_a_restart():
    stats = {"generated": 42, "decode_tok_s": 17.25, "ttft_ms": 80.0, "cached": 300,
             "prefilled": 12, "finish": "length"}
    view = AgentView("technical", "technical", "Technical", "sys",
                     (TurnView("old question", "old answer", stats),
                      TurnView("older format", "no figures")))
    engine = ScriptedEngine([view])
    app = PermeantApp(engine)
    async with app.run_test(size=(160, 40)) as pilot:
        await settle(pilot, engine)
        pane = app.workspace.pane("technical")
        assert pane is not None
        first, second = pane.query(ChatTurn)
        assert str(first._note_view.render()) == \
            "42 tokens · 17.2 tok/s · 300 reused · 12 prefilled · stopped: length"
        assert not second._note_view.display
