"""Command palette providers: the workspace's commands, and search across every conversation.

`WorkspaceCommands` is built from the bindings themselves (description, key and tooltip), as
Posting does, so the palette, the footer and the help screen never disagree; plus the commands
that have no key (`PALETTE_ONLY`). `HistorySearch` lists the turns of every agent that contain
the query; choosing one focuses that agent's pane and scrolls to the turn (ctrl+f).

Text from transcripts reaches the palette as `Content` (a prompt) or escaped (help): the
palette parses plain strings as markup.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.content import Content
from textual.markup import escape

from .conversation import TurnMatch, search_turns

Command = tuple[str, str, Callable[[], Any] | Callable[[], Awaitable[Any]]]


@dataclass(frozen=True)
class PaletteCommand:
    title: str
    help: str
    action: str  # run with App.run_action: "app.x" or "screen.x"


PALETTE_ONLY = (
    PaletteCommand("Export conversation to Markdown",
                   "Write the focused agent's conversation to <workspace>/exports/<agent>.md",
                   "app.export_markdown"),
    PaletteCommand("Migrate agent to...",
                   "Move the focused agent's live KV state to a `permeant serve` host",
                   "app.migrate"),
    PaletteCommand("Load earlier turns", "Show older turns of the focused agent's conversation",
                   "screen.load_more"),
)


class WorkspaceCommands(Provider):
    def _commands(self) -> Iterator[Command]:
        screen, app = self.screen, self.app
        seen: set[str] = set()
        for active in screen.active_bindings.values():
            binding = active.binding
            if not (binding.id and binding.description) or binding.system or binding.id in seen:
                continue
            if not active.enabled:
                continue
            seen.add(binding.id)
            title = f"{binding.description} ({app.get_key_display(binding)})"
            yield title, binding.tooltip, partial(app.run_action, binding.action, active.node)
        for command in PALETTE_ONLY:
            namespace, _, action = command.action.partition(".")
            if hasattr(app if namespace == "app" else screen, f"action_{action}"):
                yield command.title, command.help, partial(app.run_action, command.action)

    async def discover(self) -> Hits:
        for title, help_text, command in self._commands():
            yield DiscoveryHit(title, command, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, command in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), command, help=help_text)


class HistorySearch(Provider):
    """Turns of every agent containing the query (case-insensitive), newest first."""

    async def startup(self) -> None:
        agents = getattr(self.app, "engine", None)
        try:
            self._views = agents.agents() if agents is not None else []
        except Exception:  # a search must never take the workspace down
            self._views = []

    async def search(self, query: str) -> Hits:
        matches = search_turns(self._views, query)
        for rank, match in enumerate(matches):
            yield Hit(1.0 - rank / (len(matches) + 1), _prompt(match, query),
                      partial(self._show, match), text=f"{match.title} {match.snippet}",
                      help=escape(f"{'message' if match.field == 'user' else 'reply'} "
                                  f"{match.index + 1} of {match.title}"))

    def _show(self, match: TurnMatch) -> None:
        self.app.run_worker(self.app.show_turn(match.agent_id, match.index),  # type: ignore[attr-defined]
                            exclusive=True, group="show-turn")


def _prompt(match: TurnMatch, query: str) -> Content:
    """`Title  …snippet…` with the match highlighted; literal text, never markup."""
    text = Content(match.snippet)
    needle = " ".join(query.replace("*", "").replace("`", "").split()).lower()
    at = match.snippet.lower().find(needle)
    if needle and at >= 0:
        text = text.stylize("bold reverse", at, at + len(needle))
    return Content.assemble((match.title, "bold"), "  ", text)
