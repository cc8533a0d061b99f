"""Fidelity over many conversations: does an agent moved through USXF continue token for token?

    .venv/bin/python bench/fidelity.py [--quick] [--model SPEC] [--gguf PATH] [--probe 128]
                                       [--targets mlx,llamacpp] [--only NAME,...]

For each conversation of bench/fidelity_corpus.py (36: six kinds at six sizes, 200 to 4,000
tokens; --quick: 4) the source (MLX) prefills it and records its greedy probe (128 tokens after
the fixed probe prompt, with the top-2 logit margin of every step: what `permeant export`
records). Then each transfer (none, f16, bf16, int8, kivi8) is written as a real signed USXF
file, read back, and continued on each target until its first token that differs:

* mlx: attached in MLX (what `permeant import` does), compared with the source's probe;
* llamacpp: attached in llama.cpp (what `permeant usxf attach --runtime llamacpp` does),
  compared with llama.cpp's own prefill of the same tokens and its own probe (the reference
  that target would have without a migration).

Negative controls: the payload zeroed, and its positions shuffled (a valid signed file with the
checksums recomputed) must diverge at once. (Shuffled: the keys' positions, not the values':
moving whole (K, V) pairs changes nothing, attention being a set with RoPE inside K.) Codec speed: each method's encode and decode of the
conversation's KV in MB/s of float32 source, timed in the same run as float16's.

Results are cached per conversation (user cache dir, or --cache DIR): a run can be stopped and
resumed, or run in parts with --only. The summary covers every selected conversation that has
results. Meant for a quiet machine; print the load average beside the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fidelity_report import TRANSFERS  # noqa: E402

from permeant_tui.engine import runtime  # noqa: E402


def margin_of(logits: np.ndarray) -> float:
    top2 = np.partition(logits.astype(np.float64), -2)[-2:]
    return float(top2[1] - top2[0])


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) of two next-token distributions given by their logits."""
    def logsm(x):
        x = x.astype(np.float64) - x.max()
        return x - np.log(np.exp(x).sum())
    lp, lq = logsm(p_logits), logsm(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum())


class MLXTarget:
    """Greedy continuation in MLX from a cache, stopping at the first token that differs."""

    def __init__(self, lm):
        self.lm = lm

    def run(self, cache, probe: list[int], expected: list[int] | None, n: int):
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        toks, margins, first = [], [], None
        for tok, logprobs in generate_step(mx.array(probe), self.lm.model, max_tokens=n,
                                           prompt_cache=cache):
            lp = np.array(logprobs.reshape(-1).astype(mx.float32))
            if first is None:
                first = lp
            toks.append(int(tok))
            margins.append(margin_of(lp))
            if expected is not None and toks[-1] != expected[len(toks) - 1]:
                break
        return toks, margins, first


class LlamaTarget:
    """The same in llama.cpp: attach the KV as a sequence state, decode the probe prompt after
    it, then greedy; or prefill the tokens itself (the reference)."""

    def __init__(self, gguf: str, n_ctx: int, threads: int):
        from permeant_tui.engine import llamacpp as lc

        self.lc = lc
        self.rt = lc.LlamaCppRuntime(gguf, n_ctx=n_ctx, kv_dtype="f32", n_threads=threads)

    def _greedy(self, probe, expected, n):
        lg = self.rt.decode(probe).copy()
        toks, margins, first = [], [], lg
        for i in range(n):
            toks.append(int(lg.argmax()))
            margins.append(margin_of(lg))
            if expected is not None and toks[-1] != expected[i]:
                break
            if i + 1 < n:
                lg = self.rt.decode([toks[-1]]).copy()
        return toks, margins, first

    def own(self, ids, probe, n):
        self.rt.prefill(ids)
        return self._greedy(probe, None, n)

    def attached(self, kv, probe, expected, n):
        keys = [np.asarray(k, np.float32) for k in kv.keys]
        values = [np.asarray(v, np.float32) for v in kv.values]
        self.rt.attach_kv(range(keys[0].shape[1]), keys, values)
        return self._greedy(probe, expected, n)


def diverged_at(got: list[int], expected: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                len(got))


def codec_speed(kv, methods) -> dict:
    """Encode and decode time of each method on this KV (float32 source), summed over tensors."""
    from permeant_tui.engine.usxf import quant

    out = {}
    group = quant.group_size_for(kv.keys[0].shape[2])
    for m in methods:
        enc = dec = 0.0
        for kind, arrs in (("k", kv.keys), ("v", kv.values)):
            for a in arrs:
                t = time.perf_counter()
                st = quant.encode(a, "float32", m, group, None, "t", kind)
                enc += time.perf_counter() - t
                t = time.perf_counter()
                if m == "kivi8":
                    from permeant_tui.engine.usxf import kivi

                    e = dict((k, x) for k, _, x in st.parts)
                    kivi.decode(st.data, e["scales"], e["zeros"],
                                np.frombuffer(st.fields["kept"], "<u4"), e["kept_values"], kind,
                                kivi.KEY_GROUP, group)
                else:
                    scales = st.parts[0][2] if st.parts else None
                    quant.decode(st.data, scales, "float32", m, group)
                dec += time.perf_counter() - t
        out[m] = {"encode_s": enc, "decode_s": dec}
    return out


def run_conversation(conv, lm, targets, args, gguf) -> dict:
    from permeant_tui.engine.agent import Agent
    from permeant_tui.engine.exchange import PROBE_SUFFIX
    from permeant_tui.engine.generation import prefill
    from permeant_tui.engine.snapshot import attach_payload
    from permeant_tui.engine.usxf import (
        AgentRecord,
        Fidelity,
        KVPayload,
        WorkspaceKeys,
        read_usxf,
        write_usxf,
    )

    tok, n = lm.tokenizer, args.probe
    agent = Agent(conv.name, conv.role, conv.name, conv.system, turns_of_pairs(conv.turns, tok))
    ids = agent.expected_ids(tok)
    probe = tok.encode(PROBE_SUFFIX)
    res = {"name": conv.name, "kind": conv.kind, "tokens": len(ids), "probe": n}
    t = time.perf_counter()
    prefill(lm.model, agent, ids)
    res["prefill_s"] = time.perf_counter() - t
    from permeant_tui.engine.kvlayers import logical_kv

    # each layer's logical K/V (a sliding-window layer: its last min(n, window) positions)
    keys, values, dtype = logical_kv(agent.cache, len(ids))
    if dtype != "float32":
        sys.exit(f"this bench writes float32 KV; the model's KV is {dtype}")
    kv = KVPayload(keys, values, "float32")
    res["float32_bytes"] = kv.nbytes
    mlx = MLXTarget(lm)
    src_toks, src_margins, src_first = mlx.run(agent.cache, probe, None, n)
    res["source"] = {"mlx": {"expected": src_toks, "margins": src_margins}}
    res["codec"] = codec_speed(kv, TRANSFERS[1:])
    rng = np.random.default_rng(0)
    variants = {q: (kv, q) for q in TRANSFERS}
    variants["zeroed"] = (KVPayload([np.zeros_like(k) for k in keys],
                                    [np.zeros_like(v) for v in values], "float32"), "none")
    # keys moved to other positions, values left: attention is a set over (K, V) pairs (RoPE is
    # inside K), so a consistent shuffle of both would change nothing; breaking the pairs must
    variants["shuffled"] = (KVPayload([k[:, rng.permutation(k.shape[1])] for k in keys], values,
                                      "float32"), "none")
    lt = None
    if "llamacpp" in targets:
        lt = LlamaTarget(gguf, len(ids) + len(probe) + n + 16, args.threads)
        own, own_margins, own_first = lt.own(ids, probe, n)
        res["source"]["llamacpp"] = {"expected": own, "margins": own_margins}
    with tempfile.TemporaryDirectory() as d:
        keys_ = WorkspaceKeys(Path(d) / "keys").ensure()
        fid = Fidelity(probe, src_toks, n, lm.context_limit - len(ids), margins=src_margins)
        for name, (payload, quant) in variants.items():
            path = Path(d) / f"{name}.usxf"
            t = time.perf_counter()
            info = write_usxf(path, identity=lm.identity, token_ids=ids, kv=payload,
                              agent=AgentRecord(conv.name, conv.role, conv.name, conv.system, []),
                              keys=keys_, quant=quant, fidelity=fid)
            write_s = time.perf_counter() - t
            t = time.perf_counter()
            got = read_usxf(path, trusted=keys_, expected_identity=lm.identity).load_kv()
            read_s = time.perf_counter() - t
            row = {"bytes": info.size, "write_s": write_s, "read_s": read_s,
                   "error": info.manifest["quant"]["error"]}
            if "mlx" in targets:
                cache = attach_payload(lm.model, got.keys, got.values, got.dtype,
                                       lm.identity.kv_dtype, len(ids))
                toks, _, first = mlx.run(cache, probe, src_toks, n)
                k = diverged_at(toks, src_toks)
                row["mlx"] = {"k": k, "margin": src_margins[k] if k < n else None,
                              "kl0": kl(src_first, first)}
            if lt is not None:
                toks, _, first = lt.attached(got, probe, own, n)
                k = diverged_at(toks, own)
                row["llamacpp"] = {"k": k, "margin": own_margins[k] if k < n else None,
                                   "kl0": kl(own_first, first)}
            res[name] = row
            path.unlink()
    if lt is not None:
        lt.rt.close()
    return res


def turns_of_pairs(pairs, tok):
    """(user, reply) pairs as turns, each reply as if generated: its ids, then end of turn."""
    from permeant_tui.engine.agent import Turn

    return [Turn(u, r, tuple(tok.encode(r)) + (tok.eos_token_id,)) for u, r in pairs]


def count_tokens(tok):
    from permeant_tui.engine.agent import Agent

    def count(system, turns):
        return len(Agent("a", "r", "t", system, turns_of_pairs(turns, tok)).expected_ids(tok))
    return count


def digest(conv) -> str:
    return hashlib.sha256(json.dumps([conv.system, conv.turns]).encode()).hexdigest()[:16]


def kivi_params() -> list:
    from permeant_tui.engine.usxf import kivi

    return [kivi.KEY_GROUP, kivi.VALUE_GROUP, kivi.KEEP_FIRST, kivi.KEEP_FRACTION]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 conversations (development)")
    ap.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2)")
    ap.add_argument("--gguf", default=None, help="GGUF for the llama.cpp target (default: the "
                    "model's own .gguf)")
    ap.add_argument("--targets", default="mlx,llamacpp")
    ap.add_argument("--only", default=None, help="conversation names, comma-separated, run "
                    "in that order")
    ap.add_argument("--probe", type=int, default=128, help="greedy tokens per probe")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--cache", default=None, help="results folder (default: user cache dir)")
    ap.add_argument("--report-only", action="store_true", help="print the cached results")
    args = ap.parse_args(argv)
    command = "bench/fidelity.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    load0 = os.getloadavg()
    blas = runtime.prepare()
    import fidelity_corpus as corpus
    import fidelity_report as report

    from permeant_tui.engine.models import default_model_path, load_model
    from permeant_tui.paths import cache_dir

    lm = load_model(args.model)
    targets = [t for t in args.targets.split(",") if t]
    gguf = args.gguf or (args.model if args.model and args.model.endswith(".gguf") else None)
    if gguf is None and args.model is None:
        gguf = str(default_model_path())
    if "llamacpp" in targets and gguf is None:
        sys.exit("the llama.cpp target needs --gguf PATH for this model")
    if "llamacpp" in targets and lm.identity.sliding_window:
        sys.exit("the llama.cpp target does not attach sliding-window models yet: "
                 "use --targets mlx")
    convs = corpus.corpus(count_tokens(lm.tokenizer), quick=args.quick)
    if args.only:  # in the order given
        by_name = {c.name: c for c in convs}
        unknown = [x for x in args.only.split(",") if x not in by_name]
        if unknown:
            sys.exit(f"no conversation named {', '.join(unknown)} (names: kind-size, e.g. "
                     f"{convs[0].name})")
        convs = [by_name[x] for x in args.only.split(",")]
    folder = Path(args.cache) if args.cache else cache_dir() / "bench-fidelity"
    folder = folder / f"{lm.identity.fingerprint[:16]}-p{args.probe}"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"model {lm.identity.name} ({lm.identity.fingerprint[:16]}), BLAS {blas}, "
          f"{len(convs)} conversations, probe {args.probe}, targets {targets}, results {folder}")
    results = []
    for conv in convs:
        f = folder / f"{conv.name}.json"
        res = json.loads(f.read_text()) if f.exists() else None
        if res is not None and (res.get("kivi8_params") != kivi_params()
                                or res.get("conversation") != digest(conv)):
            res = None  # kivi8 or the conversation changed since: measure again
        if res is None or any(t not in res.get("none", {}) for t in targets):
            if args.report_only:
                continue
            t = time.perf_counter()
            res = run_conversation(conv, lm, targets, args, gguf)
            res["wall_s"] = time.perf_counter() - t
            res["kivi8_params"] = kivi_params()
            res["conversation"] = digest(conv)
            res["loadavg"] = os.getloadavg()[0]
            f.write_text(json.dumps(res))
            print(report.line(res, targets), flush=True)
        results.append(res)
    print()
    print(report.table(results, targets, args.probe))
    print()
    print(report.speed(results))
    print(f"\ncommand: {command}")
    print(f"load average: {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
          f"(2 cores); {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
