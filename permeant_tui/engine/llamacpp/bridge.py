"""USXF across runtimes: attach an export in llama.cpp and continue (`attach_usxf`), or capture
llama.cpp's state as a USXF file that `permeant import` attaches in MLX (`capture_usxf`). And
the warm-start cost model. Both return a report; nothing here prints.

The first continued token's logits: a llama.cpp sequence state holds KV cells, never logits.
We attach the KV of all tokens but the last and replay the last one with a one-token decode
(what llama-server does with a cached prompt); see docs/USXF.md.

Sliding-window models (Gemma 3) move too: the engine and USXF 1.1 keep a sliding layer's last
window, llama.cpp's iSWA cache keeps the same cells in its SWA sub-state (cells.py maps one to
the other). K goes in the RoPE layout llama.cpp uses for the GGUF's architecture, which is the
layout the engine's GGUF loader runs the model with (the target identity's `rope_layout`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ContextExhausted, ModelLoadError, PermeantError, UsxfInvalid
from .cells import before, layers_from_caches, layers_from_payload, payload_from_layers
from .codec import (
    SeqStateError,
    build_seq_state,
    parse_seq_state_caches,
    permute_k_heads,
)
from .runtime import LlamaCppRuntime

# Identity fields that must match between the file and the target GGUF. kv_dtype is not among
# them: the target converts the payload to its own KV type (f32 here, so nothing is rounded).
_MATCH = ("architecture", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size",
          "vocab_size", "rope_theta", "rope_scaling", "sliding_window", "weights_digest",
          "tokenizer_digest")


# --- MLX cache access: through engine/kvcache.py, the one module that touches mlx-lm caches.

def kv_from_mlx_cache(cache) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """An mlx_lm prompt cache (list of per-layer caches, batch 1) -> per-layer float32 numpy K
    and V shaped (n_kv_heads, L_i, head_dim) through `kvlayers.logical_kv`: L_i = offset on a
    full layer, its last min(offset, window) positions on a sliding one (`cells.
    layers_from_payload` gives their starts). A quantized KV cache, or a sliding layer that
    keeps leading tokens, raises SeqStateError before anything is copied."""
    from .. import kvcache, kvlayers

    try:
        ks, vs, dtype = kvlayers.logical_kv(cache, kvcache.cache_offset(cache))
    except (kvcache.CacheLayoutError, kvcache.CacheRewindError,
            kvcache.UnsupportedModel) as exc:
        raise SeqStateError(f"the MLX cache cannot move to llama.cpp: {exc}") from None
    return [_as_f32(k, dtype) for k in ks], [_as_f32(v, dtype) for v in vs]


def _as_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # uint16 bit patterns
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


# --- identity -------------------------------------------------------------------------------

def gguf_identity(gguf: Path, digest_cache: Path | None = None):
    """The ModelIdentity fields of a GGUF that do not need an MLX model (kv_dtype='float32'),
    its tokenizer, and each layer's sliding window (0: full attention) as llama.cpp runs it."""
    from ..gguf import model_args, read_gguf
    from ..gguf_arch import layer_windows
    from ..gguf_tokenizer import tokenizer_from_gguf
    from ..identity import file_digest
    from ..models import _identity

    _, meta = read_gguf(gguf)
    args = model_args(meta, gguf)
    tok = tokenizer_from_gguf(meta, gguf)
    ident = _identity(str(meta.get("general.name") or gguf.stem),
                      str(meta["general.architecture"]), args, file_digest(gguf, digest_cache),
                      tok, "float32", int(args["max_position_embeddings"]))
    return ident, tok, layer_windows(args)


def check_identity(file_identity, target_identity, path: str) -> None:
    diff = [f for f in _MATCH if getattr(file_identity, f) != getattr(target_identity, f)]
    if diff:
        raise UsxfInvalid("model-identity", "the GGUF is not the model this state was made by: "
                          + ", ".join(f"{f} {getattr(file_identity, f)!r} != "
                                      f"{getattr(target_identity, f)!r}" for f in diff), path)


def check_windows(file_identity, windows: list[int], path: str) -> None:
    """The file's per-layer windows (USXF 1.1 `attention.layers`) must be llama.cpp's."""
    mine = file_identity.layer_windows()
    if mine != windows:
        raise UsxfInvalid("model-identity", f"the file's per-layer sliding windows {mine} are "
                          f"not the GGUF's {windows}", path)


# --- warm-start cost model ------------------------------------------------------------------

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


def synthetic_blob(rt: LlamaCppRuntime, n: int) -> bytearray:
    """A zero state of n tokens for this context (a sliding layer holds its window)."""
    if rt.layer_windows is None:
        kv = [np.zeros((rt.n_kv_heads, n, rt.head_dim), np.float32)] * rt.n_layers
        return build_seq_state(range(n), kv, kv, kv_dtype=rt.kv_dtype, v_trans=rt.v_trans)
    kv = [np.zeros((rt.n_kv_heads, min(n, w) if w else n, rt.head_dim), np.float32)
          for w in rt.layer_windows]
    return rt.state_blob(layers_from_payload(kv, kv, n))


def calibrate(rt: LlamaCppRuntime, cache_file: Path | None) -> CostModel:
    """Measured once per GGUF and machine (cached): prefill 64 and 320 tokens, attach a
    synthetic 256-token state."""
    if cache_file is not None and cache_file.exists():
        try:
            return CostModel(**json.loads(cache_file.read_text()))
        except (ValueError, TypeError):
            pass
    ids = [int(i) for i in np.random.default_rng(0).integers(100, 10000, 320)]
    times = {}
    for n in (64, 320):
        t = time.perf_counter()
        rt.prefill(ids[:n])
        times[n] = time.perf_counter() - t
    tok_s = (320 - 64) / max(times[320] - times[64], 1e-6)
    fixed = max(times[64] - 64 / tok_s, 0.0)
    blob = synthetic_blob(rt, 256)
    t = time.perf_counter()
    rt.set_seq_state(blob)
    attach_s = time.perf_counter() - t
    t = time.perf_counter()
    rt.set_seq_state(blob, fresh=False)
    cleared = time.perf_counter() - t
    mb_s = len(blob) / 1e6 / max(cleared, 1e-6)
    model = CostModel(tok_s, fixed, mb_s, max(attach_s - cleared, 0.0), time.time())
    if cache_file is not None:
        from ..atomic import write_atomic

        write_atomic(cache_file, json.dumps(asdict(model)).encode(), durable=False)
    return model


# --- attach: USXF -> llama.cpp --------------------------------------------------------------

@dataclass(frozen=True)
class ProbeResult:
    """The exporter's fidelity probe replayed in llama.cpp: leading tokens reproduced of n."""

    matched: int
    n: int


@dataclass(frozen=True)
class AttachReport:
    path: str
    tokens: int  # in the file (n - 1 attached, the last replayed)
    quant: str
    key_id: str
    verify_ms: float
    attach_ms: float  # build the blob + set it into a fresh context
    blob_bytes: int
    estimate_attach_ms: float
    estimate_prefill_ms: float
    prefill_tok_s: float
    decision: str  # what the cost model would pick here: "attach" | "re-prefill"
    continued: tuple[int, ...]  # greedy ids llama.cpp produced after the attach
    text: str
    probe: ProbeResult | None  # None when the file carries no fidelity probe


def attach_usxf(path: str | Path, gguf: Path, n_continue: int, trusted, *, threads: int = 2,
                cache_folder: Path | None = None) -> AttachReport:
    """Verify a USXF file, attach its KV in llama.cpp (no prefill) and continue `n_continue`
    greedy tokens; replay the exporter's fidelity probe when the file has one. `cache_folder`
    (default: the user cache dir) keeps the GGUF's digest and the calibrated cost model."""
    from ...paths import cache_dir
    from ..usxf import read_usxf

    cache_folder = Path(cache_folder) if cache_folder is not None else cache_dir()

    t0 = time.perf_counter()
    f = read_usxf(path, trusted=trusted)
    verify_s = time.perf_counter() - t0
    target, tok, windows = gguf_identity(gguf, cache_folder / "digests")
    check_identity(f.identity, target, str(path))
    check_windows(f.identity, windows, str(path))
    ids = list(f.token_ids)
    n = len(ids)
    limit = target.context_limit
    if n + n_continue > limit:
        raise ContextExhausted(n, 0, n_continue, limit)
    fid = f.fidelity
    probe_len = len(fid.probe_prompt_ids) + fid.n if fid is not None else 0  # the probe's room
    try:
        rt = LlamaCppRuntime(str(gguf), n_ctx=min(limit, max(n + max(n_continue, probe_len) + 64,
                                                              512)),
                             kv_dtype="f32", n_threads=threads, layer_windows=windows)
    except ImportError as exc:
        raise ModelLoadError(f"llama.cpp runtime unavailable: {exc}") from None
    with rt:
        rt.check_state_supported()
        cm = calibrate(rt, cache_folder / f"costmodel-llamacpp-{target.weights_digest[:16]}.json")
        t = time.perf_counter()
        kv = f.load_kv()
        keys = [np.asarray(k, np.float32) for k in kv.keys]
        values = [np.asarray(v, np.float32) for v in kv.values]
        if f.identity.rope_layout != target.rope_layout:  # llama.cpp's layout for the arch
            keys = [permute_k_heads(k, f.identity.rope_layout, target.rope_layout)
                    for k in keys]
        layers = layers_from_payload(keys, values, n)
        m = n - 1
        blob = rt.state_blob(before(layers, m))
        rt.set_seq_state(blob, ids[:m])
        attach_s = time.perf_counter() - t
        decision, est_a, est_p = cm.decide(n, len(blob))
        got = rt.greedy(n_continue, from_ids_tail=ids[-1:])
        probe = None
        if fid is not None and fid.n:
            rt.attach_layers(layers, ids)
            mine = rt.greedy(fid.n, from_ids_tail=fid.probe_prompt_ids)
            k = next((i for i, (a, b) in enumerate(zip(mine, fid.expected_ids, strict=False))
                      if a != b), fid.n)
            probe = ProbeResult(k, fid.n)
    return AttachReport(
        path=str(path), tokens=n, quant=f.quant, key_id=f.key_id, verify_ms=verify_s * 1000,
        attach_ms=attach_s * 1000, blob_bytes=len(blob), estimate_attach_ms=est_a * 1000,
        estimate_prefill_ms=est_p * 1000, prefill_tok_s=cm.prefill_tok_s, decision=decision,
        continued=tuple(got), text=tok.decode(got), probe=probe)


# --- capture: llama.cpp -> USXF -------------------------------------------------------------

@dataclass(frozen=True)
class CaptureReport:
    path: Path
    tokens: int  # in the state written (prompt + generated)
    generated: tuple[int, ...]  # EOS included when it came
    reply: str
    capture_ms: float  # prefill + decode + state read + probe, in llama.cpp
    size: int  # bytes of the USXF file
    digest: str


def capture_usxf(gguf: Path, prompt: str, out_path: Path, keys, *, system: str, agent_id: str,
                 max_tokens: int = 32, threads: int = 2) -> CaptureReport:
    """Prefill (and answer) in llama.cpp, read its sequence state, write a USXF file that
    `permeant import` attaches in MLX."""
    from ..agent import Agent, Turn
    from ..exchange import PROBE_N, PROBE_SUFFIX
    from ..models import load_model
    from ..usxf import AgentRecord, Fidelity, KVPayload, write_usxf

    lm = load_model(str(gguf))  # the identity MLX will check on import (and its tokenizer)
    ident = lm.identity
    windows = ident.layer_windows()
    tok = lm.tokenizer
    agent = Agent(agent_id, "technical", agent_id.capitalize(), system)
    ids = agent.prompt_ids(tok, prompt)
    if len(ids) + max_tokens + 64 > ident.context_limit:
        raise ContextExhausted(0, len(ids), max_tokens, ident.context_limit)
    try:
        rt = LlamaCppRuntime(str(gguf), n_ctx=len(ids) + max_tokens + 64 + PROBE_N, kv_dtype="f32",
                             n_threads=threads, layer_windows=windows)
    except ImportError as exc:
        raise ModelLoadError(f"llama.cpp runtime unavailable: {exc}") from None
    with rt:
        rt.check_state_supported()
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
        _, caches = parse_seq_state_caches(blob, ident.n_kv_heads, ident.head_dim)
        try:
            layers = layers_from_caches(caches, windows, ident.n_kv_heads, ident.head_dim)
            kk, vv = payload_from_layers(layers, windows, len(state_ids))
        except SeqStateError as exc:
            raise PermeantError(f"llama.cpp's sequence state does not hold the positions "
                                f"expected: {exc}") from None
        probe_ids = tok.encode(PROBE_SUFFIX)
        expected = rt.greedy(PROBE_N, from_ids_tail=probe_ids)
        capture_s = time.perf_counter() - t
    agent.turns = [Turn(prompt, tok.decode([g for g in gen if g not in eos]), tuple(gen))]
    if agent.expected_ids(tok) != state_ids:
        raise PermeantError("the captured reply does not re-render to the ids llama.cpp holds "
                            "(chat template round trip)")
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
    return CaptureReport(path=Path(out_path), tokens=len(state_ids), generated=tuple(gen),
                         reply=agent.turns[0].reply, capture_ms=capture_s * 1000,
                         size=info.size, digest=info.digest)
