"""Engine events -> widgets and notifications: the app's one router (`on_engine_event`).

Engine events arrive on the engine's worker thread; the app's sink only posts them, as
`EngineEvent` messages, into the app's queue. `EngineEventRouting` is a part of `PermeantApp`
(a mixin: it uses the app's screen, engine and notifications), kept in its own file.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from textual.message import Message

from .conversation import TEAM_BRIEF_OPENING, demo_model_note
from .engine.events import (
    AgentReset,
    AgentRestored,
    Event,
    ExportDone,
    ExportFailed,
    ExportProgress,
    MigrationDone,
    MigrationFailed,
    MigrationProgress,
    ModelFailed,
    ModelLoading,
    ModelReady,
    Notice,
    PrefillProgress,
    Saved,
    Stopped,
    Tokens,
    TurnCancelled,
    TurnDone,
    TurnFailed,
    TurnQueued,
    TurnStarted,
)
from .widgets.gauges import format_bytes

if TYPE_CHECKING:
    from collections.abc import Callable

    from .engine.api import EngineAPI
    from .screens.workspace import WorkspaceScreen

# What to do next, by error class name (engine/errors.py).
ADVICE = {
    "ContextExhausted": "Reset the agent with ctrl+r (its transcript is archived) "
    "or ask for a shorter answer.",
    "ModelLoadError": "Check the model path, or start permeant with the default model.",
}
RESTORED_BY = {"snapshot": "snapshot", "usxf": "USXF file"}
# Events after which an agent's state has changed: the stats are sampled then, not only on the
# timer, so the panes follow the engine's state promptly.
STATE_EVENTS = (TurnQueued, TurnStarted, TurnDone, TurnFailed, TurnCancelled, AgentReset)


class EngineEvent(Message):
    """An engine event, carried from the worker thread into the app's message queue."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


class EngineEventRouting:
    """`PermeantApp`'s handling of `EngineEvent`."""

    if TYPE_CHECKING:  # what it uses of the app
        engine: EngineAPI
        engine_stopped: bool
        _save_requested: bool
        _team_questions: deque[str]
        screen_stack: list

        @property
        def workspace(self) -> WorkspaceScreen: ...
        def _title(self, agent_id: str | None) -> str: ...
        def _tell(self, text: str, title: str = "", severity: str = "information",
                  timeout: float | None = None) -> None: ...
        def _call(self, method: Callable[..., Any], *args: Any, quiet: bool = False,
                  **kwargs: Any) -> Any: ...
        def _sample_stats(self) -> None: ...

    async def on_engine_event(self, message: EngineEvent) -> None:
        if not self.screen_stack:  # closing: the screens are gone, the engine still speaks
            return
        try:
            await self._route(message.event)
            if isinstance(message.event, STATE_EVENTS):
                self._sample_stats()
        except Exception as error:  # a display problem must never take the workspace down
            self._tell(f"{type(message.event).__name__}: {error}", "Display error", "error")

    async def _route(self, event: Event) -> None:
        screen = self.workspace
        pane = screen.pane(getattr(event, "agent_id", None))
        title = self._title(getattr(event, "agent_id", None))
        match event:
            case ModelLoading(stage="settled"):
                for each in screen.panes:
                    await each.show_history()
            case ModelLoading():
                screen.status.model_loading(event.stage, event.fraction)
            case ModelReady():
                screen.status.ready(event.name, event.device, event.blas, event.weights_dtype,
                                    event.context_limit, event.chat_format)
                for each in screen.panes:
                    each.model_ready()
                self._demo_note(event.name)
            case ModelFailed():
                screen.status.failed(event.message)
                for each in screen.panes:
                    each.model_failed()
                self._tell(f"{event.message}\n{ADVICE['ModelLoadError']}",
                           "Model failed to load", "error", timeout=30)
            case AgentRestored():
                self._notify_restored(event, title)
            case TurnQueued() if pane:
                user = event.user
                if not user and self._team_questions:  # the coordinator's part of a team turn
                    user = TEAM_BRIEF_OPENING + self._team_questions.popleft()
                await pane.turn_queued(event.turn_id, user, event.kind)
            case TurnStarted() if pane:
                await pane.turn_started(event.turn_id, event.user, event.to_prefill,
                                        event.cached)
            case PrefillProgress() if pane:
                pane.prefill_progress(event.done, event.total)
            case Tokens() if pane:
                await pane.tokens(event.turn_id, event.text, len(event.ids))
            case TurnDone() if pane:
                await pane.turn_done(event.turn_id, event.result)
            case TurnFailed():
                if pane:
                    await pane.turn_failed(event.turn_id, event.kind)
                advice = ADVICE.get(event.kind, "")
                self._tell(f"{event.message}\n{advice}".strip(), f"{title}: {event.kind}",
                           "error", timeout=15)
            case TurnCancelled() if pane:
                await pane.turn_cancelled(event.turn_id)
            case AgentReset() if pane:
                await pane.reset()
                self._tell("Conversation and KV cache cleared; the transcript was archived.",
                           f"{title} reset")
            case ExportProgress() if pane:
                pane.export_progress(event.fraction)
            case ExportDone():
                if pane:
                    pane.export_progress(None)
                self._tell(f"{event.path}\n{format_bytes(event.size)} in {event.ms:,.0f} ms\n"
                           f"hash {event.digest}", f"Exported {title}", timeout=20)
            case ExportFailed():
                if pane:
                    pane.export_progress(None)
                self._tell(f"{event.message}\nCheck the exports folder has room and is "
                           "writable, then press ctrl+e again.", f"Export of {title} failed",
                           "error", timeout=20)
            case MigrationProgress() if event.stage in ("decision", "verify", "commit"):
                self._tell(f"{event.stage}: {event.detail}", f"Migrating {title}", timeout=6)
            case MigrationDone():
                self._tell(f"committed on {event.target}; fidelity probe: {event.summary}",
                           f"Migrated {title}", timeout=20)
            case MigrationFailed():
                self._tell(f"{event.message}\nNothing was attached on the target and {title} is "
                           "unchanged here.", f"Migration of {title} failed", "error", timeout=20)
            case Saved():
                if self._save_requested:
                    self._save_requested = False
                    names = ", ".join(self._title(a) for a in event.agent_ids) or "nothing to save"
                    self._tell(f"{names} ({event.ms:,.0f} ms)", "Saved")
            case Notice():
                self._tell(event.message, title if event.agent_id else "",
                           event.level if event.level in ("warning", "error") else "information",
                           timeout=15 if event.level != "information" else 5)
            case Stopped():
                self.engine_stopped = True

    def _demo_note(self, model_name: str) -> None:
        """First start on an embedded model: say what it is and how to bring a real one."""
        note = demo_model_note(model_name)
        if note and not any(view.turns for view in self._call(self.engine.agents) or []):
            self._tell(note, "Demonstration model", timeout=20)

    def _notify_restored(self, event: AgentRestored, title: str) -> None:
        if event.source in RESTORED_BY and event.prefilled:
            self._tell(f"restored from {RESTORED_BY[event.source]} in {event.ms:,.0f} ms: "
                       f"{event.tokens - event.prefilled:,} tokens reused, the last "
                       f"{event.prefilled:,} prefilled (the snapshot was behind the transcript)",
                       title, timeout=10)
        elif event.source in RESTORED_BY:
            self._tell(f"restored from {RESTORED_BY[event.source]} in {event.ms:,.0f} ms, "
                       f"{event.tokens:,} tokens reused", title, timeout=8)
        elif event.source == "prefill":
            self._tell(f"rebuilt by prefill: {event.reason or 'no usable snapshot'}", title,
                       "warning", timeout=15)
