"""Command palette provider: every binding active on the workspace, plus palette-only commands.

Built from the bindings themselves (description, key and tooltip), as Posting does, so the
palette and the footer never disagree.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

from textual.command import DiscoveryHit, Hit, Hits, Provider

Command = tuple[str, str, Callable[[], Any] | Callable[[], Awaitable[Any]]]


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
        if hasattr(app, "action_migrate"):
            yield (
                "Migrate agent to...",
                "Move the focused agent's live KV state to a `permeant serve` host",
                app.action_migrate,
            )
        if hasattr(screen, "action_load_more"):
            yield (
                "Load earlier turns",
                "Show older turns of the focused agent's conversation",
                screen.action_load_more,
            )

    async def discover(self) -> Hits:
        for title, help_text, command in self._commands():
            yield DiscoveryHit(title, command, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, command in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), command, help=help_text)
