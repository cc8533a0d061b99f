"""A yes/no modal for destructive actions (resetting an agent). Dismisses with True or False."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label


class ConfirmScreen(ModalScreen[bool]):
    CSS_PATH = "dialog.tcss"
    BINDINGS = [
        Binding("escape,n", "cancel", "Cancel", id="confirm.cancel", tooltip="Keep things as they are"),
        Binding("y", "confirm", "Yes", id="confirm.yes", tooltip="Go ahead"),
    ]

    def __init__(self, question: str, detail: str = "", confirm_label: str = "Yes") -> None:
        super().__init__()
        self._question = question
        self._detail = detail
        self._confirm_label = confirm_label

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._question, id="question", markup=False)
            if self._detail:
                yield Label(self._detail, id="detail", markup=False)
            with Horizontal(id="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button(self._confirm_label, variant="error", id="confirm")

    def on_mount(self) -> None:
        # The safe choice has focus, so a stray Enter changes nothing.
        self.query_one("#cancel", Button).focus()

    @on(Button.Pressed, "#confirm")
    def action_confirm(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(False)
