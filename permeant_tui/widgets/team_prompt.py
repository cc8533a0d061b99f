""""Ask the team": one question to the technical and business agents, then the coordinator."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Input, Label


class TeamPrompt(Horizontal):
    """A labelled one-line input; Enter posts `Asked`."""

    class Asked(Message):
        def __init__(self, question: str) -> None:
            super().__init__()
            self.question = question

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
