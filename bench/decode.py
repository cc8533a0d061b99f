"""Prefill and decode speed: the engine against raw mlx_lm on the same loaded model, the chosen
CPU configuration (OpenBLAS + float32 weights) against MLX's stock CPU path, each OpenBLAS kernel
choice against the others (the generic core, OpenBLAS's own pick, the core engine/blas.py
chooses; each with and without the sgemv shim, greedy ids compared), where a decode step's time
goes (Python graph building against evaluation), llama.cpp on the same GGUF when
llama-cpp-python is importable (run with OMP_WAIT_POLICY=PASSIVE, so its threads sleep instead
of spinning on a loaded machine), and start-up time split by stage.

    .venv/bin/python bench/decode.py [--prompt-tokens 512] [--decode-tokens 64] [--repeats 3]

Every ratio compares figures measured in this run; the load average is printed beside them.
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
    load_ms = {k: round(v) for k, v in lm.timings_ms.items()}
    load_ms["process_to_ready"] = round((time.perf_counter() - T0) * 1000)
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
    graph = graph_build_share(lm, ids[:256], 32)
    return {"blas": blas, "weights": lm.weights_mode, "load_ms": load_ms, "median": med,
            "graph_ms": graph, "kernels": runtime.kernel_labels(),
            "transformers": "transformers" in sys.modules}


def greedy_run(lm, ids, n_decode):
    """(prefill tok/s, decode tok/s, greedy ids) through mlx_lm's generate_step."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from permeant_tui.engine.kvcache import new_cache

    cache = new_cache(lm.model)
    t0 = time.perf_counter()
    gen = generate_step(mx.array(ids), lm.model, max_tokens=n_decode + 1, prompt_cache=cache,
                        prefill_step_size=512)
    out = [int(next(gen)[0])]
    t1 = time.perf_counter()
    out += [int(tok) for tok, _ in gen]
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), n_decode / (t2 - t1), out


def kernels_here(args):
    """One OpenBLAS core (fixed by the parent through OPENBLAS_CORETYPE), sgemv off and on
    interleaved in this process."""
    from permeant_tui.engine import runtime
    from permeant_tui.engine.models import load_model

    runtime.prepare()
    core, sgemv = runtime.kernel_labels()
    lm = load_model(None)
    lm.tokenizer._eos_token_ids = {-1}
    ids = prompt_ids(lm.tokenizer, args.prompt_tokens)
    greedy_run(lm, ids[:32], 4)  # warm-up
    modes = [False, True] if runtime.set_sgemv(False) else [False]
    res: dict = {str(m): {"pf": [], "dec": [], "ids": None} for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            runtime.set_sgemv(m)
            pf, dec, out = greedy_run(lm, ids, args.decode_tokens)
            r = res[str(m)]
            r["pf"].append(pf)
            r["dec"].append(dec)
            r["ids"] = out
    import ctypes

    name = ctypes.CDLL(runtime.find_openblas()).openblas_get_corename
    name.restype = ctypes.c_char_p
    return {"core": name().decode(), "choice": core, "sgemv": sgemv,
            "runs": {m: {"pf": statistics.median(r["pf"]), "dec": statistics.median(r["dec"]),
                         "ids": r["ids"]} for m, r in res.items()}}


def graph_build_share(lm, ids, n):
    """Per decode step: the Python forward call that builds MLX's lazy graph, against its
    evaluation (matrix products, attention). Sequential, no pipelining: an upper bound on what
    graph building can cost."""
    import mlx.core as mx

    from permeant_tui.engine.kvcache import eval_cache, new_cache

    cache = new_cache(lm.model)
    lm.model(mx.array([ids]), cache=cache)
    eval_cache(cache)
    y = mx.array([[ids[-1]]])
    build = run = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        logits = lm.model(y, cache=cache)
        t1 = time.perf_counter()
        y = mx.argmax(logits[:, -1, :], axis=-1).reshape(1, 1)
        mx.eval(y)
        t2 = time.perf_counter()
        build += t1 - t0
        run += t2 - t1
    return build / n * 1000, run / n * 1000


def llamacpp_here(args):
    from llama_cpp import Llama

    from permeant_tui.engine.gguf import read_gguf
    from permeant_tui.engine.gguf_tokenizer import tokenizer_from_gguf
    from permeant_tui.engine.models import default_model_path

    gguf = default_model_path()
    n_prompt = args.prompt_tokens
    llm = Llama(model_path=str(gguf), n_ctx=max(2048, n_prompt + args.decode_tokens + 8),
                n_threads=os.cpu_count(), verbose=False)
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
    return {"pf": statistics.median(pf), "dec": statistics.median(dec)}


def child(args, mode, env_extra, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra)
    r = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--prompt-tokens", str(args.prompt_tokens),
         "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.child_repeats)],
        env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"({mode} child failed: {(r.stderr.strip().splitlines() or ['?'])[-1]})")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def load():
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def kernel_table(args):
    """Children with the core fixed: the generic fallback, OpenBLAS's own pick, our choice."""
    from permeant_tui.engine import blas, runtime

    lib = runtime.find_openblas()
    if lib is None or sys.platform != "linux":
        print("kernel choices: OpenBLAS not in use here (nothing to compare)")
        return
    own = blas.run_child(lib, None)
    detected = own["core"] if own else None
    choice = blas.choose_core(detected, blas.cpu_flags(), None)
    cores = {"generic (Prescott)": "Prescott"}
    if detected:
        cores[f"OpenBLAS's own ({detected})"] = detected
    if choice.chosen:
        cores[f"chosen ({choice.chosen})"] = choice.chosen
    print(f"OpenBLAS kernel choices ({args.prompt_tokens}-token prompt, {args.decode_tokens} "
          f"decoded tokens, median of {args.child_repeats}; choice here: {choice.label})")
    print(f"{'core':<30}{'sgemv':<7}{'prefill tok/s':>14}{'decode tok/s':>14}  {'':<24}")
    rows = []
    for label, core in cores.items():
        res = child(args, "kernels", {"OPENBLAS_CORETYPE": core})
        if res is None:
            continue
        for m, r in res["runs"].items():
            rows.append((label, m == "True", r))
            print(f"{label:<30}{'on' if m == 'True' else 'off':<7}{r['pf']:>14.1f}"
                  f"{r['dec']:>14.1f}  {load()}")
    if not rows:
        return
    base = rows[0][2]
    ids_equal = all(r["ids"] == base["ids"] for _, _, r in rows)
    best = max(rows, key=lambda x: x[2]["dec"])
    print("against generic without sgemv: " + "; ".join(
        f"{lbl} sgemv {'on' if m else 'off'} prefill x{r['pf'] / base['pf']:.2f} "
        f"decode x{r['dec'] / base['dec']:.2f}" for lbl, m, r in rows[1:]))
    print(f"greedy ids identical across all {len(rows)} kernel configurations: "
          f"{'yes' if ids_equal else 'NO'}; fastest decode: {best[0]} sgemv "
          f"{'on' if best[1] else 'off'}")
    if not ids_equal:
        for lbl, m, r in rows:
            first = next((i for i, (a, b) in enumerate(zip(r["ids"], base["ids"], strict=False)) if a != b),
                         None)
            print(f"  {lbl} sgemv {'on' if m else 'off'}: first differing id at {first}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child-repeats", type=int, default=2)
    ap.add_argument("--only-kernels", action="store_true",
                    help="only the OpenBLAS kernel table")
    ap.add_argument("--child", choices=("engine", "kernels", "llamacpp"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = {"engine": measure_here, "kernels": kernels_here, "llamacpp": llamacpp_here}
        print(json.dumps(fn[args.child](args)))
        return
    print(f"{load()} at start, {os.cpu_count()} cores")
    kernel_table(args)
    if args.only_kernels:
        return
    print()
    here = measure_here(args)
    stock = child(args, "engine", {"PERMEANT_BLAS": "none", "PERMEANT_WEIGHTS": "quantized"})
    # OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep when idle; under load, spinning threads
    # starve each other (0.7 against 27 tok/s measured in the same minutes).
    ref = child(args, "llamacpp", {"OMP_WAIT_POLICY": "PASSIVE"})

    (rp, rd), (ep, ed) = here["median"]["raw"], here["median"]["engine"]
    print(f"SmolLM2-135M-Instruct Q4_1, {args.prompt_tokens}-token prompt, {args.decode_tokens} "
          f"decoded tokens, median of {args.repeats} ({load()})")
    print(f"{'configuration':<48}{'prefill tok/s':>14}{'decode tok/s':>14}")
    print(f"{'raw mlx_lm stream_generate (' + here['weights'] + ', ' + here['blas'][:8] + ')':<48}"
          f"{rp:>14.1f}{rd:>14.1f}")
    print(f"{'permeant engine run_turn (same model)':<48}{ep:>14.1f}{ed:>14.1f}")
    if stock:
        sp, sd = stock["median"]["raw"]
        print(f"{'MLX stock CPU path (quantized, reference BLAS)':<48}{sp:>14.1f}{sd:>14.1f}")
    if ref:
        print(f"{'llama.cpp (same GGUF, OMP_WAIT_POLICY=PASSIVE)':<48}{ref['pf']:>14.1f}"
              f"{ref['dec']:>14.1f}")
    print()
    print(f"kernels in this process: {here['kernels'][0]}; sgemv {here['kernels'][1]}")
    print(f"engine cost vs raw mlx_lm: prefill {100 * (1 - ep / rp):+.1f}%, "
          f"decode {100 * (1 - ed / rd):+.1f}% (positive = engine slower)")
    if stock:
        print(f"chosen CPU path vs MLX stock: prefill x{rp / sp:.1f}, decode x{rd / sd:.1f}")
    if ref:
        print(f"vs llama.cpp: prefill x{rp / ref['pf']:.2f}, decode x{rd / ref['dec']:.2f}")
    build, run = here["graph_ms"]
    print(f"decode step (sequential): Python graph building {build:.1f} ms, evaluation "
          f"{run:.1f} ms ({100 * build / (build + run):.0f}% building)")
    print("start-up ms (this process): " + ", ".join(f"{k} {v}" for k, v in
                                                     here["load_ms"].items()))
    if stock:
        print("start-up ms (stock path):   " + ", ".join(f"{k} {v}" for k, v in
                                                         stock["load_ms"].items()))
    print(f"transformers imported by the engine path: {here['transformers']}")
    print(load())


if __name__ == "__main__":
    main()
