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

from . import kvcache, kvrewind, lookup
from .agent import Agent, Turn
from .errors import ContextExhausted, NothingToDo, TurnCancelled
from .events import Event, PrefillProgress, Tokens, TurnResult
from .kvcache import cache_offset, new_cache

__all__ = ["TurnParams", "cache_offset", "common_prefix", "continue_reply", "new_cache",
           "prefill", "rebuild", "regenerate", "run_turn", "sync_to_transcript", "trim_to",
           "undo_turn"]

PREFILL_CHUNK = 512
BATCH_SECONDS = 0.04


REPETITION_CONTEXT = 20  # tokens the repetition penalty looks back over (mlx_lm's default)


@dataclass(frozen=True)
class TurnParams:
    """How one turn samples. The defaults here are greedy and unpenalised (tests, benchmarks,
    `--temp 0`); an agent's own settings (engine/settings.py `AgentSpec`, the SmolLM2
    recommendation by default) apply when a front end submits without params."""

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float | None = None  # mlx_lm's multiplicative penalty; None/1.0: off
    lookup: bool = False  # prompt-lookup drafts (engine/lookup.py): the coordinator restates


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
    if kvrewind.can_rewind(agent.cache, extra):
        kvrewind.rewind(agent.cache, extra)
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


def undo_turn(model, agent: Agent, cp: kvrewind.Checkpoint, n: int) -> str | None:
    """Bring the cache back to its first n ids, the state `cp` was taken at (the start of a
    turn): trim when every layer can, else restore the checkpoint (sliding layers past their
    window), else rebuild by prefill. Returns None (nothing to undo) | "trim" | "checkpoint" |
    "rebuild"."""
    if cache_offset(agent.cache) == n:
        del agent.cache_ids[n:]
        return None
    if kvrewind.can_rewind(agent.cache, cache_offset(agent.cache) - n):
        trim_to(agent, n)
        return "trim"
    if cp.offset == n:
        try:
            kvrewind.restore_checkpoint(agent.cache, cp)
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
    agent.draft, agent.draft_logits = False, None  # a typed draft is gone (engine/drafts.py)
    return len(rest)


class _Decode:
    """One streamed decode through mlx_lm's `generate_step` into the agent's cache: feeds
    `feed` (the part of the prompt not in the cache), samples up to max_tokens, batches text
    into Tokens events. `prefix` are generated ids already shown (a continued reply): the
    detokenizer reads them first so the text joins them exactly."""

    def __init__(self, model, tokenizer, agent: Agent, params: TurnParams, *, turn_id: int,
                 emit: Callable[[Event], None], cancel: threading.Event) -> None:
        self.model, self.tokenizer, self.agent, self.params = model, tokenizer, agent, params
        self.turn_id, self.emit, self.cancel = turn_id, emit, cancel
        self.eos = set(tokenizer.eos_token_ids)
        self.generated: list[int] = []
        self.finish = "length"
        self.t_first: float | None = None
        self.drafted = self.accepted = 0  # prompt-lookup draft tokens proposed and kept
        self._unfed: int | None = None  # a first token sampled from kept logits, not yet fed

    def _on_prefill(self, done: int, total: int) -> None:
        if self.cancel.is_set():
            raise TurnCancelled("cancelled during prefill")
        if 0 < done < total:
            self.emit(PrefillProgress(self.agent.agent_id, self.turn_id, done, total))

    def _on_draft(self, proposed: int, kept: int) -> None:
        self.drafted += proposed
        self.accepted += kept

    def run(self, feed: list[int], prefix: tuple[int, ...] = (), first_logits=None) -> None:
        """`first_logits`: the prompt is all in the cache (`feed` is empty) and these are the
        logits after its last token (a typed draft kept them): the first token is sampled from
        them at once, then mlx_lm's generate_step goes on from it."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        p = self.params
        if p.seed is not None:
            mx.random.seed(p.seed)
        detok = self.tokenizer.detokenizer
        detok.reset()
        for t in prefix:
            if t not in self.eos:
                detok.add_token(t)
        _ = detok.last_segment  # already shown
        agent_id, generated = self.agent.agent_id, self.generated
        pending_text, pending_ids, last_emit = "", [], time.perf_counter()
        procs = processors_for(p, self.agent.cache_ids)
        if first_logits is not None:
            gen = self._from_logits(first_logits, procs)
        elif p.lookup and lookup.enabled() and kvrewind.always_trimmable(self.agent.cache):
            gen = lookup.lookup_generate_step(
                feed, self.model, context=list(self.agent.cache_ids), max_tokens=p.max_tokens,
                sampler=sampler_for(p), logits_processors=procs,
                prompt_cache=self.agent.cache, prefill_step_size=PREFILL_CHUNK,
                prompt_progress_callback=self._on_prefill, on_draft=self._on_draft)
        else:
            gen = generate_step(mx.array(feed), self.model, max_tokens=p.max_tokens,
                                sampler=sampler_for(p), logits_processors=procs,
                                prompt_cache=self.agent.cache, prefill_step_size=PREFILL_CHUNK,
                                prompt_progress_callback=self._on_prefill)
        try:
            for token, _ in gen:
                if self.t_first is None:
                    self.t_first = time.perf_counter()
                generated.append(token)
                if token in self.eos:
                    self.finish = "stop"
                    break
                detok.add_token(token)
                pending_text += detok.last_segment
                pending_ids.append(token)
                now = time.perf_counter()
                # The first token goes out at once (time to first token shows, and a cancel
                # "at the first token" is a well-defined point); the rest in ~40 ms batches.
                if len(generated) == 1 or now - last_emit >= BATCH_SECONDS:
                    self.emit(Tokens(agent_id, self.turn_id, pending_text, tuple(pending_ids)))
                    pending_text, pending_ids, last_emit = "", [], now
                if self.cancel.is_set():
                    raise TurnCancelled("cancelled")
        finally:
            gen.close()
        if self._unfed is not None:  # the first token ended the reply before it was fed
            self.model(mx.array([[self._unfed]]), cache=self.agent.cache)
            kvcache.eval_cache(self.agent.cache)
            self._unfed = None
        detok.finalize()
        pending_text += detok.last_segment
        if pending_text or pending_ids:
            self.emit(Tokens(agent_id, self.turn_id, pending_text, tuple(pending_ids)))

    def _from_logits(self, logits, procs):
        """What generate_step yields, its first forward pass already done: the first token
        sampled from `logits` (processors and sampler as generate_step applies them), then
        generate_step from that token (it feeds it into the cache first, as it does every token
        it yields; `run` feeds it if the reply ends on it)."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        x = logits[None]
        for proc in procs or ():
            x = proc(mx.array([], dtype=mx.uint32), x)
        logprobs = x - mx.logsumexp(x, keepdims=True)
        first = int(sampler_for(self.params)(logprobs).item())
        self._unfed = first
        yield first, logprobs.squeeze(0)
        self._unfed = None  # the next step of generate_step feeds it
        yield from generate_step(mx.array([first]), self.model,
                                 max_tokens=self.params.max_tokens - 1,
                                 sampler=sampler_for(self.params), logits_processors=procs,
                                 prompt_cache=self.agent.cache)

    def reply(self, ids: tuple[int, ...] | list[int]) -> str:
        # The reply keeps a leading space the streaming detokenizer trims for display:
        # re-rendered in the next prompt it must re-tokenize to the generated ids, or the next
        # turn would re-read the whole reply instead of reusing it from the cache.
        return self.tokenizer.decode([t for t in ids if t not in self.eos])


def sampler_for(params: TurnParams):
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=params.temp, top_p=params.top_p if params.temp > 0 else 0.0)


def processors_for(params: TurnParams, context: list[int] | None = None) -> list | None:
    """mlx_lm's repetition penalty over the last REPETITION_CONTEXT tokens, when asked for.

    mlx_lm's `generate_step` hands a processor only the tokens fed in that call: the part of the
    prompt that was not cached, then the reply. `context` (the ids in the cache before the feed)
    is put in front, so the penalty looks at the conversation's last tokens however much of the
    prompt was cached (a message prefilled while it was typed samples as one that was not)."""
    if not params.repetition_penalty or params.repetition_penalty == 1.0:
        return None
    from mlx_lm.sample_utils import make_logits_processors

    procs = make_logits_processors(repetition_penalty=params.repetition_penalty,
                                   repetition_context_size=REPETITION_CONTEXT)
    before = list(context or [])[-REPETITION_CONTEXT:]
    if not before:
        return procs
    import mlx.core as mx

    def with_context(proc):
        def run(tokens, logits):
            return proc(mx.concatenate([mx.array(before, dtype=tokens.dtype), tokens]), logits)
        return run

    return [with_context(p) for p in procs]


def take_draft_logits(agent: Agent, prompt: list[int]):
    """The logits a typed draft kept after its last token (engine/drafts.py), when the cache
    holds exactly `prompt`; else None. Taken once: they are gone afterwards either way."""
    kept, agent.draft_logits = agent.draft_logits, None
    if kept is None or not (kept[0] == len(prompt) == cache_offset(agent.cache)
                            and agent.cache_ids == prompt):
        return None
    return kept[1]


def _settle(model, agent: Agent, expected_len: int) -> None:
    """After a decode, make sure ids and K/V agree (defensive: generate_step feeds every token
    it yields, EOS included, into the cache before yielding it)."""
    offset = cache_offset(agent.cache)
    if offset != len(agent.cache_ids):
        agent.cache_ids = agent.cache_ids[:offset]
        trim_to(agent, min(offset, len(agent.cache_ids)), model)
    kvcache.check_offsets(agent.cache, len(agent.cache_ids))


def _figures(agent: Agent, dec: _Decode, t0: float, t_end: float) -> tuple[float, float, float]:
    """(time to first token s, decode s, tok/s); also kept on the agent for the gauges."""
    t_first = dec.t_first or t_end
    n_gen = len(dec.generated)
    decode_s = t_end - t_first
    tok_s = (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else 0.0
    agent.last_tok_s = tok_s
    agent.last_ttft_ms = (t_first - t0) * 1000
    agent.tok_s_history = (agent.tok_s_history + [tok_s])[-30:]
    return t_first - t0, decode_s, tok_s


def turn_stats(generated: int, tok_s: float, ttft_s: float, cached: int, prefilled: int,
               finish: str) -> dict:
    """The figures kept with a Turn in the transcript (shown under the reply after a restart)."""
    return {"generated": generated, "decode_tok_s": round(tok_s, 2),
            "ttft_ms": round(ttft_s * 1000, 1), "cached": cached, "prefilled": prefilled,
            "finish": finish}


def run_turn(model, tokenizer, agent: Agent, text: str, params: TurnParams, *,
             context_limit: int, turn_id: int, emit: Callable[[Event], None],
             cancel: threading.Event, source: str,
             on_start: Callable[[int, int], None] | None = None,
             kind: str = "new") -> TurnResult:
    """Run one turn of `agent`; append the Turn to agent.turns only when it completes.

    Raises ContextExhausted before touching the cache when the turn cannot fit, and
    TurnCancelled when `cancel` is set (the cache is then brought back to the transcript; the
    exception's `rewind` says how: "trim", "checkpoint" or "rebuild"). TurnResult.rewind says
    how the cache was brought back to the prompt's cached prefix before the turn (None: no need).
    """
    t0 = time.perf_counter()
    prompt = agent.prompt_ids(tokenizer, text)
    if agent.cache is None:
        agent.cache, agent.cache_ids = new_cache(model), []
    logits = take_draft_logits(agent, prompt)
    cached = common_prefix(agent.cache_ids, prompt)
    if cached == len(prompt) and logits is None:  # the model needs a new token for logits
        cached -= 1
    if len(prompt) + params.max_tokens > context_limit:
        raise ContextExhausted(cached, len(prompt) - cached, params.max_tokens, context_limit)
    rewind = trim_to(agent, cached, model)  # None in the usual case: the cache is a prefix
    cp = kvrewind.checkpoint(agent.cache)  # what a cancel needs once trimming cannot go back
    todo = prompt[cached:]
    if on_start:
        on_start(cached, len(todo))
    dec = _Decode(model, tokenizer, agent, params, turn_id=turn_id, emit=emit, cancel=cancel)
    try:
        dec.run(todo, first_logits=logits)
    except TurnCancelled as exc:
        # What the cache holds now: the prompt and the generated tokens fed so far.
        agent.cache_ids = (prompt[:cached] + todo + dec.generated)[:cache_offset(agent.cache)]
        agent.dirty = True
        exc.rewind = undo_turn(model, agent, cp, cached)  # type: ignore[attr-defined]
        sync_to_transcript(model, tokenizer, agent)
        raise
    t_end = time.perf_counter()
    generated = dec.generated
    agent.cache_ids = prompt + generated
    agent.draft = False  # a typed draft became this prompt, or was trimmed (engine/drafts.py)
    _settle(model, agent, len(agent.cache_ids))
    reply = dec.reply(generated)
    ttft, decode_s, tok_s = _figures(agent, dec, t0, t_end)
    agent.turns.append(Turn(text, reply, tuple(generated), time.time(),
                            turn_stats(len(generated), tok_s, ttft, cached, len(todo),
                                       dec.finish)))
    agent.dirty = True
    agent.last_used = time.time()
    return TurnResult(
        agent=agent.agent_id, user=text, reply=reply, generated_ids=tuple(generated),
        source=source, cached=cached, prefilled=len(todo), generated=len(generated),
        in_cache=cache_offset(agent.cache), context_limit=context_limit,
        timing_ms={"prefill": ttft * 1000, "ttft": ttft * 1000, "decode": decode_s * 1000},
        decode_tok_s=tok_s, finish_reason=dec.finish, rewind=rewind, kind=kind,
    )


def regenerate(model, tokenizer, agent: Agent, params: TurnParams, **kw) -> TurnResult:
    """Rewind the last reply and sample it again (same user message). The cache goes back to
    the prompt by trim, or checkpoint/rebuild on sliding-window layers past their window (as
    any turn's rewind). The new Turn replaces the last one only when it completes; a cancel or
    a failure leaves the old reply, in the transcript and in the cache."""
    if not agent.turns:
        raise NothingToDo(f"{agent.agent_id}: no reply to regenerate yet")
    last = agent.turns.pop()
    try:
        return run_turn(model, tokenizer, agent, last.user, params, kind="regenerate", **kw)
    except BaseException:
        agent.turns.append(last)
        if agent.cache is not None:
            sync_to_transcript(model, tokenizer, agent)
        raise


def continue_reply(model, tokenizer, agent: Agent, params: TurnParams, *, context_limit: int,
                   turn_id: int, emit: Callable[[Event], None], cancel: threading.Event,
                   source: str, on_start: Callable[[int, int], None] | None = None
                   ) -> TurnResult:
    """Extend the last reply (one that stopped on the length limit) from the cache: no
    re-prefill, only its last token is fed again (the cache holds it, but not the logits after
    it). Moving back that one token is O(1), or checkpoint/rebuild on a sliding-window layer
    that holds its whole window. The last Turn is replaced by the longer one when it completes;
    a cancel leaves it as it was."""
    if not agent.turns:
        raise NothingToDo(f"{agent.agent_id}: no reply to continue yet")
    last = agent.turns[-1]
    eos = set(tokenizer.eos_token_ids)
    if not last.generated_ids or last.generated_ids[-1] in eos:
        raise NothingToDo(f"{agent.agent_id}: the last reply ended on its own; nothing to "
                          "continue (send a message, or regenerate it)")
    t0 = time.perf_counter()
    if agent.cache is None:
        agent.cache, agent.cache_ids = new_cache(model), []
    sync_to_transcript(model, tokenizer, agent)  # a no-op at rest (the invariant holds)
    expected = list(agent.cache_ids)
    n = len(expected)
    if n + params.max_tokens > context_limit:
        raise ContextExhausted(n - 1, 1, params.max_tokens, context_limit)
    rewind = trim_to(agent, n - 1, model)
    cp = kvrewind.checkpoint(agent.cache)
    if on_start:
        on_start(n - 1, 1)
    dec = _Decode(model, tokenizer, agent, params, turn_id=turn_id, emit=emit, cancel=cancel)
    try:
        dec.run(expected[-1:], prefix=last.generated_ids)
    except TurnCancelled as exc:
        agent.cache_ids = (expected + dec.generated)[:cache_offset(agent.cache)]
        agent.dirty = True
        exc.rewind = undo_turn(model, agent, cp, n - 1)  # type: ignore[attr-defined]
        sync_to_transcript(model, tokenizer, agent)
        raise
    t_end = time.perf_counter()
    ids = last.generated_ids + tuple(dec.generated)
    agent.cache_ids = expected + dec.generated
    _settle(model, agent, len(agent.cache_ids))
    reply = dec.reply(ids)
    ttft, decode_s, tok_s = _figures(agent, dec, t0, t_end)
    agent.turns[-1] = Turn(last.user, reply, ids, time.time(),
                           turn_stats(len(ids), tok_s, ttft, n - 1, 1, dec.finish))
    agent.dirty = True
    agent.last_used = time.time()
    return TurnResult(
        agent=agent.agent_id, user=last.user, reply=reply, generated_ids=ids, source=source,
        cached=n - 1, prefilled=1, generated=len(dec.generated),
        in_cache=cache_offset(agent.cache), context_limit=context_limit,
        timing_ms={"prefill": ttft * 1000, "ttft": ttft * 1000, "decode": decode_s * 1000},
        decode_tok_s=tok_s, finish_reason=dec.finish, rewind=rewind, kind="continue",
    )
