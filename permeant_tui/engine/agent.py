"""Agent: role, system prompt, transcript, and the KV cache that mirrors it.

Invariant at rest: the token ids in an agent's KV cache equal `expected_ids()`: the
conversation rendered with the chat template up to the last user message, followed by the ids
the model generated for the last reply (exactly as generated, so nothing is re-tokenized). The
transcript (with each reply's generated ids) is the source of truth; the KV cache, in memory or
in a snapshot, is a cache of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

DEFAULT_AGENTS = (
    # The seed's three agents and their system prompts (exactly as in the fixtures).
    ("technical", "technical", "Technical",
     "You are a technical expert specializing in API debugging and system architecture."),
    ("business", "business", "Business",
     "You are a business analyst focused on ROI, market impact, and strategy."),
    ("coordinator", "coordinator", "Coordinator",
     "You are a coordinator who synthesizes technical and business perspectives."),
)


@dataclass(frozen=True)
class Turn:
    user: str
    reply: str
    generated_ids: tuple[int, ...]
    ts: float = 0.0
    # How the reply was made, shown under it after a restart too: generated, decode_tok_s,
    # ttft_ms, cached, prefilled, finish. None for turns recorded before it was kept.
    stats: dict | None = field(default=None, compare=False)

    def to_json(self) -> dict:
        d = {"user": self.user, "reply": self.reply,
             "generated_ids": list(self.generated_ids), "ts": self.ts}
        if self.stats:
            d["stats"] = self.stats
        return d

    @classmethod
    def from_json(cls, d: dict) -> Turn:
        ids = d["generated_ids"]
        if not isinstance(ids, list):
            raise TypeError("generated_ids is not a list")
        # Kept as found: checked against the model's vocabulary before use
        # (Workspace.ensure_resident), which names the agent and the turn.
        stats = d.get("stats")
        return cls(str(d["user"]), str(d["reply"]), tuple(ids), float(d.get("ts", 0.0)),
                   stats if isinstance(stats, dict) else None)


@dataclass
class Agent:
    agent_id: str
    role: str
    title: str
    system: str
    turns: list[Turn] = field(default_factory=list)
    # KV state (None when not resident). cache_ids are the ids whose K/V the cache holds.
    cache: list | None = None
    cache_ids: list[int] = field(default_factory=list)
    dirty: bool = False
    draft: bool = False  # the cache also holds ids of a message being typed (engine/drafts.py)
    # (tokens, logits after them) of a draft that holds a whole prompt (engine/drafts.py)
    draft_logits: tuple | None = field(default=None, repr=False, compare=False)
    source: str = "new"  # where the current KV state came from: new|memory|snapshot|prefill|usxf
    attach_used: bool = False  # a turn has run since the state was attached
    last_used: float = field(default_factory=time.time)
    restore_ms: float = 0.0
    tokens_on_disk: int = 0  # tokens in the snapshot on disk (for gauges when not resident)
    bytes_on_disk: int = 0  # size of that snapshot
    # Figures for gauges (the turn state lives in the engine: engine/states.py).
    last_tok_s: float = 0.0
    last_ttft_ms: float = 0.0
    tok_s_history: list[float] = field(default_factory=list)

    @property
    def resident(self) -> bool:
        return self.cache is not None

    def messages(self, next_user: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}]
        for t in self.turns:
            msgs.append({"role": "user", "content": t.user})
            msgs.append({"role": "assistant", "content": t.reply})
        if next_user is not None:
            msgs.append({"role": "user", "content": next_user})
        return msgs

    def prompt_ids(self, tokenizer, next_user: str) -> list[int]:
        return list(tokenizer.apply_chat_template(self.messages(next_user),
                                                  add_generation_prompt=True))

    def _first_turns(self, n: int) -> Agent:
        return Agent(self.agent_id, self.role, self.title, self.system, self.turns[:n])

    def expected_ids(self, tokenizer) -> list[int]:
        """The ids the KV cache holds at rest (see module docstring); [] before the first turn."""
        if not self.turns:
            return []
        last = self.turns[-1]
        return (self._first_turns(len(self.turns) - 1).prompt_ids(tokenizer, last.user)
                + list(last.generated_ids))

    def turn_spans(self, tokenizer) -> list[tuple[int, int]]:
        """Each turn's [start, end) token span in expected_ids(): a turn starts where the
        conversation before it ends, and ends where the next one starts."""
        starts = [len(tokenizer.apply_chat_template(self._first_turns(i).messages(),
                                                    add_generation_prompt=False))
                  for i in range(len(self.turns))]
        ends = starts[1:] + [len(self.expected_ids(tokenizer))] if starts else []
        return list(zip(starts, ends, strict=True))

    def cache_bytes(self) -> int:
        from .kvcache import cache_nbytes

        return cache_nbytes(self.cache)

    def release(self) -> None:
        if not self.draft:  # a draft's ids are not in the snapshot
            self.tokens_on_disk = len(self.cache_ids)
        self.attach_used = self.draft = False
        self.draft_logits = None
        self.cache, self.cache_ids = None, []
