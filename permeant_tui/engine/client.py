"""What the UI (and any other front end) may ask of the engine. No MLX, no Textual here.

`Engine` (engine/worker.py) implements this with one worker thread that owns every MLX call;
tests of the UI implement it with a scripted fake. Every method returns at once: work happens
on the worker and its outcome arrives as events (engine/events.py) through the `on_event`
callback given at construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .events import EngineStats, Event

EventSink = Callable[[Event], None]


@dataclass(frozen=True)
class TurnView:
    user: str
    reply: str


@dataclass(frozen=True)
class AgentView:
    agent_id: str
    role: str
    title: str
    system: str
    turns: tuple[TurnView, ...]


class EngineClient(Protocol):
    def connect(self, sink: EventSink) -> None:
        """Where events go. Called once, before start(). The sink must not block (the TUI's
        only calls `post_message`)."""

    def start(self) -> None:
        """Start the worker: load the model, restore agents. Emits ModelLoading..ModelReady."""

    def agents(self) -> list[AgentView]:
        """The workspace's agents and their transcripts, read from disk (available before the
        model is loaded)."""

    def submit(self, agent_id: str, text: str, max_tokens: int | None = None) -> int:
        """Queue one turn; returns its turn id. Emits TurnQueued at once."""

    def ask_team(self, question: str, max_tokens: int | None = None) -> None:
        """Technical and business answer `question`; then the coordinator gets both answers."""

    def cancel(self, agent_id: str) -> None:
        """Cancel the agent's queued or running turn (between tokens). Emits TurnCancelled."""

    def export(self, agent_id: str, path: str | None = None, quant: str = "none") -> None:
        """Write a USXF file for the agent (default: the workspace's exports folder)."""

    def migrate(self, agent_id: str, target: str, pin: str | None = None,
                quant: str = "none", move: bool = False) -> None:
        """Move the agent's live state to a `permeant serve` target (HOST:PORT). Emits
        MigrationProgress per stage, then MigrationDone or MigrationFailed."""

    def save(self) -> None:
        """Save every dirty agent's KV snapshot now. Emits Saved."""

    def reset(self, agent_id: str) -> None:
        """Forget the agent's conversation and KV state (the transcript is archived)."""

    def load_more(self, agent_id: str, before: int, count: int = 20) -> list[TurnView]:
        """Older transcript turns (indices [before-count, before)) for "load more"."""

    def stats(self) -> EngineStats:
        """A cheap immutable snapshot for gauges; safe to call from any thread."""

    def shutdown(self, cancel_running: bool = True, timeout: float = 30.0) -> None:
        """Cancel (or finish) the turn in flight, save dirty agents, stop the worker."""
