"""Each agent's turn state, owned by the engine: one set of states, every transition here.

    loading ──model ready──> idle ──submit──> queued ──start──> prefilling ──token──> generating
       │                                        │                   │                    │
       └─model failed─> unavailable ─submit─────┘                   └──── done | failed | cancelled
                                                                             │
                                            (another turn of the agent waits) └──> queued

A finished turn leaves `done`, `failed` or `cancelled` until the next submit; when another turn
of the same agent is already waiting, the agent goes straight back to `queued`. Shipped to front
ends in `AgentStats.state`. Calls come from the submitting thread (submit) and the worker (the
rest), under the engine's lock.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

AgentState = Literal["loading", "unavailable", "idle", "queued", "prefilling", "generating",
                     "done", "failed", "cancelled"]
Outcome = Literal["done", "failed", "cancelled"]

BUSY: frozenset[AgentState] = frozenset({"queued", "prefilling", "generating"})
_RESTING: frozenset[AgentState] = frozenset({"idle", "done", "failed", "cancelled"})
# What may follow what (staying in a state is always allowed).
TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    "loading": frozenset({"idle", "unavailable", "queued"}),
    "unavailable": frozenset({"queued"}),
    "idle": frozenset({"queued"}),
    "queued": frozenset({"prefilling", "failed", "cancelled"}),
    "prefilling": frozenset({"generating", "done", "failed", "cancelled"}),
    "generating": frozenset({"done", "failed", "cancelled"}),
    "done": frozenset({"queued", "idle"}),
    "failed": frozenset({"queued", "idle"}),
    "cancelled": frozenset({"queued", "idle"}),
}


class BadTransition(RuntimeError):
    """A bug in the engine: a state change the machine does not allow."""


class AgentStates:
    def __init__(self, agent_ids=()) -> None:
        self._state: dict[str, AgentState] = dict.fromkeys(agent_ids, "loading")
        self._waiting: Counter[str] = Counter()  # submitted turns not yet started, per agent
        self._model: AgentState = "loading"  # what an agent added later starts in

    def __getitem__(self, agent_id: str) -> AgentState:
        return self._state.get(agent_id, self._model)

    def _move(self, agent_id: str, new: AgentState) -> None:
        old = self[agent_id]
        if new != old and new not in TRANSITIONS[old]:
            raise BadTransition(f"agent {agent_id!r}: {old} -> {new}")
        self._state[agent_id] = new

    # the model
    def model_ready(self) -> None:
        self._model = "idle"
        for agent_id, state in self._state.items():
            if state == "loading":
                self._move(agent_id, "idle")

    def model_failed(self) -> None:
        self._model = "unavailable"
        for agent_id, state in self._state.items():
            if state == "loading":
                self._move(agent_id, "unavailable")

    # a turn
    def submitted(self, agent_id: str) -> None:
        self._waiting[agent_id] += 1
        if self[agent_id] not in BUSY:
            self._move(agent_id, "queued")

    def started(self, agent_id: str) -> None:
        self._waiting[agent_id] -= 1
        self._move(agent_id, "prefilling")

    def generating(self, agent_id: str) -> None:
        self._move(agent_id, "generating")

    def finished(self, agent_id: str, outcome: Outcome, started: bool = True) -> None:
        """The turn ended (`started=False`: it was dropped before it started)."""
        if not started:
            self._waiting[agent_id] -= 1
        self._move(agent_id, outcome)
        if self._waiting[agent_id] > 0:
            self._move(agent_id, "queued")

    def reset(self, agent_id: str) -> None:
        if self[agent_id] in _RESTING:
            self._move(agent_id, "idle")
