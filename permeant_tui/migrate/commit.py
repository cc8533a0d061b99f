"""The target's checks and the commit: the agent record is checked when a migration opens,
the staged file is verified at prepare, and commit attaches it (KV mode: import, restore,
fidelity probe; re-prefill mode: rebuild the KV from the signed transcript, probe, register).

Worker-side steps run through `engine.call(fn)` (fn gets the engine's WorkerContext); the
functions that wait on the engine (`commit_staged`) must run on a thread that is not the
engine worker (the routes use asyncio.to_thread).
"""

from __future__ import annotations

import time

from ..engine.errors import UsxfInvalid
from .staging import Staged, sync_file


def check_record(ctx, parsed) -> list:
    """On the worker. The agent record must be a chat agent whose transcript renders to exactly
    the token ids (with this target's chat template), every generated id inside the vocabulary.
    Returns the turns. Same rule as exchange.import_usxf."""
    from ..engine.agent import Agent, Turn

    lm = ctx.model
    vocab = lm.identity.vocab_size
    turns = []
    for i, t in enumerate(parsed.agent.turns):
        gen = t.get("generated_ids")
        if not isinstance(gen, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < vocab for x in gen):
            raise UsxfInvalid("agent", f"turn {i} has no usable generated_ids (token ids below "
                                       f"{vocab}): this state cannot be continued as a chat agent")
        turns.append(Turn(t["user"], t["reply"], tuple(gen)))
    a = parsed.agent
    probe = Agent(a.agent_id, a.role, a.title, a.system, turns)
    if probe.expected_ids(lm.tokenizer) != parsed.token_ids.tolist():
        raise UsxfInvalid("tokens", "the token ids do not match the transcript rendered with this "
                                    "target's chat template")
    return turns


def verify_staged(m: Staged, trusted: dict, identity) -> None:
    """Prepare, KV mode (on a thread): make the staged file durable, then check every byte, the
    signature and the identity; it must be the file announced at open."""
    from ..engine.usxf import verify_usxf

    sync_file(m)
    f = verify_usxf(m.file, trusted=trusted, expected_identity=identity)
    if f.digest != m.digest:
        raise UsxfInvalid("payload-digest", "the staged file is not the announced one")


def commit_staged(engine, m: Staged) -> dict:
    """Attach the prepared migration; the agent is registered last (one atomic settings write),
    so a failure before that leaves nothing. Returns the report the source is sent."""
    if m.mode == "kv":
        return _commit_kv(engine, m)
    return engine.call(lambda ctx: _commit_reprefill(ctx, m)).result()


def _commit_kv(engine, m: Staged) -> dict:
    t0 = time.perf_counter()
    out: dict = {"agent": m.name, "mode": m.mode, "tokens": len(m.parsed.token_ids)}
    report = engine.import_usxf(str(m.file), m.name).result()  # verify again, copy, register
    out.update(key_id=report["key_id"], quant=report["quant"], digest=report["digest"])
    out["import_ms"] = (time.perf_counter() - t0) * 1000

    def attach(ctx) -> dict:
        from ..engine.exchange import compare_probe

        got: dict = {}
        t1 = time.perf_counter()
        restored = ctx.restore(m.name)  # read + attach: the state is resident now
        got["restore_ms"] = (time.perf_counter() - t1) * 1000
        got["restored_from"] = restored.source
        t2 = time.perf_counter()
        got["fidelity"] = compare_probe(ctx.model, ctx.workspace.agent(m.name), m.parsed.fidelity)
        got["fidelity_ms"] = (time.perf_counter() - t2) * 1000
        return got

    try:  # committed already: what follows is a report, never a failure of the commit
        out.update(engine.call(attach).result())
    except Exception as exc:  # noqa: BLE001
        out["fidelity"] = f"not checked: {type(exc).__name__}: {exc}"
    out["attach_ms"] = out["import_ms"] + out.get("restore_ms", 0.0)
    return out


def _commit_reprefill(ctx, m: Staged) -> dict:
    """On the worker: rebuild the KV from the signed transcript, check the probe, register."""
    from ..engine.agent import Agent
    from ..engine.exchange import compare_probe
    from ..engine.generation import new_cache, prefill
    from ..engine.settings import AgentSpec

    t0 = time.perf_counter()
    out: dict = {"agent": m.name, "mode": m.mode, "tokens": len(m.parsed.token_ids)}
    lm, ws = ctx.model, ctx.workspace
    a = m.parsed.agent
    agent = Agent(m.name, a.role, a.title, a.system, list(m.turns))
    ids = agent.expected_ids(lm.tokenizer)
    agent.cache, agent.cache_ids = new_cache(lm.model), []
    prefill(lm.model, agent, ids)
    out["prefill_ms"] = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    fidelity = compare_probe(lm, agent, m.parsed.fidelity)
    out["fidelity_ms"] = (time.perf_counter() - t1) * 1000
    registered = ws.add_agent(AgentSpec(m.name, a.role, a.title, a.system), list(m.turns))
    registered.cache, registered.cache_ids = agent.cache, agent.cache_ids
    registered.source, registered.dirty = "prefill", True
    ctx.restore(m.name)  # resident already: applies the residency limits
    out["fidelity"] = fidelity
    out["attach_ms"] = (time.perf_counter() - t0) * 1000
    return out
