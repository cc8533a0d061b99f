"""Cancel the first turn in the workspace, then save, export and quit (issue 15), with Pilot on
the real Engine and a tiny random-weight model (the MLX runner itself, held at its first token
by a gate, so escape lands mid-turn without any sleep).

Before the fix: ctrl+s said `save failed: memoryview: cannot cast view with zeros in shape or
strides`, and ctrl+q waited 65 s for the engine's timeout.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from support.pilot import no_cursor_blink, wait_until  # noqa: F401 (autouse fixture)
from support.tiny_models import tiny_model

from permeant_tui.app import PermeantApp
from permeant_tui.engine.events import Tokens
from permeant_tui.engine.runner import MlxRunner
from permeant_tui.engine.worker import Engine
from permeant_tui.widgets.chat_turn import ChatTurn

SIZE = (160, 40)


class GatedRunner(MlxRunner):
    """The real MLX runner; each turn stops at its first token until the test says go."""

    def __init__(self, lm) -> None:
        super().__init__(None, preloaded=lm)
        self.reached, self.go = threading.Event(), threading.Event()

    def run_turn(self, agent, text, params, **kw):
        emit = kw.pop("emit")

        def gated(ev):
            emit(ev)
            if isinstance(ev, Tokens) and not self.reached.is_set():
                self.reached.set()
                self.go.wait(60)

        return super().run_turn(agent, text, params, emit=gated, **kw)


def notes(app: PermeantApp) -> list[tuple[str, str, str]]:
    return [(n.title, n.message, n.severity) for n in app._notifications]


@pytest.fixture
def lm(real_model):
    return tiny_model("llama", real_model.tokenizer)[1]


async def test_cancel_the_first_turn_then_save_export_and_quit(tmp_path, lm):
    runner = GatedRunner(lm)
    engine = Engine(tmp_path / "ws", runner=runner, eager_restore=False)
    thread_box: list[threading.Thread] = []
    app = PermeantApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: engine.model_info() is not None, timeout=60)
        thread_box.append(engine._thread)  # type: ignore[arg-type]
        for character in "hello there":
            await pilot.press("space" if character == " " else character)
        await pilot.press("enter")
        await asyncio.to_thread(runner.reached.wait, 60)
        await pilot.press("escape")
        runner.go.set()
        pane = app.workspace.pane("technical")
        assert pane is not None
        await wait_until(pilot, lambda: bool(pane.query(ChatTurn).filter(".-cancelled")),
                         timeout=60)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: any(t == "Saved" for t, _, _ in notes(app)), timeout=60)
        await pilot.press("ctrl+e")
        await wait_until(pilot, lambda: any("Export" in t for t, _, _ in notes(app)), timeout=60)
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: app.return_code is not None, timeout=60)
    assert app.return_code == 0 and app.engine_stopped
    assert not thread_box[0].is_alive()  # the worker ended: shutdown did not wait out a timeout
    shown = notes(app)
    assert not [n for n in shown if "failed" in n[0] and "Export" not in n[0]], shown
    # nothing to export yet: one clear line, not a traceback
    assert any("no conversation to export yet" in m for t, m, _ in shown if "Export" in t), shown
    assert engine.agent("technical").turns == ()
