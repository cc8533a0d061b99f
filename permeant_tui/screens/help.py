"""Every key, on one screen (F1, or `?` outside a text box): built from the bindings themselves,
as the palette is, with the person's keymap applied, so help, footer and palette agree.

Each row names its binding id: the name to use in the `[keymap]` table of the config file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from ..palette import PALETTE_ONLY
from ..widgets.message_input import MessageInput
from .workspace import WorkspaceScreen

KEYS_WIDTH = 12
DESCRIPTION_WIDTH = 14


@dataclass(frozen=True)
class KeyRow:
    keys: str  # as displayed: "f2", "^t", "f1 ?"
    description: str
    help: str
    binding_id: str


@dataclass(frozen=True)
class KeySection:
    title: str
    rows: tuple[KeyRow, ...]


def key_rows(bindings: Iterable[BindingType], keymap: Mapping[str, str],
             display: Callable[[Binding], str]) -> tuple[KeyRow, ...]:
    """One row per binding id (its keys joined), the keymap's keys in place of the defaults."""
    keys: dict[str, list[str]] = {}
    first: dict[str, Binding] = {}
    for binding in Binding.make_bindings(bindings):
        if not binding.id or binding.system:
            continue
        first.setdefault(binding.id, binding)
        if binding.id in keymap:
            continue
        keys.setdefault(binding.id, []).append(display(binding))
    for binding_id, key_string in keymap.items():
        if binding_id in first:
            keys[binding_id] = [display(Binding(key.strip(), first[binding_id].action))
                                for key in key_string.split(",") if key.strip()]
    return tuple(
        KeyRow(" ".join(keys.get(binding_id, [])), binding.description,
               binding.tooltip or binding.description, binding_id)
        for binding_id, binding in first.items()
    )


def workspace_keys(app_bindings: Iterable[BindingType], keymap: Mapping[str, str],
                   display: Callable[[Binding], str]) -> list[KeySection]:
    """Every key of the workspace, by where it works."""
    palette = tuple(KeyRow("^p", "", f"{c.title}: {c.help}", "") for c in PALETTE_ONLY)
    return [KeySection("Workspace", key_rows(app_bindings, keymap, display)),
            KeySection("Panes", key_rows(WorkspaceScreen.BINDINGS, keymap, display)),
            KeySection("Message box", key_rows(MessageInput.BINDINGS, keymap, display)),
            KeySection("In the command palette (^p) only", palette)]


def binding_ids(*sources: Iterable[BindingType]) -> set[str]:
    """The ids a keymap may name: those of `sources` and of the workspace's screens."""
    everything = (*sources, WorkspaceScreen.BINDINGS, MessageInput.BINDINGS, HelpScreen.BINDINGS)
    return {b.id for source in everything for b in Binding.make_bindings(source) if b.id}


class HelpScreen(ModalScreen[None]):
    CSS_PATH = "help.tcss"
    BINDINGS = [Binding("escape,f1,q", "close", "Close", id="help.close",
                        tooltip="Close the help")]

    def __init__(self, sections: Sequence[KeySection], footnote: str = "") -> None:
        super().__init__()
        self._sections = sections
        self._footnote = footnote

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Label(Content("Keys (escape to close)"), id="help-title")
            with VerticalScroll(id="help-keys"):
                for section in self._sections:
                    yield Static(Content(section.title), classes="help-section")
                    yield Static(_table(section.rows), classes="help-rows")
            if self._footnote:
                yield Static(Content(self._footnote), id="help-footnote")

    def action_close(self) -> None:
        self.dismiss(None)


def _table(rows: Sequence[KeyRow]) -> Table:
    # Text objects, never markup strings: keys come from the person's config file.
    # Fixed widths: every section's columns line up.
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True, style="bold", width=KEYS_WIDTH, overflow="ellipsis")
    table.add_column(no_wrap=True, width=DESCRIPTION_WIDTH, overflow="ellipsis")
    table.add_column(ratio=1, style="dim")
    for row in rows:
        detail = f"{row.help} [{row.binding_id}]" if row.binding_id else row.help
        table.add_row(Text(row.keys), Text(row.description), Text(detail))
    return table
