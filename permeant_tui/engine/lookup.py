"""Prompt-lookup decoding: drafts taken from the context itself, verified in one forward pass.

A coordinator restates its colleagues: long runs of its reply already sit in its context. At
each step the last NGRAM tokens generated so far are looked up in the context (the most recent
earlier occurrence, from NGRAM tokens down to 2); the up to DRAFT tokens that followed are the
draft. The model reads the last token and the draft in one pass; the sampler then runs at each
position in order, exactly as a one-token step would (same logits processors over the same
history), and the draft is kept while its tokens are the ones sampled. The first disagreement
is replaced by the sampled token, and the cache drops the positions that were not kept. So every
token comes from the model's own distribution given the tokens before it: greedy output equals
plain decoding's (up to the float rounding of a wider matrix product), and sampled output has the
same distribution (not the same draws for a seed).

Only for caches that can always be trimmed (full and quantized layers; a sliding-window layer
that holds its whole window cannot drop tokens).

Off unless `PERMEANT_LOOKUP=1`: on the CPU device a pass over k + 1 tokens costs 1.7x (k = 1) to
2.5x (k = 8) a one-token step, whose one-row products go through sgemv (engine/blas.py), so the
coordinator's replies came out at x0.92-0.95 of plain decoding with half the drafts kept
(bench/lookup.py). On Metal, where one step is bound by reading the weights, a wider pass costs
little more; not measured here (no Mac).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

NGRAM = 4
MIN_MATCH = int(os.environ.get("PERMEANT_LOOKUP_MIN", "3"))  # a shorter match drafts noise
DRAFT = 8  # the most tokens one pass verifies; the length adapts to what is kept


def enabled() -> bool:
    return os.environ.get("PERMEANT_LOOKUP") == "1"


def find_draft(ids: list[int], ngram: int = NGRAM, k: int = DRAFT, least: int = MIN_MATCH
               ) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens of
    `ids` (n from `ngram` down to `least`); [] when there is none."""
    for n in range(min(ngram, len(ids) - 1), least - 1, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == tail:
                return ids[start + n:start + n + k]
    return []


def lookup_generate_step(prompt: list[int], model, *, context: list[int], max_tokens: int,
                         sampler: Callable, logits_processors: list | None, prompt_cache: list,
                         prefill_step_size: int = 512,
                         prompt_progress_callback: Callable[[int, int], None] | None = None,
                         on_draft: Callable[[int, int], None] | None = None,
                         ) -> Iterator[tuple[int, None]]:
    """mlx-lm's `generate_step` contract for what Permeant uses of it: prefill `prompt` (the
    part of the context not in the cache) in chunks, then yield (token, None) up to max_tokens.
    `context`: the ids already in the cache (drafts are looked up in context + prompt + reply).
    After a token is yielded the cache may hold a few more positions than the tokens so far
    (the caller trims to its ids, as after generate_step). `on_draft(proposed, kept)` is told
    each verification."""
    import mlx.core as mx

    from . import kvrewind

    progress = prompt_progress_callback or (lambda *_: None)
    total, done = len(prompt), 0
    progress(0, total)
    while total - done > 1:
        n = min(prefill_step_size, total - done - 1)
        model(mx.array([prompt[done:done + n]]), cache=prompt_cache)
        mx.eval([c.state for c in prompt_cache])
        done += n
        progress(done, total)
    history = list(prompt[:done])  # what the logits processors see, as in generate_step
    seen = list(context) + list(prompt)
    feed = list(prompt[done:])
    produced, k = 0, DRAFT // 2
    while produced < max_tokens:
        draft = find_draft(seen, k=k) if produced > 0 else []
        draft = draft[:max(0, max_tokens - produced - 1)]
        logits = model(mx.array([feed + draft]), cache=prompt_cache)[0, len(feed) - 1:]
        history.extend(feed)
        kept = 0
        for i in range(len(draft) + 1):
            row = logits[i:i + 1]
            if logits_processors:
                hist = mx.array(history)
                for proc in logits_processors:
                    row = proc(hist, row)
            tok = int(sampler(row - mx.logsumexp(row, keepdims=True)).item())
            produced += 1
            seen.append(tok)
            yield tok, None
            if i < len(draft) and tok == draft[i] and produced < max_tokens:
                history.append(tok)
                kept += 1
                continue
            break
        if draft:
            # on CPU a pass over k + 1 tokens costs more than one step: draft long only while
            # drafts are kept
            k = min(DRAFT, k * 2) if kept == len(draft) else max(1, kept or k // 2)
            if on_draft is not None:
                on_draft(len(draft), kept)
        extra = len(draft) - kept
        if extra:
            kvrewind.rewind(prompt_cache, extra)
        feed = [tok]
