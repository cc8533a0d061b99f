"""Prefill as you type: at each pause in typing, the message so far, rendered as Enter would send
it now (the chat template's tail included), goes into the agent's KV cache while the person is
still typing. Enter then finds the whole prompt cached when nothing changed since the pause, or
all of it but the words typed after it (issue 17: the first token after a resume).

The draft's ids sit in the cache after the transcript's (`Agent.draft` says so) until a turn of
the same agent takes them (run_turn's common prefix with its prompt: whatever the person changed
is trimmed, the rest is reused) or any other job drops them first (`drop`): a snapshot, an
export or an eviction never sees a draft. Ids and K/V never disagree: the draft is prefilled
through `generation.prefill`, which extends `cache_ids` chunk by chunk.

A draft is made only where it can be dropped again by trimming (O(1)): never into a
sliding-window layer it would fill (a rotating layer holding its whole window cannot be trimmed;
see `trimmable_at`). Runs on the engine worker thread only. `PERMEANT_DRAFTS=0` turns it off
(the CPU it takes while the person types: about one forward pass of the message per pause).
"""

from __future__ import annotations

import os
import threading

from . import kvcache, kvrewind
from .agent import Agent
from .errors import TurnCancelled
from .generation import common_prefix, prefill, sync_to_transcript, trim_to

DRAFT_CHUNK = 32  # tokens per forward pass: a new job waits at most one chunk
ENV = "PERMEANT_DRAFTS"


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def trimmable_at(cache: list, n: int) -> bool:
    """Every layer could still drop tokens by trimming once it holds n: none is of a kind that
    cannot trim, and no sliding layer would hold its whole window."""
    from mlx_lm.models import cache as c

    return bool(cache) and bool(c.can_trim_prompt_cache(cache)) and all(
        n < int(x.max_size) for x in cache if type(x) is c.RotatingKVCache)


def prepare(model, tokenizer, agent: Agent, text: str, *, context_limit: int,
            cancel: threading.Event | None = None) -> int:
    """Bring the agent's cache to `text` rendered as its next message, as Enter would send it now
    (the chat template's tail included): trim from where it differs from what the cache holds
    (the word that was being typed, the template's tail), prefill the rest. If the person
    presses Enter without changing it, the turn prefills nothing but its last token. Returns how
    many tokens were prefilled (0: nothing new, no room, or the cache could not take it back by
    trimming). A cancel stops between chunks and keeps what was prefilled (a later draft or turn
    reuses it)."""
    if agent.cache is None:
        return 0
    target = agent.prompt_ids(tokenizer, text.strip())
    if len(target) >= context_limit or not trimmable_at(agent.cache, len(target)):
        return 0
    keep = common_prefix(agent.cache_ids, target)
    if not kvrewind.can_rewind(agent.cache, len(agent.cache_ids) - keep):
        return 0
    todo = target[keep:]
    if not todo and keep == len(agent.cache_ids):
        return 0
    agent.draft, agent.draft_logits = True, None
    trim_to(agent, keep)
    done = len(agent.cache_ids)
    try:
        prefill(model, agent, todo[:-1], cancel=cancel, chunk=DRAFT_CHUNK)
        if todo and not (cancel is not None and cancel.is_set()):
            last(model, agent, todo[-1])
    except TurnCancelled:
        pass
    return len(agent.cache_ids) - done


def last(model, agent: Agent, token: int) -> None:
    """Feed the prompt's last token alone, as mlx_lm's generate_step does, and keep the logits
    after it: a turn whose prompt is exactly this samples its first token from them at once
    (generation.take_draft_logits), the same logits its own first forward pass would give."""
    import mlx.core as mx

    logits = model(mx.array([[token]]), cache=agent.cache)[0, -1]
    mx.eval(logits)
    kvcache.eval_cache(agent.cache or [])
    agent.cache_ids.append(token)
    agent.draft_logits = (len(agent.cache_ids), logits)


def drop(model, tokenizer, agent: Agent) -> None:
    """Take the draft out of the cache: it holds exactly the transcript's ids again."""
    if not agent.draft:
        return
    agent.draft, agent.draft_logits = False, None
    if agent.cache is not None:
        sync_to_transcript(model, tokenizer, agent)
