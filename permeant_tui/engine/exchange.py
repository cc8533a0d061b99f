"""Agents in and out of USXF files: export (with a fidelity probe), import (verify, then attach),
fidelity replay (of an imported agent, or of a file on a scratch agent). Returns reports; the
CLI (cli/exchange.py) prints them.

Export and import run on the engine worker (they touch MLX arrays); each takes what it needs
(the loaded model, the workspace, a way to make an agent resident), never the engine. The
format itself lives in engine/usxf and needs no MLX.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .agent import Agent, Turn
from .atomic import write_atomic
from .errors import InvalidTokenIds, PermeantError, UsxfInvalid, WorkspaceError
from .names import check_agent_name
from .settings import AgentSpec
from .token_ids import checked_ids
from .usxf.spec import PROBE_N  # default probe length (export --probe N, verify --probe N)

if TYPE_CHECKING:
    from .models import LoadedModel
    from .workspace import Workspace

# Appended directly after the exported KV state: a new user turn and the assistant header.
PROBE_SUFFIX = "\n<|im_start|>user\nContinue.<|im_end|>\n<|im_start|>assistant\n"


def _kv_numpy(agent: Agent, n: int) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Copies (not views) of every layer's logical K/V after n tokens, shaped (kv_heads, L_i,
    dim): L_i = n on full layers, min(n, window) on sliding ones (USXF 1.1)."""
    from .kvlayers import logical_kv

    assert agent.cache is not None, "the agent is made resident before an export"
    return logical_kv(agent.cache, n)


def _top2_margin(logprobs) -> float:
    """Top-1 minus top-2 logit (log-softmax keeps differences): how close the greedy choice was."""
    import mlx.core as mx

    top = mx.topk(logprobs.reshape(-1), 2)
    return float(mx.max(top) - mx.min(top))


def greedy_probe(model, agent: Agent, probe_ids: list[int], n: int,
                 margins: list[float] | None = None) -> list[int]:
    """Feed probe_ids after the agent's cache, decode n greedy tokens. Runs on a copy of the
    cache: the agent's cache and ids are unchanged afterwards, even when the probe fails. When
    `margins` is a list, each step's top-2 logit margin is appended to it."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from .kvcache import copy_cache

    assert agent.cache is not None, "the agent is made resident before a probe"
    out = []
    for tok, logprobs in generate_step(mx.array(probe_ids), model, max_tokens=n,
                                       prompt_cache=copy_cache(agent.cache)):
        out.append(int(tok))
        if margins is not None:
            margins.append(_top2_margin(logprobs))
    return out


def make_fidelity(lm: LoadedModel, agent: Agent, n: int = PROBE_N):
    from .usxf import Fidelity

    probe = lm.tokenizer.encode(PROBE_SUFFIX)
    room = lm.context_limit - len(agent.cache_ids)
    if room < len(probe) + n:
        return Fidelity(probe, [], 0, max(room, 0),
                        note=f"not checked: context room {room} < {len(probe) + n}")
    margins: list[float] = []
    expected = greedy_probe(lm.model, agent, probe, n, margins)
    return Fidelity(probe, expected, n, room, note=f"greedy {n} tokens after the fixed probe prompt",
                    margins=[float(f"{m:.4g}") for m in margins])


def export_agent(lm: LoadedModel, ws: Workspace, agent: Agent, path: str | Path | None,
                 quant: str = "none", *, fidelity: bool | int = True, progress=None,
                 chunk_size: int | None = None):
    """Write a USXF file of the agent's KV state (made to match its transcript first).
    fidelity: True records a probe of PROBE_N tokens, an int N one of N tokens, False or 0
    none."""
    from . import runtime
    from .usxf import AgentRecord, KVPayload, write_usxf
    from .usxf.keys import WorkspaceKeys

    if not agent.turns:
        raise PermeantError(f"agent {agent.agent_id!r} has no conversation to export yet")
    from .generation import sync_to_transcript

    sync_to_transcript(lm.model, lm.tokenizer, agent)
    n = len(agent.cache_ids)
    keys_np, values_np, dtype = _kv_numpy(agent, n)
    probe_n = PROBE_N if fidelity is True else int(fidelity)
    fid = make_fidelity(lm, agent, probe_n) if probe_n > 0 else None
    spans = agent.turn_spans(lm.tokenizer)
    turns = [{"user": t.user, "reply": t.reply, "span": list(s),
              "generated_ids": list(t.generated_ids)} for t, s in zip(agent.turns, spans, strict=False)]
    record = AgentRecord(agent.agent_id, agent.role, agent.title, agent.system, turns)
    if path is None:
        ws.exports_dir.mkdir(parents=True, exist_ok=True)
        path = ws.exports_dir / f"{agent.agent_id}-{time.strftime('%Y%m%d-%H%M%S')}.usxf"
    keys = WorkspaceKeys(ws.keys_dir)
    keys.ensure()
    import mlx.core as mx

    kl = {} if quant == "none" else {"next_token_kl": next_token_kl(lm, agent, keys_np, values_np,
                                                                      dtype, quant)}
    return write_usxf(
        path, identity=lm.identity, token_ids=list(agent.cache_ids),
        kv=KVPayload(keys_np, values_np, dtype), agent=record, keys=keys, quant=quant,
        fidelity=fid, progress=progress, error_extra=kl,
        **({"chunk_size": chunk_size} if chunk_size else {}),  # migration tests use small chunks
        provenance={"runtime": "mlx",
                    "runtime_version": mx.__version__,  # type: ignore[attr-defined]
                    "device": runtime.device_label(), "weights": lm.weights_mode},
    )


def next_token_kl(lm: LoadedModel, agent: Agent, keys_np, values_np, dtype: str,
                  quant: str) -> float:
    """KL(source || receiver) of the next-token distribution after the probe prompt, the
    receiver holding the KV as `quant` delivers it (recorded as quant.error.next_token_kl)."""
    import mlx.core as mx

    from .kvcache import copy_cache
    from .snapshot import attach_payload
    from .usxf import quant as q

    assert agent.cache is not None, "the agent is made resident before an export"
    probe = mx.array([lm.tokenizer.encode(PROBE_SUFFIX)])
    src = lm.model(probe, cache=copy_cache(agent.cache))[0, -1].astype(mx.float32)
    cache = attach_payload(lm.model, [q.received(k, dtype, quant, "k") for k in keys_np],
                           [q.received(v, dtype, quant, "v") for v in values_np], dtype,
                           lm.identity.kv_dtype, len(agent.cache_ids))
    got = lm.model(probe, cache=cache)[0, -1].astype(mx.float32)
    lp, lq = src - mx.logsumexp(src), got - mx.logsumexp(got)
    return max(float(mx.sum(mx.exp(lp) * (lp - lq))), 0.0)


def import_usxf(lm: LoadedModel, ws: Workspace, path: str, name: str | None = None) -> dict:
    """Verify everything, check the identity, then register the agent. On any failure nothing
    in the workspace changes."""
    from .usxf import verify_usxf
    from .usxf.keys import WorkspaceKeys

    if name is not None:
        check_agent_name(name)  # before any file is read or written
    keys = WorkspaceKeys(ws.keys_dir)
    keys.ensure()
    # Every check, in bounded memory: the tensors are loaded (and verified again) when the
    # agent is first attached.
    f = verify_usxf(path, trusted=keys, expected_identity=lm.identity)
    agent_id = check_agent_name(name if name is not None else f.agent.agent_id)
    existing = ws.find_agent(agent_id)
    replaced = None
    if existing is not None:
        n = len(ws.agents[existing].turns)
        if n:
            raise WorkspaceError(f"agent '{existing}' exists and has {n} turn"
                                 f"{'s' if n > 1 else ''}; import with --as NEW_NAME (or reset "
                                 f"'{existing}' first)")
        agent_id = replaced = existing  # an agent with no conversation gives way to the import
    turns = []
    for i, t in enumerate(f.agent.turns):
        if "generated_ids" not in t:
            raise UsxfInvalid("agent", f"turn {i} has no generated_ids: this file cannot be "
                              "continued as a chat agent", str(path))
        gen = t["generated_ids"]
        if not isinstance(gen, list):
            raise UsxfInvalid("agent", f"turn {i}: generated_ids must be a list", str(path))
        try:
            gen = checked_ids(gen, lm.identity.vocab_size, f"turn {i} generated_ids")
        except InvalidTokenIds as exc:
            raise UsxfInvalid("agent", str(exc), str(path)) from None
        turns.append(Turn(t["user"], t["reply"], tuple(gen)))
    probe = Agent(agent_id, f.agent.role, f.agent.title, f.agent.system, turns)
    if probe.expected_ids(lm.tokenizer) != list(f.token_ids):
        raise UsxfInvalid("tokens", "the token ids do not match the transcript rendered with "
                          "this model's chat template", str(path))
    d = ws.agent_dir(agent_id)
    dest = ws.imported_path(agent_id)
    transcript = d / "transcript.jsonl"
    created = [p for p in (d, dest, transcript) if not p.exists()]

    def copy(out) -> None:
        with open(path, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)

    try:
        write_atomic(dest, copy)
        title = f.agent.title if agent_id == f.agent.agent_id else agent_id.capitalize()
        ws.add_agent(AgentSpec(agent_id, f.agent.role, title, f.agent.system), turns,
                     replace=replaced is not None)
    except BaseException:
        if replaced is not None or agent_id not in ws.agents:
            ws.delete_created(agent_id, created)
        raise
    return {"agent": agent_id, "tokens": f.n_tokens, "key_id": f.key_id, "quant": f.quant,
            "digest": f.digest, "replaced": replaced}


def replay_fidelity(lm: LoadedModel, ws: Workspace, agent_id: str,
                    restore: Callable[[Agent], object]) -> str:
    """Replay the exporter's probe on an imported agent: exact N/N, diverged at k, or not
    checked (context exhaustion is reported as such, never as a migration defect). `restore`
    makes the agent resident (the engine's, so that residency limits apply)."""
    from .usxf import verify_usxf
    from .usxf.keys import WorkspaceKeys

    agent = ws.agent(agent_id)
    src = ws.imported_path(agent_id)
    if not src.exists():
        raise PermeantError(f"{agent_id} has no imported USXF file to check")
    f = verify_usxf(src, trusted=WorkspaceKeys(ws.keys_dir), expected_identity=lm.identity)
    restore(agent)
    return compare_probe(lm, agent, f.fidelity)


def compare_probe(lm, agent: Agent, fid, n: int | None = None) -> str:
    """Replay the probe (its first n tokens when n is given): "exact N/N", "diverged at k (k/N
    matched; source top-2 margin m there)", or "not checked: ..." (never a defect)."""
    if fid is None:
        return "not checked: the file carries no fidelity probe"
    if fid.n == 0:
        return fid.note or "not checked: no probe recorded"
    n = fid.n if n is None else max(1, min(n, fid.n))
    room = lm.context_limit - len(agent.cache_ids)
    if room < len(fid.probe_prompt_ids) + n:
        return f"not checked: context room {room} < {len(fid.probe_prompt_ids) + n}"
    vocab = lm.identity.vocab_size
    probe = checked_ids(fid.probe_prompt_ids, vocab, "fidelity probe_prompt_ids")
    checked_ids(fid.expected_ids, vocab, "fidelity expected_ids")
    got = greedy_probe(lm.model, agent, probe, n)
    return probe_verdict(got, fid.expected_ids[:n], fid.margins)


def probe_verdict(got: list[int], expected: list[int], margins: list[float] | None) -> str:
    """"exact N/N", or where the first token differs and the source's top-2 margin there."""
    n = len(expected)
    k = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    if k is None:
        return f"exact {n}/{n}"
    where = f"diverged at {k} ({k}/{n} matched"
    if margins is not None and k < len(margins):
        return f"{where}; source top-2 margin {margins[k]:.3g} there)"
    return f"{where}; no source margins recorded)"


def file_fidelity(path, model: str | None = None, n: int | None = None) -> str:
    """Attach a USXF file to a scratch agent (not in any workspace) on `model` (default: the
    embedded one) and replay its fidelity probe (its first n tokens when n is given): the
    result as `compare_probe` words it."""
    from .models import load_model
    from .snapshot import attach_payload
    from .usxf import read_usxf

    lm = load_model(model)
    f = read_usxf(path, trusted=None, expected_identity=lm.identity)
    kv = f.load_kv()
    agent = Agent("probe", "probe", "probe", "")
    agent.cache = attach_payload(lm.model, kv.keys, kv.values, kv.dtype, lm.identity.kv_dtype,
                                 len(f.token_ids))
    agent.cache_ids = list(f.token_ids)
    return compare_probe(lm, agent, f.fidelity, n)
