"""One turn: render, reuse the longest cached prefix, prefill only the rest, stream the decode.

Runs on the engine worker thread only (it calls MLX). Decoding is mlx_lm's own
`generate_step` with an mlx_lm sampler, so the engine's decode speed is mlx_lm's
(bench/decode.py measures the difference). Text is batched into `Tokens` events every
~40 ms: a terminal cannot show more, and per-token events would cost the decode loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import kvcache
from .agent import Agent, Turn
from .errors import ContextExhausted, TurnCancelled
from .events import Event, PrefillProgress, Tokens, TurnResult
from .kvcache import cache_offset, new_cache

__all__ = ["TurnParams", "cache_offset", "common_prefix", "new_cache", "prefill", "rebuild",
           "run_turn", "sync_to_transcript", "trim_to", "undo_turn"]

PREFILL_CHUNK = 512
BATCH_SECONDS = 0.04


@dataclass(frozen=True)
class TurnParams:
    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def trim_to(agent: Agent, n: int, model=None) -> str | None:
    """Make the agent's cache hold only its first n ids, and say how: None (nothing to drop),
    "trim" (O(1): the layers' offsets move back), or "rebuild" (a sliding-window layer that holds
    its whole window cannot be trimmed: the first n ids are prefilled into a fresh cache; needs
    `model`, else CacheRewindError). Ids and K/V never disagree afterwards."""
    extra = cache_offset(agent.cache) - n
    if extra <= 0:
        del agent.cache_ids[n:]
        return None
    if kvcache.can_rewind(agent.cache, extra):
        kvcache.rewind(agent.cache, extra)
        del agent.cache_ids[n:]
        return "trim"
    if model is None:
        raise kvcache.CacheRewindError(f"cannot trim {extra} tokens from a sliding-window cache "
                                       "and no model was given to rebuild it")
    return rebuild(model, agent, n)


def rebuild(model, agent: Agent, n: int) -> str:
    """A fresh cache holding the agent's first n ids, by prefill."""
    keep = agent.cache_ids[:n]
    agent.cache, agent.cache_ids = new_cache(model), []
    prefill(model, agent, keep)
    return "rebuild"


def undo_turn(model, agent: Agent, cp: kvcache.Checkpoint, n: int) -> str | None:
    """Bring the cache back to its first n ids, the state `cp` was taken at (the start of a
    turn): trim when every layer can, else restore the checkpoint (sliding layers past their
    window), else rebuild by prefill. Returns None (nothing to undo) | "trim" | "checkpoint" |
    "rebuild"."""
    if cache_offset(agent.cache) == n:
        del agent.cache_ids[n:]
        return None
    if kvcache.can_rewind(agent.cache, cache_offset(agent.cache) - n):
        trim_to(agent, n)
        return "trim"
    if cp.offset == n:
        try:
            kvcache.restore_checkpoint(agent.cache, cp)
            del agent.cache_ids[n:]
            return "checkpoint"
        except kvcache.CacheRewindError:
            pass
    return rebuild(model, agent, n)


def prefill(model, agent: Agent, ids: list[int], *,
            progress: Callable[[int, int], None] | None = None,
            cancel: threading.Event | None = None, chunk: int = PREFILL_CHUNK) -> None:
    """Run `ids` through the model into the agent's cache (no sampling), in chunks."""
    import mlx.core as mx

    if agent.cache is None:
        agent.cache = new_cache(model)
    done = 0
    while done < len(ids):
        if cancel is not None and cancel.is_set():
            raise TurnCancelled("cancelled during prefill")
        part = ids[done:done + chunk]
        model(mx.array([part]), cache=agent.cache)
        kvcache.eval_cache(agent.cache)
        agent.cache_ids.extend(part)
        done += len(part)
        if progress:
            progress(done, len(ids))


def sync_to_transcript(model, tokenizer, agent: Agent) -> int:
    """Make the cache hold exactly agent.expected_ids(): trim to the common prefix (or rebuild,
    see trim_to), prefill the rest. Returns how many tokens were prefilled (0 usually)."""
    expected = agent.expected_ids(tokenizer)
    if agent.cache is None:
        agent.cache, agent.cache_ids = new_cache(model), []
    keep = common_prefix(agent.cache_ids, expected)
    trim_to(agent, keep, model)
    rest = expected[keep:]
    if rest:
        prefill(model, agent, rest)
    return len(rest)


def run_turn(model, tokenizer, agent: Agent, text: str, params: TurnParams, *,
             context_limit: int, turn_id: int, emit: Callable[[Event], None],
             cancel: threading.Event, source: str,
             on_start: Callable[[int, int], None] | None = None) -> TurnResult:
    """Run one turn of `agent`; append the Turn to agent.turns only when it completes.

    Raises ContextExhausted before touching the cache when the turn cannot fit, and
    TurnCancelled when `cancel` is set (the cache is then brought back to the transcript; the
    exception's `rewind` says how: "trim", "checkpoint" or "rebuild"). TurnResult.rewind says
    how the cache was brought back to the prompt's cached prefix before the turn (None: no need).
    """
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    t0 = time.perf_counter()
    prompt = agent.prompt_ids(tokenizer, text)
    if agent.cache is None:
        agent.cache, agent.cache_ids = new_cache(model), []
    cached = common_prefix(agent.cache_ids, prompt)
    if cached == len(prompt):  # the model needs at least one new token to produce logits
        cached -= 1
    if len(prompt) + params.max_tokens > context_limit:
        raise ContextExhausted(cached, len(prompt) - cached, params.max_tokens, context_limit)
    rewind = trim_to(agent, cached, model)  # None in the usual case: the cache is a prefix
    cp = kvcache.checkpoint(agent.cache)  # what a cancel needs once trimming cannot go back
    todo = prompt[cached:]
    if on_start:
        on_start(cached, len(todo))
    if params.seed is not None:
        mx.random.seed(params.seed)
    sampler = make_sampler(temp=params.temp, top_p=params.top_p if params.temp > 0 else 0.0)
    eos = set(tokenizer.eos_token_ids)

    def on_prefill(done: int, total: int) -> None:
        if cancel.is_set():
            raise TurnCancelled("cancelled during prefill")
        if 0 < done < total:
            emit(PrefillProgress(agent.agent_id, turn_id, done, total))

    detok = tokenizer.detokenizer
    detok.reset()
    generated: list[int] = []
    t_first = None
    pending_text, pending_ids, last_emit = "", [], time.perf_counter()
    finish = "length"
    gen = generate_step(mx.array(todo), model, max_tokens=params.max_tokens, sampler=sampler,
                        prompt_cache=agent.cache, prefill_step_size=PREFILL_CHUNK,
                        prompt_progress_callback=on_prefill)
    try:
        for token, _ in gen:
            if t_first is None:
                t_first = time.perf_counter()
            generated.append(token)
            if token in eos:
                finish = "stop"
                break
            detok.add_token(token)
            seg = detok.last_segment
            pending_text += seg
            pending_ids.append(token)
            now = time.perf_counter()
            # The first token goes out at once (time to first token shows, and a cancel "at
            # the first token" is a well-defined point); the rest in ~40 ms batches.
            if len(generated) == 1 or now - last_emit >= BATCH_SECONDS:
                emit(Tokens(agent.agent_id, turn_id, pending_text, tuple(pending_ids)))
                pending_text, pending_ids, last_emit = "", [], now
            if cancel.is_set():
                raise TurnCancelled("cancelled")
    except TurnCancelled as exc:
        gen.close()
        # What the cache holds now: the prompt and the generated tokens fed so far.
        agent.cache_ids = (prompt[:cached] + todo + generated)[:cache_offset(agent.cache)]
        agent.dirty = True
        exc.rewind = undo_turn(model, agent, cp, cached)  # type: ignore[attr-defined]
        sync_to_transcript(model, tokenizer, agent)
        raise
    finally:
        gen.close()
    detok.finalize()
    pending_text += detok.last_segment
    if pending_text or pending_ids:
        emit(Tokens(agent.agent_id, turn_id, pending_text, tuple(pending_ids)))
    t_end = time.perf_counter()

    # generate_step feeds every token it yields (EOS included) into the cache before yielding.
    agent.cache_ids = prompt + generated
    offset = cache_offset(agent.cache)
    if offset != len(agent.cache_ids):  # defensive: never let ids and K/V disagree
        agent.cache_ids = agent.cache_ids[:offset]
        trim_to(agent, min(offset, len(agent.cache_ids)), model)
    kvcache.check_offsets(agent.cache, len(agent.cache_ids))
    # The reply keeps a leading space the streaming detokenizer trims for display: re-rendered
    # in the next prompt it must re-tokenize to the generated ids, or the next turn would
    # re-read the whole reply instead of reusing it from the cache.
    reply = tokenizer.decode([t for t in generated if t not in eos])
    agent.turns.append(Turn(text, reply, tuple(generated), time.time()))
    agent.dirty = True
    agent.last_used = time.time()

    t_first = t_first or t_end
    n_gen = len(generated)
    decode_s = t_end - t_first
    tok_s = (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else 0.0
    agent.last_tok_s = tok_s
    agent.last_ttft_ms = (t_first - t0) * 1000
    agent.tok_s_history = (agent.tok_s_history + [tok_s])[-30:]
    return TurnResult(
        agent=agent.agent_id, user=text, reply=reply, generated_ids=tuple(generated),
        source=source, cached=cached, prefilled=len(todo), generated=n_gen,
        in_cache=cache_offset(agent.cache), context_limit=context_limit,
        timing_ms={"prefill": (t_first - t0) * 1000, "ttft": (t_first - t0) * 1000,
                   "decode": decode_s * 1000},
        decode_tok_s=tok_s, finish_reason=finish, rewind=rewind,
    )
