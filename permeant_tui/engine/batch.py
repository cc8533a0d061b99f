"""Several agents' turns decoded in one batch: each prompt is prefilled into its own agent's cache
(exactly as a single turn does), then the decode runs in one forward pass per step for all of
them through mlx-lm's `BatchGenerator` (its batched KV caches merge the agents' caches with left
padding and split them back per agent when a reply ends). Afterwards every agent holds an
ordinary cache of its own, so snapshots, exports and the next turns are unchanged.

On the CPU device one step for two or three rows costs little more than one row: the work per
step is reading the weights, which the rows share (bench/team.py measures the gain). Greedy ids
equal the sequential run's (tests/engine/test_batch.py checks it on llama, qwen2 and gemma3 with
sliding layers past their window).

Runs on the engine worker thread only (it calls MLX). Batching applies only when every layer's
cache can merge (mlx-lm's KVCache and RotatingKVCache); `batchable` says so and the worker runs
the turns one after another otherwise.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import kvcache, kvrewind
from .agent import Agent, Turn
from .errors import ContextExhausted, TurnCancelled
from .events import Event, PrefillProgress, Tokens, TurnResult
from .generation import (
    BATCH_SECONDS,
    REPETITION_CONTEXT,
    TurnParams,
    common_prefix,
    prefill,
    processors_for,
    sampler_for,
    sync_to_transcript,
    trim_to,
    undo_turn,
)
from .kvcache import cache_offset, new_cache

MAX_BATCH = 3  # the team: technical, business, and the coordinator when asked alongside


@dataclass
class BatchTurn:
    """One agent's turn in a batch: what `run_turn` takes, per agent."""

    agent: Agent
    text: str
    params: TurnParams
    turn_id: int
    emit: Callable[[Event], None]
    cancel: threading.Event
    source: str
    on_start: Callable[[int, int], None] | None = None
    # filled while running
    prompt: list[int] = field(default_factory=list)
    cached: int = 0
    rewind: str | None = None
    checkpoint: kvrewind.Checkpoint | None = None
    t0: float = 0.0


def batchable(model) -> bool:
    """True when every layer's cache type can join a batch (mlx-lm's merge/extract)."""
    return kvcache.batchable(new_cache(model))


def _begin(model, tokenizer, t: BatchTurn, context_limit: int) -> None:
    """Everything of a turn before its decode: render, reuse the cached prefix, prefill all of
    the new tokens but the last into the agent's own cache. Raises ContextExhausted (nothing
    changed) or TurnCancelled (the cache brought back)."""
    agent = t.agent
    t.t0 = time.perf_counter()
    if t.cancel.is_set():
        raise TurnCancelled("cancelled before it started")
    t.prompt = agent.prompt_ids(tokenizer, t.text)
    if agent.cache is None:
        agent.cache, agent.cache_ids = new_cache(model), []
    cached = common_prefix(agent.cache_ids, t.prompt)
    if cached == len(t.prompt):
        cached -= 1
    if len(t.prompt) + t.params.max_tokens > context_limit:
        raise ContextExhausted(cached, len(t.prompt) - cached, t.params.max_tokens, context_limit)
    t.rewind = trim_to(agent, cached, model)
    t.checkpoint = kvrewind.checkpoint(agent.cache)
    t.cached = cached
    todo = t.prompt[cached:]
    if t.on_start:
        t.on_start(cached, len(todo))

    def progress(done: int, total: int) -> None:
        if done < total:
            t.emit(PrefillProgress(agent.agent_id, t.turn_id, done, len(todo)))

    try:
        prefill(model, agent, todo[:-1], progress=progress, cancel=t.cancel)
    except TurnCancelled as exc:
        exc.rewind = undo_turn(model, agent, t.checkpoint, cached)  # type: ignore[attr-defined]
        sync_to_transcript(model, tokenizer, agent)
        raise


def _undo(model, tokenizer, t: BatchTurn, cache, generated: list[int]) -> str | None:
    """Put back the cache a cancelled or failed stream held (prompt + tokens fed so far), then
    bring it back to the transcript, as a cancelled single turn does."""
    agent = t.agent
    agent.cache = cache
    agent.cache_ids = (t.prompt + generated)[:cache_offset(cache)]
    agent.dirty = True
    assert t.checkpoint is not None
    how = undo_turn(model, agent, t.checkpoint, t.cached)
    sync_to_transcript(model, tokenizer, agent)
    return how


class _Stream:
    """The text side of one stream: detokenizer and the ~40 ms batching of Tokens events."""

    def __init__(self, t: BatchTurn, tokenizer, eos: set[int]):
        self.t, self.eos = t, eos
        self.detok = copy.copy(tokenizer.detokenizer)  # the wrapper shares one instance
        self.detok.reset()
        self.generated: list[int] = []
        self.text, self.last = "", time.perf_counter()
        self.ids: list[int] = []
        self.t_first: float | None = None
        self.finish = "length"

    def add(self, token: int) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.generated.append(token)
        if token in self.eos:
            self.finish = "stop"
            return
        self.detok.add_token(token)
        self.text += self.detok.last_segment
        self.ids.append(token)
        now = time.perf_counter()
        if now - self.last >= BATCH_SECONDS:
            self.flush(now)

    def flush(self, now: float) -> None:
        if self.text or self.ids:
            t = self.t
            t.emit(Tokens(t.agent.agent_id, t.turn_id, self.text, tuple(self.ids)))
        self.text, self.ids, self.last = "", [], now

    def close(self) -> None:
        self.detok.finalize()
        self.text += self.detok.last_segment
        self.flush(time.perf_counter())


def _finish(tokenizer, t: BatchTurn, s: _Stream, cache, context_limit: int) -> TurnResult:
    """The agent takes its own cache back; the turn is recorded as `run_turn` records it."""
    agent = t.agent
    t_end = time.perf_counter()
    agent.cache = cache
    agent.cache_ids = t.prompt + s.generated
    agent.draft, agent.draft_logits = False, None  # see engine/drafts.py
    offset = cache_offset(agent.cache)
    if offset != len(agent.cache_ids):  # never let ids and K/V disagree
        agent.cache_ids = agent.cache_ids[:offset]
        trim_to(agent, min(offset, len(agent.cache_ids)))
    kvcache.check_offsets(agent.cache, len(agent.cache_ids))
    reply = tokenizer.decode([x for x in s.generated if x not in s.eos])
    agent.turns.append(Turn(t.text, reply, tuple(s.generated), time.time()))
    agent.dirty = True
    agent.last_used = time.time()
    t_first = s.t_first or t_end
    n = len(s.generated)
    decode_s = t_end - t_first
    tok_s = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
    agent.last_tok_s = tok_s
    agent.last_ttft_ms = (t_first - t.t0) * 1000
    agent.tok_s_history = (agent.tok_s_history + [tok_s])[-30:]
    return TurnResult(
        agent=agent.agent_id, user=t.text, reply=reply, generated_ids=tuple(s.generated),
        source=t.source, cached=t.cached, prefilled=len(t.prompt) - t.cached, generated=n,
        in_cache=offset, context_limit=context_limit,
        timing_ms={"prefill": (t_first - t.t0) * 1000, "ttft": (t_first - t.t0) * 1000,
                   "decode": decode_s * 1000, "batched": 1.0},
        decode_tok_s=tok_s, finish_reason=s.finish, rewind=t.rewind,
    )


def run_turns(model, tokenizer, turns: list[BatchTurn], *,
              context_limit: int) -> list[TurnResult | BaseException]:
    """Run several agents' turns (distinct agents) with one batched decode. Returns, per turn,
    its TurnResult or the exception that ended it (ContextExhausted, TurnCancelled with its
    `rewind`, or an error); a turn that fails never stops the others."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    if len({t.agent.agent_id for t in turns}) != len(turns):
        raise ValueError("a batch holds one turn per agent")
    out: list[TurnResult | BaseException | None] = [None] * len(turns)
    live: list[int] = []
    for i, t in enumerate(turns):  # prefill one agent after another, each in its own cache
        try:
            _begin(model, tokenizer, t, context_limit)
            live.append(i)
        except BaseException as exc:  # noqa: BLE001 - reported per turn
            out[i] = exc
    if not live:
        return out  # type: ignore[return-value]

    eos = set(tokenizer.eos_token_ids)
    seeds = [s for s in (turns[i].params.seed for i in live) if s is not None]
    if seeds:
        mx.random.seed(seeds[0])
    greedy = make_sampler(temp=0.0)  # one object: the batch samples in one call when all share it
    samplers = [greedy if turns[i].params.temp <= 0 else sampler_for(turns[i].params)
                for i in live]
    gen = BatchGenerator(model, stop_tokens=[[e] for e in sorted(eos)])
    original = {i: turns[i].agent.cache for i in live}
    streams = {i: _Stream(turns[i], tokenizer, eos) for i in live}
    try:
        uids = gen.insert([[turns[i].prompt[-1]] for i in live],
                          max_tokens=[turns[i].params.max_tokens for i in live],
                          caches=[original[i] for i in live], samplers=samplers,
                          logits_processors=[processors_for(turns[i].params) or [] for i in live],
                          # what a penalty looks back over, as in a single turn: the prompt's
                          # last tokens, cached or not (generation.processors_for; the last is
                          # the batch's first input), then the replies
                          all_tokens=[turns[i].prompt[:-1][-REPETITION_CONTEXT:] for i in live])
        by_uid = dict(zip(uids, live, strict=True))
        while by_uid:
            _, responses = gen.next()
            for r in responses:
                i = by_uid[r.uid]
                streams[i].add(r.token)
                if r.finish_reason is not None:
                    streams[i].close()
                    out[i] = _finish(tokenizer, turns[i], streams[i], r.prompt_cache,
                                     context_limit)
                    del by_uid[r.uid]
            for uid, i in list(by_uid.items()):
                if turns[i].cancel.is_set():
                    cache, _ = gen.remove([uid], return_prompt_caches=True)[uid]
                    del by_uid[uid]
                    stopped = TurnCancelled("cancelled")
                    stopped.rewind = _undo(  # type: ignore[attr-defined]
                        model, tokenizer, turns[i], cache, streams[i].generated)
                    out[i] = stopped
    except BaseException as exc:  # noqa: BLE001 - the agents' own caches were never changed
        for i in live:
            if out[i] is None:
                t = turns[i]
                t.agent.cache = original[i]
                t.agent.cache_ids = t.prompt[:cache_offset(original[i])]
                assert t.checkpoint is not None
                undo_turn(model, t.agent, t.checkpoint, t.cached)
                sync_to_transcript(model, tokenizer, t.agent)
                out[i] = exc
    finally:
        gen.close()
    return out  # type: ignore[return-value]
