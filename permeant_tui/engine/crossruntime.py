"""USXF across runtimes: attach an export in llama.cpp and continue, or capture llama.cpp's
state as a USXF file that `permeant import` attaches in MLX. And the warm-start cost model.

The first continued token's logits: a llama.cpp sequence state holds KV cells, never logits.
We attach the KV of all tokens but the last and replay the last one with a one-token decode
(what llama-server does with a cached prompt); see docs/USXF.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ContextExhausted, ModelLoadError, PermeantError, UsxfInvalid

# Identity fields that must match between the file and the target GGUF. kv_dtype is not among
# them: the target converts the payload to its own KV type (f32 here, so nothing is rounded).
_MATCH = ("architecture", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size",
          "vocab_size", "rope_theta", "rope_scaling", "sliding_window", "weights_digest",
          "tokenizer_digest")


def gguf_identity(gguf: Path, digest_cache: Path | None = None):
    """The ModelIdentity fields of a GGUF that do not need an MLX model (kv_dtype='float32')."""
    from .gguf import model_args, read_gguf
    from .gguf_tokenizer import tokenizer_from_gguf
    from .identity import file_digest
    from .models import _identity

    _, meta = read_gguf(gguf)
    args = model_args(meta, gguf)
    tok = tokenizer_from_gguf(meta, gguf)
    return _identity(str(meta.get("general.name") or gguf.stem), str(meta["general.architecture"]),
                     args, file_digest(gguf, digest_cache), tok, "float32",
                     int(args["max_position_embeddings"])), tok


def check_identity(file_identity, target_identity, path: str) -> None:
    diff = [f for f in _MATCH if getattr(file_identity, f) != getattr(target_identity, f)]
    if diff:
        raise UsxfInvalid("model-identity", "the GGUF is not the model this state was made by: "
                          + ", ".join(f"{f} {getattr(file_identity, f)!r} != "
                                      f"{getattr(target_identity, f)!r}" for f in diff), path)


@dataclass
class CostModel:
    """Warm start: attach the USXF or re-prefill the transcript, whichever is faster here."""

    prefill_tok_s: float
    prefill_fixed_s: float
    attach_mb_s: float
    attach_fixed_s: float
    measured_at: float

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_fixed_s + tokens / self.prefill_tok_s

    def attach_s(self, nbytes: int) -> float:
        return self.attach_fixed_s + nbytes / 1e6 / self.attach_mb_s

    def decide(self, tokens: int, nbytes: int) -> tuple[str, float, float]:
        a, p = self.attach_s(nbytes), self.prefill_s(tokens)
        return ("attach" if a <= p else "re-prefill"), a, p


def calibrate(rt, cache_file: Path | None) -> CostModel:
    """Measured once per GGUF and machine (cached): prefill 64 and 320 tokens, attach a
    synthetic 256-token state."""
    if cache_file is not None and cache_file.exists():
        try:
            return CostModel(**json.loads(cache_file.read_text()))
        except (ValueError, TypeError):
            pass
    from .llamacpp import build_seq_state

    ids = [int(i) for i in np.random.default_rng(0).integers(100, 10000, 320)]
    times = {}
    for n in (64, 320):
        t = time.perf_counter()
        rt.prefill(ids[:n])
        times[n] = time.perf_counter() - t
    tok_s = (320 - 64) / max(times[320] - times[64], 1e-6)
    fixed = max(times[64] - 64 / tok_s, 0.0)
    shape = (rt.n_kv_heads, 256, rt.head_dim)
    kv = [np.zeros(shape, np.float32) for _ in range(rt.n_layers)]
    blob = build_seq_state(list(range(256)), kv, kv, kv_dtype=rt.kv_dtype, v_trans=rt.v_trans)
    t = time.perf_counter()
    rt.set_seq_state(blob)
    attach_s = time.perf_counter() - t
    t = time.perf_counter()
    rt.set_seq_state(blob, fresh=False)
    cleared = time.perf_counter() - t
    mb_s = len(blob) / 1e6 / max(cleared, 1e-6)
    model = CostModel(tok_s, fixed, mb_s, max(attach_s - cleared, 0.0), time.time())
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(model.__dict__))
    return model


def attach_usxf(path: str, gguf: Path, n_continue: int, trusted, *, threads: int = 2,
                digest_cache: Path | None = None, out=print) -> dict:
    from .llamacpp import LlamaCppRuntime, build_seq_state, permute_k_heads
    from .usxf import read_usxf

    t0 = time.perf_counter()
    f = read_usxf(path, trusted=trusted)
    verify_s = time.perf_counter() - t0
    target, tok = gguf_identity(gguf, digest_cache)
    check_identity(f.identity, target, str(path))
    ids = list(f.token_ids)
    n = len(ids)
    limit = target.context_limit
    if n + n_continue > limit:
        raise ContextExhausted(n, 0, n_continue, limit)
    out(f"verified {path}: {n} tokens, quant {f.quant}, signed by {f.key_id} "
        f"({verify_s * 1000:.0f} ms)")
    try:
        probe_len = len(f.fidelity.probe_prompt_ids) + f.fidelity.n if f.fidelity else 0
        rt = LlamaCppRuntime(str(gguf), n_ctx=min(limit, max(n + max(n_continue, probe_len) + 64, 512)), kv_dtype="f32",
                             n_threads=threads)
    except ImportError as exc:
        raise ModelLoadError(f"llama.cpp runtime unavailable: {exc}") from None
    from ..paths import cache_dir

    cm = calibrate(rt, cache_dir() / f"costmodel-llamacpp-{target.weights_digest[:16]}.json")
    t = time.perf_counter()
    kv = f.load_kv()
    keys = [np.asarray(k, np.float32) for k in kv.keys]
    values = [np.asarray(v, np.float32) for v in kv.values]
    if f.identity.rope_layout != "interleaved":  # llama.cpp's llama GGUF K is interleaved
        keys = [permute_k_heads(k, f.identity.rope_layout, "interleaved") for k in keys]
    m = n - 1
    blob = build_seq_state(list(range(m)), [k[:, :m] for k in keys], [v[:, :m] for v in values],
                           kv_dtype=rt.kv_dtype, v_trans=rt.v_trans)
    rt.set_seq_state(blob, ids[:m])
    attach_s = time.perf_counter() - t
    decision, est_a, est_p = cm.decide(n, len(blob))
    out(f"warm start: attach est {est_a * 1000:.0f} ms vs re-prefill est {est_p * 1000:.0f} ms "
        f"({n} tokens at {cm.prefill_tok_s:.0f} tok/s) -> {decision}; "
        f"attached in {attach_s * 1000:.0f} ms (blob {len(blob) / 1e6:.1f} MB)")
    got = rt.greedy(n_continue, from_ids_tail=ids[-1:])
    text = tok.decode(got)
    out(f"continued {n_continue} tokens in llama.cpp: {got}")
    out(f"text: {text!r}")
    probe = None
    if f.fidelity is not None and f.fidelity.n:
        blob_all = build_seq_state(list(range(n)), keys, values, kv_dtype=rt.kv_dtype,
                                   v_trans=rt.v_trans)
        rt.set_seq_state(blob_all, ids)
        mine = rt.greedy(f.fidelity.n, from_ids_tail=f.fidelity.probe_prompt_ids)
        k = next((i for i, (a, b) in enumerate(zip(mine, f.fidelity.expected_ids, strict=False)) if a != b),
                 f.fidelity.n)
        probe = f"{k}/{f.fidelity.n} of the exporter's probe tokens reproduced in llama.cpp"
        out(f"cross-runtime probe: {probe} (llama.cpp's 8-bit activations can flip a close "
            "greedy choice; bench/cross_runtime.py measures this against llama.cpp's own "
            "prefill)")
    rt.close()
    return {"tokens": n, "continued": got, "text": text, "attach_ms": attach_s * 1000,
            "estimate_attach_ms": est_a * 1000, "estimate_prefill_ms": est_p * 1000,
            "decision": decision, "probe": probe}


def capture_usxf(gguf: Path, prompt: str, out_path: Path, keys, *, system: str, agent_id: str,
                 max_tokens: int = 32, threads: int = 2, out=print):
    """Prefill (and answer) in llama.cpp, read its sequence state, write a USXF file that
    `permeant import` attaches in MLX."""
    from .agent import Agent, Turn
    from .exchange import PROBE_N, PROBE_SUFFIX
    from .llamacpp import LlamaCppRuntime, parse_seq_state
    from .models import load_model
    from .usxf import AgentRecord, Fidelity, KVPayload, write_usxf

    lm = load_model(str(gguf))  # the identity MLX will check on import (and its tokenizer)
    tok = lm.tokenizer
    agent = Agent(agent_id, "technical", agent_id.capitalize(), system)
    ids = agent.prompt_ids(tok, prompt)
    ident = lm.identity
    if len(ids) + max_tokens + 64 > ident.context_limit:
        raise ContextExhausted(0, len(ids), max_tokens, ident.context_limit)
    rt = LlamaCppRuntime(str(gguf), n_ctx=len(ids) + max_tokens + 64 + PROBE_N, kv_dtype="f32",
                         n_threads=threads)
    t = time.perf_counter()
    logits = rt.prefill(ids)
    eos = set(tok.eos_token_ids)
    gen: list[int] = []
    while len(gen) < max_tokens:
        nxt = int(np.argmax(logits))
        gen.append(nxt)
        logits = rt.decode([nxt])  # fed, EOS included, as the MLX engine does
        if nxt in eos:
            break
    state_ids = ids + gen
    blob = rt.get_seq_state()
    positions, kk, vv = parse_seq_state(blob, ident.n_layers, ident.n_kv_heads, ident.head_dim)
    if list(positions) != list(range(len(state_ids))):
        raise PermeantError("llama.cpp's sequence state does not hold the positions expected")
    probe_ids = tok.encode(PROBE_SUFFIX)
    expected = rt.greedy(PROBE_N, from_ids_tail=probe_ids)
    capture_s = time.perf_counter() - t
    rt.close()
    agent.turns = [Turn(prompt, tok.decode([g for g in gen if g not in eos]), tuple(gen))]
    assert agent.expected_ids(tok) == state_ids
    spans = agent.turn_spans(tok)
    record = AgentRecord(agent_id, agent.role, agent.title, system,
                         [{"user": t_.user, "reply": t_.reply, "span": list(s),
                           "generated_ids": list(t_.generated_ids)}
                          for t_, s in zip(agent.turns, spans, strict=False)])
    dtype = ident.kv_dtype
    cast = (lambda a: a.astype(dtype)) if dtype in ("float32", "float16") else (lambda a: a)
    info = write_usxf(out_path, identity=ident, token_ids=state_ids,
                      kv=KVPayload([cast(k) for k in kk], [cast(v) for v in vv], dtype),
                      agent=record, keys=keys,
                      fidelity=Fidelity(probe_ids, expected, PROBE_N,
                                        ident.context_limit - len(state_ids),
                                        note="probe decoded by llama.cpp"),
                      provenance={"runtime": "llama.cpp", "runtime_version": "llama-cpp-python"})
    out(f"captured {len(state_ids)} tokens from llama.cpp in {capture_s * 1000:.0f} ms -> "
        f"{out_path} ({info.size / 1e6:.1f} MB)")
    out(f"reply: {agent.turns[0].reply!r}")
    return info
