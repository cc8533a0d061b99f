"""Typed events the engine worker emits. Frozen records: they cross threads.

The worker calls one `on_event(event)` callback; in the TUI that callback only does
`app.post_message(...)`, in the CLI it collects or prints. Events are a pipeline:
ModelLoading -> ModelReady -> AgentRestored* -> (TurnQueued -> TurnStarted -> PrefillProgress*
-> Tokens* -> TurnDone | TurnFailed | TurnCancelled)* ... -> Saved -> Stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .states import AgentState


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class ModelLoading(Event):
    # "imports", "weights", "tokenizer", "identity", ... then, after ModelReady, "agents" (the
    # most recent agents being restored) and "settled" (start-up's work is over)
    stage: str
    fraction: float  # 0..1 of the whole start-up


@dataclass(frozen=True)
class ModelReady(Event):
    name: str
    device: str
    blas: str
    weights_dtype: str
    context_limit: int
    load_ms: float
    chat_format: str = ""  # ModelInfo.chat_format: "... (base model)" when no chat template


@dataclass(frozen=True)
class ModelFailed(Event):
    message: str


@dataclass(frozen=True)
class AgentRestored(Event):
    """An agent's KV state is ready (or will be rebuilt). source: snapshot | prefill | new | usxf."""

    agent_id: str
    source: str
    ms: float
    tokens: int
    reason: str | None = None  # why a snapshot was rejected, when source == "prefill"
    # tokens prefilled after the snapshot: it was behind the transcript (a crash or a failed
    # write after the turn was recorded); `tokens` - `prefilled` came from the snapshot
    prefilled: int = 0


@dataclass(frozen=True)
class TurnQueued(Event):
    agent_id: str
    turn_id: int
    user: str = ""  # the message; empty for a team coordinator turn until it starts
    kind: str = "new"  # new | continue (extends the last reply) | regenerate (replaces it)


@dataclass(frozen=True)
class TurnStarted(Event):
    agent_id: str
    turn_id: int
    source: str
    cached: int  # tokens reused from KV state
    to_prefill: int
    user: str = ""  # the user message of this turn (for the coordinator: the composed brief)
    kind: str = "new"  # as TurnQueued.kind


@dataclass(frozen=True)
class PrefillProgress(Event):
    agent_id: str
    turn_id: int
    done: int
    total: int


@dataclass(frozen=True)
class Tokens(Event):
    """A batch of generated text (batched every ~40 ms, never per token)."""

    agent_id: str
    turn_id: int
    text: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class TurnResult:
    agent: str
    user: str
    reply: str
    generated_ids: tuple[int, ...]
    source: str
    cached: int
    prefilled: int
    generated: int
    in_cache: int
    context_limit: int
    timing_ms: dict = field(default_factory=dict)
    decode_tok_s: float = 0.0
    finish_reason: str = "stop"
    # how the cache was brought back before the turn: None (no need) | "trim" | "rebuild"
    rewind: str | None = None
    # new | continue (reply: the whole extended reply; generated: the new tokens) | regenerate
    kind: str = "new"

    def to_json(self) -> dict:
        return {
            "agent": self.agent,
            "reply": self.reply,
            "generated_ids": list(self.generated_ids),
            "source": self.source,
            "tokens": {
                "cached": self.cached,
                "prefilled": self.prefilled,
                "generated": self.generated,
                "in_cache": self.in_cache,
                "context_limit": self.context_limit,
            },
            "timing_ms": {k: round(v, 2) for k, v in self.timing_ms.items()},
            "decode_tok_s": round(self.decode_tok_s, 2),
            "finish_reason": self.finish_reason,
            "rewind": self.rewind,
        }


@dataclass(frozen=True)
class RestoreReport:
    """How an agent's KV state became resident."""

    source: str  # memory | new | snapshot | usxf | prefill
    ms: float
    tokens: int
    reason: str | None = None  # why a snapshot was not used, when source == "prefill"
    prefilled: int = 0  # of `tokens`, prefilled after a snapshot that was behind (a prefix)


@dataclass(frozen=True)
class TurnDone(Event):
    agent_id: str
    turn_id: int
    result: TurnResult


@dataclass(frozen=True)
class TurnFailed(Event):
    agent_id: str
    turn_id: int
    kind: str  # error class name: ContextExhausted, ModelLoadError, ...
    message: str


@dataclass(frozen=True)
class TurnCancelled(Event):
    agent_id: str
    turn_id: int
    rewind: str | None = None  # how the cache went back: "trim" | "checkpoint" | "rebuild"


@dataclass(frozen=True)
class AgentReset(Event):
    agent_id: str


@dataclass(frozen=True)
class ExportProgress(Event):
    agent_id: str
    fraction: float


@dataclass(frozen=True)
class ExportDone(Event):
    agent_id: str
    path: str
    size: int
    digest: str
    ms: float


@dataclass(frozen=True)
class ExportFailed(Event):
    agent_id: str
    message: str


@dataclass(frozen=True)
class MigrationProgress(Event):
    """A stage of `permeant migrate` run from a front end: capabilities, decision, transfer..."""

    agent_id: str
    stage: str
    detail: str


@dataclass(frozen=True)
class MigrationDone(Event):
    agent_id: str
    target: str
    summary: str


@dataclass(frozen=True)
class MigrationFailed(Event):
    agent_id: str
    message: str


@dataclass(frozen=True)
class Saved(Event):
    agent_ids: tuple[str, ...]
    ms: float


@dataclass(frozen=True)
class Notice(Event):
    """Something a person should know that is not tied to one turn (a rejected snapshot, ...)."""

    level: str  # "information" | "warning" | "error"
    message: str
    agent_id: str | None = None


@dataclass(frozen=True)
class Stopped(Event):
    pass


@dataclass(frozen=True)
class AgentStats:
    agent_id: str
    role: str
    title: str
    tokens: int  # in the cache, or in the snapshot on disk when not resident
    bytes: int  # likewise
    resident: bool
    state: AgentState  # the engine's turn state of the agent (engine/states.py)
    context_limit: int
    last_used: float
    last_tok_s: float
    last_ttft_ms: float
    tok_s_history: tuple[float, ...] = ()


@dataclass(frozen=True)
class EngineStats:
    """A cheap, immutable view of the engine for gauges; replaced (not mutated) by the worker."""

    ready: bool
    model: str
    device: str
    blas: str
    weights_dtype: str
    workspace: str
    rss_bytes: int
    mlx_active_bytes: int
    mlx_peak_bytes: int
    agents: tuple[AgentStats, ...] = ()
