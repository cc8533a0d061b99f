"""Prefill as you type: the words typed so far go into the agent's KV cache while the person is
still typing, so Enter finds most of the prompt already cached and the first token waits only
for the last word and the chat template's tail (issue 17: the first token after a resume).

The draft's ids sit in the cache after the transcript's (`Agent.draft` says so) until a turn of
the same agent takes them (run_turn's common prefix with its prompt: whatever the person changed
is trimmed, the rest is reused) or any other job drops them first (`drop`): a snapshot, an
export or an eviction never sees a draft. Ids and K/V never disagree: the draft is prefilled
through `generation.prefill`, which extends `cache_ids` chunk by chunk.

A draft is made only where it can be dropped again by trimming (O(1)): never into a
sliding-window layer it would fill (a rotating layer holding its whole window cannot be trimmed;
see `trimmable_at`). Runs on the engine worker thread only.
"""

from __future__ import annotations

import threading

from . import kvcache
from .agent import Agent
from .errors import TurnCancelled
from .generation import common_prefix, prefill, sync_to_transcript, trim_to

DRAFT_CHUNK = 32  # tokens per forward pass: a new job waits at most one chunk
PROBES = (" x", "\ny")  # two different continuations: where they part, the draft ends


def trimmable_at(cache: list, n: int) -> bool:
    """Every layer could still drop tokens by trimming once it holds n: none is of a kind that
    cannot trim, and no sliding layer would hold its whole window."""
    from mlx_lm.models import cache as c

    return bool(cache) and bool(c.can_trim_prompt_cache(cache)) and all(
        n < int(x.max_size) for x in cache if type(x) is c.RotatingKVCache)


def stable_ids(agent: Agent, tokenizer, text: str) -> list[int]:
    """The prompt ids that stay whatever is typed next: the text up to its last whitespace (the
    word being typed may still change, and with it its tokens), rendered with the chat template
    and cut where two different continuations of it part."""
    cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
    base = text[:cut].rstrip() if cut >= 0 else ""
    a, b = (agent.prompt_ids(tokenizer, base + probe) for probe in PROBES)
    return a[:common_prefix(a, b)]


def prepare(model, tokenizer, agent: Agent, text: str, *, context_limit: int,
            cancel: threading.Event | None = None) -> int:
    """Bring the agent's cache to the stable part of `text` rendered as its next message: trim
    what no longer matches, prefill the rest. Returns how many tokens were prefilled (0: nothing
    new, no room, or the cache could not take it back by trimming). A cancel stops between
    chunks and keeps what was prefilled (a later draft or turn reuses it)."""
    if agent.cache is None:
        return 0
    target = stable_ids(agent, tokenizer, text)
    if len(target) >= context_limit or not trimmable_at(agent.cache, len(target)):
        return 0
    keep = common_prefix(agent.cache_ids, target)
    if not kvcache.can_rewind(agent.cache, len(agent.cache_ids) - keep):
        return 0
    todo = target[keep:]
    if not todo and keep == len(agent.cache_ids):
        return 0
    agent.draft = True
    trim_to(agent, keep)
    done = len(agent.cache_ids)
    try:
        prefill(model, agent, todo, cancel=cancel, chunk=DRAFT_CHUNK)
    except TurnCancelled:
        pass
    return len(agent.cache_ids) - done


def drop(model, tokenizer, agent: Agent) -> None:
    """Take the draft out of the cache: it holds exactly the transcript's ids again."""
    if not agent.draft:
        return
    agent.draft = False
    if agent.cache is not None:
        sync_to_transcript(model, tokenizer, agent)
