"""The engine's one public face: what the UI, the CLI, migration, benchmarks and the demo may ask
of it. No MLX and no Textual here (the UI imports this module).

`Engine` (engine/worker.py) implements `EngineAPI` with one worker thread that owns every MLX
call; mypy checks that it does. Every method returns at once: work happens on the worker, its
result comes back as a Future and its progress as events (engine/events.py) through the sink
given to `connect`.

`call(fn)` runs `fn(ctx)` on the worker with a `WorkerContext`: the loaded model, the
workspace and a way to make an agent resident. It is for tests, benchmarks and commands that
need the model directly; everything else has a method here.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from .errors import ModelLoadError
from .events import EngineStats, Event, RestoreReport, TurnResult

if TYPE_CHECKING:
    from .generation import TurnParams
    from .identity import ModelIdentity
    from .models import LoadedModel
    from .settings import AgentSpec, WorkspaceSettings
    from .usxf.reader import UsxfFile as ExportInfo
    from .workspace import Workspace

T = TypeVar("T")
EventSink = Callable[[Event], None]


@dataclass(frozen=True)
class TurnView:
    user: str
    reply: str
    # the figures kept in the transcript (engine/agent.py Turn.stats), None for older turns
    stats: dict | None = None


@dataclass(frozen=True)
class AgentView:
    agent_id: str
    role: str
    title: str
    system: str
    turns: tuple[TurnView, ...]


@dataclass(frozen=True)
class ModelInfo:
    """The loaded model, as front ends show it."""

    name: str
    fingerprint: str
    spec: str
    device: str
    blas: str
    weights_mode: str
    context_limit: int
    load_ms: float
    identity: ModelIdentity  # the full fingerprinted identity (what a migration compares)
    # how turns are rendered: "gguf template" / "model template" (the model's own chat
    # template), or for a base model without one "gemma turns (base model)" / "plain transcript
    # (base model)" (a built-in format; front ends say so)
    chat_format: str = "model template"
    base_model: bool = False  # no chat template in the model: `chat_format` is built in


class WorkerContext:
    """What `call(fn)` hands to `fn` on the worker thread. Valid only during that call."""

    def __init__(self, model: LoadedModel | None, workspace: Workspace,
                 restore: Callable[[str], RestoreReport], load_error: str | None = None):
        self._model, self._load_error = model, load_error
        self.workspace = workspace
        self._restore = restore

    @property
    def model(self) -> LoadedModel:
        """The loaded model (`.model`, `.tokenizer`, `.identity`, `.context_limit`). Raises
        ModelLoadError when it is not loaded (still loading, or it failed)."""
        if self._model is None:
            raise ModelLoadError(f"model not loaded: {self._load_error or 'still loading'}")
        return self._model

    def restore(self, agent_id: str) -> RestoreReport:
        """Make the agent's KV state resident (memory, USXF import, snapshot or prefill),
        applying the residency limits, as a turn would."""
        return self._restore(agent_id)


class EngineAPI(Protocol):
    folder: Path  # the workspace folder

    def connect(self, sink: EventSink) -> None:
        """Where events go. Called once, before start(). The sink must not block (the TUI's
        only calls `post_message`)."""

    def start(self) -> None:
        """Start the worker: load the model, restore agents. Emits ModelLoading..ModelReady."""

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the model is loaded; raises ModelLoadError if it failed."""

    def on_worker_thread(self) -> bool:
        """True when called from the engine's worker (a `call(fn)` must not wait on the
        engine from there)."""

    def model_info(self) -> ModelInfo | None:
        """The loaded model, or None before it is loaded."""

    def agents(self) -> list[AgentView]:
        """The workspace's agents and their transcripts (available before the model loads)."""

    def agent(self, agent_id: str) -> AgentView:
        """One agent; raises UnknownAgent."""

    def settings(self) -> WorkspaceSettings:
        """A copy of the workspace's settings."""

    def load_more(self, agent_id: str, before: int, count: int = 20) -> list[TurnView]:
        """Older transcript turns (indices [before-count, before)) for "load more"."""

    def submit(self, agent_id: str, text: str, max_tokens: int | None = None,
               params: TurnParams | None = None) -> int:
        """Queue one turn; returns its turn id. Emits TurnQueued at once."""

    def submit_future(self, agent_id: str, text: str, max_tokens: int | None = None,
                      params: TurnParams | None = None) -> tuple[int, Future[TurnResult]]:
        """Queue one turn; returns its turn id and a Future of its TurnResult."""

    def prepare(self, agent_id: str, text: str) -> Future[int]:
        """Prefill the message being typed, so Enter finds it cached; returns at once a Future
        of the tokens prefilled (0: not now, nothing new)."""

    def continue_reply(self, agent_id: str, max_tokens: int | None = None,
                       params: TurnParams | None = None) -> tuple[int, Future[TurnResult]]:
        """Extend the agent's last reply (one cut by the length limit) from its KV cache, without
        re-prefill; the longer reply replaces the last turn. Raises NothingToDo when there is no
        reply; a reply that ended on its own fails the turn with NothingToDo. Events as a turn,
        with `kind="continue"`; the result's `reply` is the whole reply, `generated` the new
        tokens."""

    def regenerate(self, agent_id: str, max_tokens: int | None = None,
                   params: TurnParams | None = None) -> tuple[int, Future[TurnResult]]:
        """Rewind the agent's last reply and sample it again; the new reply replaces the last
        turn when it completes (a cancel keeps the old one). `kind="regenerate"`."""

    def turn_params(self, agent_id: str, max_tokens: int | None = None,
                    params: TurnParams | None = None) -> TurnParams:
        """What a turn of the agent samples with: `params`, else the agent's settings;
        `max_tokens` overrides either."""

    def update_agent_settings(self, agent_id: str, **changes) -> Future[AgentSpec]:
        """Change the agent's generation settings (temp, top_p, repetition_penalty, max_tokens;
        see `settings()`), saved in workspace.json; later turns submitted without params use
        them. Bad values raise WorkspaceError at once, naming the field."""

    def ask_team(self, question: str,
                 max_tokens: int | None = None) -> Future[dict[str, TurnResult]]:
        """Technical and business answer `question`; then the coordinator gets both answers.
        Resolves to {agent_id: TurnResult}."""

    def cancel(self, agent_id: str) -> None:
        """Cancel the agent's queued or running turn (between tokens). Emits TurnCancelled."""

    def export(self, agent_id: str, path: str | None = None, quant: str = "none",
               fidelity: bool | int = True) -> Future[ExportInfo]:
        """Write a USXF file for the agent (default: the workspace's exports folder). fidelity:
        True records a probe of the default length (128 tokens), an int N one of N, 0 none."""

    def import_usxf(self, path: str, name: str | None = None) -> Future[dict]:
        """Verify a USXF file, then register it as an agent (attached on first use)."""

    def replay_fidelity(self, agent_id: str) -> Future[str]:
        """Replay an imported agent's fidelity probe: "exact N/N", "diverged at k", or
        "not checked: ..."."""

    def save(self) -> Future[tuple[str, ...]]:
        """Save every dirty agent's KV snapshot now. Emits Saved; resolves to the saved ids."""

    def reset(self, agent_id: str) -> Future[None]:
        """Forget the agent's conversation and KV state (the transcript is archived)."""

    def add_agent(self, agent_id: str, role: str, system: str,
                  title: str | None = None) -> Future[AgentView]:
        """Add an agent with its own role and system prompt (name rule: engine/names.py;
        WorkspaceError if the name is taken). Works before `start()` too (no model needed)."""

    def rename_agent(self, old: str, new: str) -> Future[AgentView]:
        """Rename an agent: folder, settings, title if it was the default; its KV snapshot stays
        valid. Refused while a turn of it is queued or running."""

    def remove_agent(self, agent_id: str) -> Future[Path]:
        """Remove an agent: its folder (transcript, snapshot) moves to `<workspace>/archive/`,
        never deleted; resolves to the archive folder. Refused while a turn of it is queued or
        running, and for the workspace's only agent."""

    def restore(self, agent_id: str) -> Future[RestoreReport]:
        """Make the agent's KV state resident (memory, USXF import, snapshot or prefill)."""

    def call(self, fn: Callable[[WorkerContext], T]) -> Future[T]:
        """Run fn(ctx) on the worker, in queue order."""

    def stats(self) -> EngineStats:
        """A cheap immutable snapshot for gauges; safe to call from any thread."""

    def shutdown(self, cancel_running: bool = True, timeout: float = 60.0) -> None:
        """Cancel (or finish) the turn in flight, save dirty agents, stop the worker."""
