"""Ask where to migrate the focused agent: target HOST:PORT, certificate pin, quantization."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select

from ..engine.usxf import QUANTS


@dataclass(frozen=True)
class MigrationRequest:
    target: str
    pin: str | None
    quant: str
    move: bool


class MigrateScreen(ModalScreen[MigrationRequest | None]):
    CSS_PATH = "dialog.tcss"
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="migrate.cancel",
                        tooltip="Close without migrating")]

    def __init__(self, agent_title: str) -> None:
        super().__init__()
        self._title = agent_title

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"Migrate {self._title} to another host", id="question", markup=False)
            yield Label("The target runs `permeant serve` and trusts this workspace's key.",
                        id="detail", markup=False)
            yield Input(placeholder="HOST:PORT", id="target")
            yield Input(placeholder="certificate fingerprint (sha256, printed by the target)",
                        id="pin")
            yield Select([(q, q) for q in QUANTS], value="none",
                         allow_blank=False, id="quant")
            yield Checkbox("move (archive it here once the target commits)", id="move")
            with Horizontal(id="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Migrate", variant="primary", id="go")

    def on_mount(self) -> None:
        self.query_one("#target", Input).focus()

    @on(Button.Pressed, "#go")
    @on(Input.Submitted)
    def action_go(self) -> None:
        target = self.query_one("#target", Input).value.strip()
        if not target:
            self.query_one("#target", Input).focus()
            return
        pin = self.query_one("#pin", Input).value.strip() or None
        self.dismiss(MigrationRequest(target, pin, str(self.query_one("#quant", Select).value),
                                      self.query_one("#move", Checkbox).value))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
