"""Prefill and decode speed: the engine against raw mlx_lm on the same loaded model, the chosen
CPU configuration (OpenBLAS + float32 weights) against MLX's stock CPU path, llama.cpp on the
same GGUF when llama-cpp-python is importable, and start-up time split by stage.

    .venv/bin/python bench/decode.py [--prompt-tokens 512] [--decode-tokens 64] [--repeats 3]

Every ratio compares figures measured in this run. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

T0 = time.perf_counter()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def prompt_ids(tok, n):
    text = ("The payment API returns intermittent 502 errors under load; the retry logic "
            "doubles traffic and the database connection pool is exhausted. ")
    ids = tok.encode(text * (n // 20 + 2))[: n - 2]
    return [1, *ids, 2]


def raw_mlx_lm(lm, ids, n_decode):
    """Prefill + decode through mlx_lm.stream_generate directly (the baseline)."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(lm.model)
    t0 = time.perf_counter()
    first = None
    n = 0
    for r in stream_generate(lm.model, lm.tokenizer, ids, max_tokens=n_decode,
                             prompt_cache=cache, prefill_step_size=512):
        if first is None:
            first = time.perf_counter()
        n = r.generation_tokens
    end = time.perf_counter()
    return len(ids) / (first - t0), (n - 1) / (end - first)


def engine_turn(lm, ids, n_decode):
    """The same work through the engine's run_turn (prefix match, events, batching)."""
    from permeant_tui.engine.agent import Agent
    from permeant_tui.engine.generation import TurnParams, run_turn

    class Fixed(Agent):
        def prompt_ids(self, tokenizer, next_user):
            return ids

    agent = Fixed("bench", "bench", "Bench", "")
    events = []
    r = run_turn(lm.model, lm.tokenizer, agent, "x", TurnParams(max_tokens=n_decode),
                 context_limit=lm.context_limit, turn_id=1, emit=events.append,
                 cancel=threading.Event(), source="new")
    return len(ids) / (r.timing_ms["ttft"] / 1000), r.decode_tok_s


def measure_here(args):
    from permeant_tui.engine import runtime
    from permeant_tui.engine.models import load_model

    blas = runtime.prepare()
    lm = load_model(None)
    load = {k: round(v) for k, v in lm.timings_ms.items()}
    load["process_to_ready"] = round((time.perf_counter() - T0) * 1000)
    ids = prompt_ids(lm.tokenizer, args.prompt_tokens)
    # Force EOS never to stop early: both paths decode exactly n tokens (ignore_eos-like).
    lm.tokenizer._eos_token_ids = {-1}
    raw_mlx_lm(lm, ids[:32], 4)  # warm-up
    res = {"raw": [], "engine": []}
    for _ in range(args.repeats):
        res["raw"].append(raw_mlx_lm(lm, ids, args.decode_tokens))
        res["engine"].append(engine_turn(lm, ids, args.decode_tokens))
    med = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v))
           for k, v in res.items()}
    return {"blas": blas, "weights": lm.weights_mode, "load_ms": load, "median": med}


def llamacpp(args, gguf, n_prompt):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=max(2048, n_prompt + args.decode_tokens + 8),
                n_threads=os.cpu_count(), verbose=False)
    from permeant_tui.engine.gguf import read_gguf
    from permeant_tui.engine.gguf_tokenizer import tokenizer_from_gguf

    _, meta = read_gguf(gguf)
    ids = prompt_ids(tokenizer_from_gguf(meta), n_prompt)
    pf, dec = [], []
    for _ in range(args.repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        pf.append(len(ids) / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            tok = llm.sample(top_k=1)
            llm.eval([tok])
        dec.append(args.decode_tokens / (time.perf_counter() - t))
    return statistics.median(pf), statistics.median(dec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure_here(args)))
        return
    here = measure_here(args)
    env = dict(os.environ, PERMEANT_BLAS="none", PERMEANT_WEIGHTS="quantized")
    stock = json.loads(subprocess.run(
        [sys.executable, __file__, "--child", "--prompt-tokens", str(args.prompt_tokens),
         "--decode-tokens", str(args.decode_tokens), "--repeats", "1"],
        env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    from permeant_tui.engine.models import default_model_path

    ref = llamacpp(args, default_model_path(), args.prompt_tokens)

    (rp, rd), (ep, ed) = here["median"]["raw"], here["median"]["engine"]
    sp, sd = stock["median"]["raw"]
    print(f"SmolLM2-135M-Instruct Q4_1, {args.prompt_tokens}-token prompt, {args.decode_tokens} "
          f"decoded tokens, median of {args.repeats}")
    print(f"{'configuration':<48}{'prefill tok/s':>14}{'decode tok/s':>14}")
    print(f"{'raw mlx_lm stream_generate (' + here['weights'] + ', ' + here['blas'][:8] + ')':<48}"
          f"{rp:>14.1f}{rd:>14.1f}")
    print(f"{'permeant engine run_turn (same model)':<48}{ep:>14.1f}{ed:>14.1f}")
    print(f"{'MLX stock CPU path (quantized, reference BLAS)':<48}{sp:>14.1f}{sd:>14.1f}")
    if ref:
        print(f"{'llama.cpp (llama-cpp-python, same GGUF)':<48}{ref[0]:>14.1f}{ref[1]:>14.1f}")
    print()
    print(f"engine cost vs raw mlx_lm: prefill {100 * (1 - ep / rp):+.1f}%, "
          f"decode {100 * (1 - ed / rd):+.1f}% (positive = engine slower)")
    print(f"chosen CPU path vs MLX stock: prefill x{rp / sp:.1f}, decode x{rd / sd:.1f}")
    if ref:
        print(f"vs llama.cpp: prefill x{rp / ref[0]:.2f}, decode x{rd / ref[1]:.2f}")
    print("start-up ms (this process): " + ", ".join(f"{k} {v}" for k, v in
                                                     here["load_ms"].items()))
    print("start-up ms (stock path):   " + ", ".join(f"{k} {v}" for k, v in
                                                     stock["load_ms"].items()))


if __name__ == "__main__":
    main()
