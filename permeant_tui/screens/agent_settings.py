"""Edit one agent's generation settings: temperature, top-p, repetition penalty, max tokens.

Saved in the workspace (workspace.json, by the engine); turns submitted without explicit
parameters use them. Values are checked with the engine's own rules before the dialog closes,
so a bad one is a line in the dialog, never a failed save.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from ..engine.errors import WorkspaceError
from ..engine.settings import AgentSpec, check_generation

FIELDS = (  # (setting, label, placeholder)
    ("temp", "Temperature (0: greedy)", "0.2"),
    ("top_p", "Top-p", "0.9"),
    ("repetition_penalty", "Repetition penalty (1: off)", "1.1"),
    ("max_tokens", "Max tokens per reply", ""),
)


def parse_values(raw: dict[str, str]) -> dict:
    """The dialog's text fields as checked settings; WorkspaceError names a bad one. An empty
    max tokens means the workspace's default."""
    values: dict = {}
    for key, text in raw.items():
        text = text.strip()
        if key == "max_tokens":
            if not text:
                values[key] = None
                continue
            try:
                values[key] = int(text)
            except ValueError:
                raise WorkspaceError(f"max_tokens must be a whole number, not {text!r}") from None
            continue
        try:
            values[key] = float(text)
        except ValueError:
            raise WorkspaceError(f"{key} must be a number, not {text!r}") from None
    return check_generation(values)


class AgentSettingsScreen(ModalScreen[dict | None]):
    CSS_PATH = "dialog.tcss"
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="settings.cancel",
                        tooltip="Close without changing the settings")]

    def __init__(self, agent_title: str, spec: AgentSpec, workspace_max_tokens: int) -> None:
        super().__init__()
        self._title, self._spec = agent_title, spec
        self._default_max = workspace_max_tokens

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"Generation settings: {self._title}", id="question", markup=False)
            yield Label("Saved in the workspace; used by this agent's next turns.", id="detail",
                        markup=False)
            for key, label, placeholder in FIELDS:
                value = getattr(self._spec, key)
                yield Label(label, classes="field-label", markup=False)
                yield Input("" if value is None else f"{value:g}",
                            placeholder=placeholder or f"{self._default_max} (workspace default)",
                            id=key, compact=True)
            yield Label("", id="error", markup=False)
            with Horizontal(id="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Save", variant="primary", id="save")

    def on_mount(self) -> None:
        self.query_one("#temp", Input).focus()

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def action_save(self) -> None:
        raw = {key: self.query_one(f"#{key}", Input).value for key, _, _ in FIELDS}
        try:
            values = parse_values(raw)
        except WorkspaceError as error:
            self.query_one("#error", Label).update(str(error))
            return
        self.dismiss(values)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
