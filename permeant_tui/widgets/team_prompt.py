""""Ask the team": one question to the technical and business agents, then the coordinator.

A pause in typing the question posts `AgentPane.Drafted` for the two agents that answer it
first, so both have it prefilled when Enter sends it (engine/drafts.py)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Input, Label

from .agent_pane import AgentPane
from .message_input import PAUSE_SECONDS

FIRST_ROUND = ("technical", "business")  # who answers a team question first (Engine.ask_team)


class TeamPrompt(Horizontal):
    """A labelled one-line input; Enter posts `Asked`."""

    class Asked(Message):
        def __init__(self, question: str) -> None:
            super().__init__()
            self.question = question

    def __init__(self) -> None:
        super().__init__()
        self._pause: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Label("Ask the team (^t) ›", classes="prompt-label")
        yield Input(
            placeholder="technical and business answer, then the coordinator plans (Enter)",
            compact=True,
            id="team-input",
        )

    @property
    def input(self) -> Input:
        return self.query_one("#team-input", Input)

    @on(Input.Submitted, "#team-input")
    def _ask(self, event: Input.Submitted) -> None:
        event.stop()
        question = event.value.strip()
        if question:
            event.input.clear()
            self.post_message(self.Asked(question))

    @on(Input.Changed, "#team-input")
    def _typed(self, event: Input.Changed) -> None:
        if self._pause is not None:
            self._pause.stop()
        self._pause = self.set_timer(PAUSE_SECONDS, self._paused) if event.value.strip() else None

    def _paused(self) -> None:
        self._pause = None
        question = self.input.value.strip()
        if question:
            for agent_id in FIRST_ROUND:
                self.post_message(AgentPane.Drafted(agent_id, question))
