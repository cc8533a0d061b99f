"""Agents in and out of USXF files: export (with a fidelity probe), import (verify, then attach),
fidelity replay, and the `permeant usxf inspect|verify` commands.

Export and import run on the engine worker (they touch MLX arrays). The format itself lives in
engine/usxf and needs no MLX.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

from ..config import AgentSpec
from .agent import Agent, Turn
from .errors import PermeantError, UsxfInvalid, WorkspaceError
from .snapshot import fsync_dir

# Appended directly after the exported KV state: a new user turn and the assistant header.
PROBE_SUFFIX = "\n<|im_start|>user\nContinue.<|im_end|>\n<|im_start|>assistant\n"
PROBE_N = 128  # default probe length (export --probe N, usxf verify --fidelity --probe N)


def _kv_numpy(agent: Agent, n: int) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Copies (not views) of the first n positions of every layer, shaped (kv_heads, n, dim)."""
    import mlx.core as mx

    keys, values = [], []
    dtype = str(agent.cache[0].keys.dtype).removeprefix("mlx.core.")
    for c in agent.cache:
        k, v = c.keys[0, :, :n, :], c.values[0, :, :n, :]
        if k.dtype == mx.bfloat16:
            k, v = k.view(mx.uint16), v.view(mx.uint16)
        keys.append(np.array(k, copy=True))
        values.append(np.array(v, copy=True))
    return keys, values, dtype


def _top2_margin(logprobs) -> float:
    """Top-1 minus top-2 logit (log-softmax keeps differences): how close the greedy choice was."""
    import mlx.core as mx

    top = mx.topk(logprobs.reshape(-1), 2)
    return float(mx.max(top) - mx.min(top))


def greedy_probe(model, agent: Agent, probe_ids: list[int], n: int,
                 margins: list[float] | None = None) -> list[int]:
    """Feed probe_ids after the agent's cache, decode n greedy tokens, then trim back.
    The agent's cache and ids are unchanged afterwards. When `margins` is a list, each step's
    top-2 logit margin is appended to it."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from .generation import trim_to

    base = len(agent.cache_ids)
    out = []
    for tok, logprobs in generate_step(mx.array(probe_ids), model, max_tokens=n,
                                       prompt_cache=agent.cache):
        out.append(int(tok))
        if margins is not None:
            margins.append(_top2_margin(logprobs))
    trim_to(agent, base)
    return out


def make_fidelity(engine, agent: Agent, n: int = PROBE_N):
    from .usxf import Fidelity

    lm = engine.loaded
    probe = lm.tokenizer.encode(PROBE_SUFFIX)
    room = lm.context_limit - len(agent.cache_ids)
    if room < len(probe) + n:
        return Fidelity(probe, [], 0, max(room, 0),
                        note=f"not checked: context room {room} < {len(probe) + n}")
    margins: list[float] = []
    expected = greedy_probe(lm.model, agent, probe, n, margins)
    return Fidelity(probe, expected, n, room, note=f"greedy {n} tokens after the fixed probe prompt",
                    margins=[float(f"{m:.4g}") for m in margins])


def export_agent(engine, agent: Agent, path: str | None, quant: str = "none", *,
                 fidelity: bool | int = True, progress=None, chunk_size: int | None = None):
    """fidelity: True records a probe of PROBE_N tokens, an int N one of N tokens, False or 0
    none."""
    from . import runtime
    from .usxf import AgentRecord, KVPayload, write_usxf
    from .usxf.keys import WorkspaceKeys

    lm = engine.loaded
    ws = engine.ws
    if not agent.turns:
        raise PermeantError(f"agent {agent.agent_id!r} has no conversation to export yet")
    from .generation import sync_to_transcript

    sync_to_transcript(lm.model, lm.tokenizer, agent)
    n = len(agent.cache_ids)
    keys_np, values_np, dtype = _kv_numpy(agent, n)
    probe_n = PROBE_N if fidelity is True else int(fidelity)
    fid = make_fidelity(engine, agent, probe_n) if probe_n > 0 else None
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
        provenance={"runtime": "mlx", "runtime_version": mx.__version__,
                    "device": runtime.device_label(), "weights": lm.weights_mode},
    )


def next_token_kl(lm, agent: Agent, keys_np, values_np, dtype: str, quant: str) -> float:
    """KL(source || receiver) of the next-token distribution after the probe prompt, the
    receiver holding the KV as `quant` delivers it (recorded as quant.error.next_token_kl)."""
    import mlx.core as mx

    from .generation import trim_to
    from .snapshot import attach_payload
    from .usxf import quant as q

    probe = mx.array([lm.tokenizer.encode(PROBE_SUFFIX)])
    base = len(agent.cache_ids)
    src = lm.model(probe, cache=agent.cache)[0, -1].astype(mx.float32)
    trim_to(agent, base)
    cache = attach_payload(lm.model, [q.received(k, dtype, quant, "k") for k in keys_np],
                           [q.received(v, dtype, quant, "v") for v in values_np], dtype,
                           lm.identity.kv_dtype)
    got = lm.model(probe, cache=cache)[0, -1].astype(mx.float32)
    lp, lq = src - mx.logsumexp(src), got - mx.logsumexp(got)
    return max(float(mx.sum(mx.exp(lp) * (lp - lq))), 0.0)


def import_usxf(engine, path: str, name: str | None = None) -> dict:
    """Verify everything, check the identity, then register the agent. On any failure nothing
    in the workspace changes."""
    from .usxf import verify_usxf
    from .usxf.keys import WorkspaceKeys

    lm, ws = engine.loaded, engine.ws
    keys = WorkspaceKeys(ws.keys_dir)
    keys.ensure()
    # Every check, in bounded memory: the tensors are loaded (and verified again) when the
    # agent is first attached.
    f = verify_usxf(path, trusted=keys, expected_identity=lm.identity)
    agent_id = name or f.agent.agent_id
    if agent_id in ws.agents:
        raise WorkspaceError(f"an agent named {agent_id!r} exists already; import with --as NAME")
    turns = []
    for i, t in enumerate(f.agent.turns):
        if "generated_ids" not in t:
            raise UsxfInvalid("agent", f"turn {i} has no generated_ids: this file cannot be "
                              "continued as a chat agent", str(path))
        gen = t["generated_ids"]
        if not isinstance(gen, list) or not all(
                isinstance(x, int) and 0 <= x < lm.identity.vocab_size for x in gen):
            raise UsxfInvalid("agent", f"turn {i}: generated_ids must be token ids below "
                              f"{lm.identity.vocab_size}", str(path))
        turns.append(Turn(t["user"], t["reply"], tuple(gen)))
    probe = Agent(agent_id, f.agent.role, f.agent.title, f.agent.system, turns)
    if probe.expected_ids(lm.tokenizer) != list(f.token_ids):
        raise UsxfInvalid("tokens", "the token ids do not match the transcript rendered with "
                          "this model's chat template", str(path))
    dest = ws.imported_path(agent_id)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        shutil.copyfile(path, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        title = f.agent.title if agent_id == f.agent.agent_id else agent_id.capitalize()
        ws.add_agent(AgentSpec(agent_id, f.agent.role, title, f.agent.system), turns)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if agent_id not in ws.agents:
            ws.delete_agent_files(agent_id)
        raise
    return {"agent": agent_id, "tokens": f.n_tokens, "key_id": f.key_id, "quant": f.quant,
            "digest": f.digest}


def replay_fidelity(engine, agent_id: str) -> str:
    """Replay the exporter's probe on an imported agent: exact N/N, diverged at k, or not
    checked (context exhaustion is reported as such, never as a migration defect)."""
    from .usxf import verify_usxf
    from .usxf.keys import WorkspaceKeys

    ws, lm = engine.ws, engine.loaded
    agent = ws.agent(agent_id)
    src = ws.imported_path(agent_id)
    if not src.exists():
        raise PermeantError(f"{agent_id} has no imported USXF file to check")
    f = verify_usxf(src, trusted=WorkspaceKeys(ws.keys_dir), expected_identity=lm.identity)
    engine._restore(agent)
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
    got = greedy_probe(lm.model, agent, fid.probe_prompt_ids, n)
    return probe_verdict(got, fid.expected_ids[:n], fid.margins)


def probe_verdict(got: list[int], expected: list[int], margins: list[float] | None) -> str:
    n = len(expected)
    k = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    if k is None:
        return f"exact {n}/{n}"
    where = f"diverged at {k} ({k}/{n} matched"
    if margins is not None and k < len(margins):
        return f"{where}; source top-2 margin {margins[k]:.3g} there)"
    return f"{where}; no source margins recorded)"


# ---- `permeant usxf ...` ----------------------------------------------------------------------

def _manifest_json(f) -> dict:
    def clean(v):
        if isinstance(v, bytes):
            return v.hex()
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(dict(f.manifest))


def cli_inspect(args) -> int:
    from .usxf import read_usxf

    f = read_usxf(args.file, trusted=None)
    m = _manifest_json(f)
    if args.json:
        print(json.dumps({"file": str(args.file), "size": f.size, "payload_digest": f.digest,
                          "key_id": f.key_id, "manifest": m}, indent=2))
        return 0
    ident = f.identity
    print(f"USXF {args.file}  ({f.size / 1e6:.2f} MB)")
    print(f"  version      {m.get('format_version', m.get('version'))}")
    print(f"  model        {ident.name}  [{ident.architecture}]  fingerprint {ident.fingerprint}")
    print(f"  attention    {ident.n_layers} layers, {ident.n_heads} heads, {ident.n_kv_heads} kv "
          f"heads, head dim {ident.head_dim}, RoPE base {ident.rope_theta:g} "
          f"{ident.rope_layout}, sliding window {ident.sliding_window or 'none'}")
    print(f"  tokens       {f.n_tokens}")
    print(f"  quant        {f.quant}")
    print(f"  agent        {f.agent.agent_id} ({f.agent.role}), {len(f.agent.turns)} turns")
    if f.fidelity:
        print(f"  fidelity     probe of {f.fidelity.n} tokens, room {f.fidelity.context_room}"
              f"{'; ' + f.fidelity.note if f.fidelity.note else ''}")
    print(f"  signed by    {f.key_id}  (signature valid; trust is checked by `usxf verify`)")
    print(f"  digest       {f.digest}")
    return 0


def cli_verify(args) -> int:
    from ..paths import resolve_workspace
    from .usxf import UsxfUntrustedKey, verify_usxf
    from .usxf.keys import WorkspaceKeys

    keys = WorkspaceKeys(resolve_workspace(args.workspace) / "keys")
    keys.ensure()
    try:
        f = verify_usxf(args.file, trusted=keys)
    except UsxfUntrustedKey as exc:
        print(f"permeant: untrusted: {exc} (trust it with `permeant keys trust PUBKEY`)",
              file=sys.stderr)
        return 6
    except UsxfInvalid as exc:
        print(f"permeant: invalid: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"ok: {args.file}: {f.n_tokens} tokens, {f.size / 1e6:.2f} MB, quant {f.quant}, "
          f"signed by trusted key {f.key_id}")
    if args.fidelity:
        print(f"fidelity: {fidelity_of_file(args)}")
    return 0


def fidelity_of_file(args) -> str:
    """Attach the file to a scratch agent (not in any workspace) and replay its probe."""
    from .models import load_model
    from .snapshot import attach_payload
    from .usxf import read_usxf

    lm = load_model(args.model)
    f = read_usxf(args.file, trusted=None, expected_identity=lm.identity)
    kv = f.load_kv()
    agent = Agent("probe", "probe", "probe", "")
    agent.cache = attach_payload(lm.model, kv.keys, kv.values, kv.dtype, lm.identity.kv_dtype)
    agent.cache_ids = list(f.token_ids)
    return compare_probe(lm, agent, f.fidelity, getattr(args, "probe", None))
