"""MLX -> llama.cpp KV migration (issue 6; sliding-window models, issue 13).

Per prompt (the 8 fixture chats plus long synthetic conversations rendered with the chat
template, 1k-4k tokens), with one embedded GGUF in both runtimes (`--model smollm2`, the
default, or `--model gemma3-270m`: sliding window 512 on 15 of 18 layers, so llama.cpp holds an
iSWA state whose SWA cache keeps only the window; the fixture chats are re-rendered with
Gemma's turn format):

  (a) llama.cpp continuing from MLX's KV, attached as a built seq-state blob (no re-prefill):
      MLX prefills ids[:-1], llama.cpp replays ids[-1] and decodes 16 greedy tokens
  (b) llama.cpp continuing from its own prefill of ids[:-1] (same replay of ids[-1])
  (c) MLX continuing from its own cache

It prints the matching greedy prefixes (a vs b, a vs c, b vs c), the logit difference at the
first split of a vs b, a negative control (zeroed K and V payload attached), and timings:
attach (build blob + set into a fresh context) vs llama.cpp re-prefill of the same tokens vs
llama.cpp's own whole-context save_state/load_state and its own seq-state get/set, with ratios.
Then a warm-start cost model calibrated once (prefill tok/s, attach MB/s + fixed cost) and its
predictions against the measured times.

Usage: .venv/bin/python bench/cross_runtime.py [--model gemma3-270m] [--max-tokens 4096]
       [--json out.json]
Needs llama-cpp-python (the `llamacpp` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from permeant_tui.engine.generation import common_prefix as prefix

N_GREEDY = 16
CHUNK = 512
REPEATS = 3


def fixtures_dir() -> Path:
    """llama.cpp's outputs for the embedded GGUF, kept in the repository (tests/data)."""
    return Path(__file__).resolve().parents[1] / "tests" / "data"


def gguf_path(model: str) -> str:
    from permeant_tui.engine import embedded
    from permeant_tui.engine.errors import ModelLoadError

    try:
        return str(embedded.model_path(embedded.EMBEDDED[model]))
    except ModelLoadError as exc:
        sys.exit(str(exc))


def fixture_prompts(tok, cases, model: str) -> list[tuple[str, list[int]]]:
    """The fixture chats: their recorded ids (SmolLM2's tokenizer) or, for another model, the
    same system and user text rendered with that model's chat format."""
    if model == "smollm2":
        return [(f"fixture{i}", c["prompt_ids"]) for i, c in enumerate(cases)]
    return [(f"fixture{i}", tok.apply_chat_template(
        [{"role": "system", "content": c["system"]}, {"role": "user", "content": c["user"]}],
        add_generation_prompt=True)) for i, c in enumerate(cases)]


def long_conversation(tok, cases, target: int) -> list[int]:
    """A synthetic multi-turn chat of about `target` tokens, ending with the generation prompt."""
    msgs = [{"role": "system", "content": cases[0]["system"]}]
    i = 0
    ids: list[int] = []
    while True:
        c = cases[i % len(cases)]
        user = {"role": "user", "content": f"(point {i + 1}) {c['user']}"}
        trial = tok.apply_chat_template(msgs + [user], add_generation_prompt=True)
        if len(trial) > target and ids:
            return ids
        msgs.append(user)
        ids = trial
        msgs.append({"role": "assistant",
                     "content": f"{c['text']} Regarding point {i + 1}, {c['system'].lower()}"})
        i += 1


def best_of(fn, n=REPEATS):
    best, out = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def mlx_prefill(model, ids):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for a in range(0, len(ids), CHUNK):
        mx.eval(model(mx.array([ids[a:a + CHUNK]]), cache=cache))
        # keep the cache materialised chunk by chunk
        mx.eval([c.state for c in cache])
    return cache


def mlx_greedy(model, cache, last_id, n):
    import mlx.core as mx

    toks, logits_list, tok = [], [], last_id
    for _ in range(n):
        lg = model(mx.array([[tok]]), cache=cache)[0, -1].astype(mx.float32)
        lg_np = np.array(lg)
        tok = int(lg_np.argmax())
        toks.append(tok)
        logits_list.append(lg_np)
    return toks, logits_list


def lcpp_greedy(rt, last_id, n):
    """Replay the last prompt token, then n greedy steps; tokens and each step's logits."""
    lg = rt.decode([last_id]).copy()
    toks, logits_list = [], []
    for i in range(n):
        t = int(lg.argmax())
        toks.append(t)
        logits_list.append(lg)
        if i + 1 < n:
            lg = rt.decode([t]).copy()
    return toks, logits_list


def split_figures(ta, la, tb, lb):
    """At the first split of two greedy paths (same history up to it): max |dlogit| and the
    top-2 margins of both sides. Without a split: max |dlogit| over all steps."""
    p = prefix(ta, tb)
    if p == len(ta):
        d = max(np.abs(x - y).max() for x, y in zip(la, lb, strict=True))
        return {"split": None, "max_dlogit": float(d)}

    def margin(lg):
        s = np.sort(lg)
        return float(s[-1] - s[-2])

    return {"split": p, "max_dlogit": float(np.abs(la[p] - lb[p]).max()),
            "margin_a": margin(la[p]), "margin_b": margin(lb[p])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["smollm2", "gemma3-270m"], default="smollm2")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--long", default="1024,2048,4096", help="long prompt sizes (tokens)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    from permeant_tui.engine import runtime

    blas = runtime.prepare()
    import mlx.core as mx

    from permeant_tui.engine import llamacpp as lc
    from permeant_tui.engine.llamacpp.bridge import synthetic_blob
    from permeant_tui.engine.models import load_model

    path = gguf_path(args.model)
    cases = json.loads((fixtures_dir() / "smollm2_greedy_llamacpp.json").read_text())["cases"]
    t = time.perf_counter()
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    windows = lm.identity.layer_windows()
    print(f"MLX: {mx.default_device()}, BLAS {blas}; {lm.identity.name} ({lm.weights_mode}) "
          f"loaded in {time.perf_counter() - t:.1f} s; {sum(1 for w in windows if w)} of "
          f"{len(windows)} layers slide (window {max(windows)}); RoPE {lm.identity.rope_layout}")
    import llama_cpp

    print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}; "
          f"{llama_cpp.llama_print_system_info().decode().strip()}")
    longs = [int(x) for x in args.long.split(",") if x and int(x) <= args.max_tokens]
    n_ctx = max([256] + longs) + 2 * N_GREEDY + 64
    rt = lc.LlamaCppRuntime(path, n_ctx=n_ctx, kv_dtype="f32", n_threads=args.threads,
                            layer_windows=windows)
    print(f"llama.cpp context: n_ctx {n_ctx}, KV f32, flash_attn off (V transposed), "
          f"{args.threads} thread(s); machine load average {os.getloadavg()[0]:.1f}")

    prompts = fixture_prompts(tok, cases, args.model)
    for n in longs:
        prompts.append((f"chat~{n}", long_conversation(tok, cases, n)))

    # --- cost model calibration (once) ---
    # prefill: tok/s on ~500 tokens. attach: build + set of synthetic blobs (the values do not
    # matter to the time) at two sizes: a fixed cost (the context) plus bytes / bandwidth.
    calib = long_conversation(tok, cases, 512)[:512]
    t_pf = time.perf_counter()
    rt.prefill(calib)  # includes its fresh context, like every prefill timed below
    t_pf = time.perf_counter() - t_pf
    def synthetic_attach(n_tok, fresh):
        def go():  # zeros: the time does not depend on the values
            return rt.set_seq_state(synthetic_blob(rt, n_tok), fresh=fresh)
        return best_of(go)[0], len(synthetic_blob(rt, n_tok))

    model_fit = {}
    for fresh in (True, False):
        (t_small, b_small), (t_big, b_big) = synthetic_attach(16, fresh), synthetic_attach(
            2048, fresh)
        bw = (b_big - b_small) / max(t_big - t_small, 1e-6)
        model_fit[fresh] = (t_small - b_small / bw, bw)
    # prefill(N) = fresh context + N / tok/s (linear: attention makes long prompts slower)
    prefill_tps = len(calib) / max(t_pf - model_fit[True][0], 1e-6)
    print(f"\ncost model: llama.cpp prefill = fresh context + N / {prefill_tps:.0f} tok/s "
          f"(calibrated on {len(calib)} tokens); "
          f"attach = build + set, fresh context {model_fit[True][0] * 1e3:.0f} ms + "
          f"{model_fit[True][1] / 1e6:.0f} MB/s, cleared context {model_fit[False][0] * 1e3:.0f}"
          f" ms + {model_fit[False][1] / 1e6:.0f} MB/s (synthetic blobs of 16 and 2048 tokens); "
          f"blob {len(synthetic_blob(rt, 1000)) / 1e6:.1f} MB at 1000 tokens (f32)")

    rows = []
    for name, ids in prompts:
        n = len(ids) - 1
        head, last = ids[:-1], ids[-1]
        # MLX prefill + extraction
        t0 = time.perf_counter()
        cache = mlx_prefill(model, head)
        t_mlx_prefill = time.perf_counter() - t0
        t_extract, (ks, vs) = best_of(lambda cache=cache: lc.kv_from_mlx_cache(cache), 1)
        layers = lc.layers_from_payload(ks, vs, n)  # a sliding layer: its window
        # (a) attach: build + set (fresh context), timed best of 3
        t_build, blob = best_of(lambda layers=layers: rt.state_blob(layers))
        t_set_cleared, _ = best_of(lambda blob=blob: rt.set_seq_state(blob, fresh=False))
        t_set, _ = best_of(lambda blob=blob: rt.set_seq_state(blob))
        ta, la = lcpp_greedy(rt, last, N_GREEDY)
        # (b) llama.cpp's own prefill of the same tokens
        t0 = time.perf_counter()
        rt.prefill(head)
        t_reprefill = time.perf_counter() - t0
        t_save, whole = best_of(rt.save_state)
        t_getseq, own_blob = best_of(rt.get_seq_state)
        t_load, _ = best_of(lambda whole=whole, n=n: rt.load_state(whole, n))
        t_setseq, _ = best_of(lambda own_blob=own_blob: rt.set_seq_state(own_blob))
        tb, lb = lcpp_greedy(rt, last, N_GREEDY)
        # (c) MLX from its own cache
        tc, lcx = mlx_greedy(model, cache, last, N_GREEDY)
        del cache
        # negative control: zeroed payload
        rt.attach_layers([lc.LayerKV(x.start, np.zeros_like(x.keys), np.zeros_like(x.values))
                          for x in layers])
        tz, lz = lcpp_greedy(rt, last, N_GREEDY)
        nbytes = len(blob)
        pred_prefill = model_fit[True][0] + n / prefill_tps
        pred_attach = model_fit[True][0] + nbytes / model_fit[True][1]
        pred_attach_cleared = model_fit[False][0] + nbytes / model_fit[False][1]
        row = {
            "prompt": name, "tokens": len(ids),
            "prefix_ab": prefix(ta, tb), "prefix_ac": prefix(ta, tc), "prefix_bc": prefix(tb, tc),
            "prefix_zero_b": prefix(tz, tb),
            "split_ab": split_figures(ta, la, tb, lb),
            "split_ac": split_figures(ta, la, tc, lcx),
            "zero_first_dlogit": float(np.abs(lz[0] - lb[0]).max()),
            "blob_mb": nbytes / 1e6, "whole_state_mb": len(whole) / 1e6,
            "t_mlx_prefill": t_mlx_prefill, "t_extract": t_extract,
            "t_build": t_build, "t_set": t_set, "t_attach": t_build + t_set,
            "t_set_cleared": t_set_cleared, "t_attach_cleared": t_build + t_set_cleared,
            "t_reprefill": t_reprefill, "t_save": t_save, "t_load": t_load,
            "t_get_seq": t_getseq, "t_set_seq": t_setseq,
            "pred_attach": pred_attach, "pred_attach_cleared": pred_attach_cleared,
            "pred_prefill": pred_prefill,
        }
        rows.append(row)
        s = row["split_ab"]
        split = ("none" if s["split"] is None else
                 f"@{s['split']} margins {s['margin_a']:.2f}/{s['margin_b']:.2f}")
        print(f"{name:>10} {len(ids):5d} tok | prefix a-b {row['prefix_ab']:2d} a-c "
              f"{row['prefix_ac']:2d} b-c {row['prefix_bc']:2d} zeroed-b {row['prefix_zero_b']:2d}"
              f" | a-b split {split} max|dlogit| {s['max_dlogit']:.2f}; zeroed first-step "
              f"{row['zero_first_dlogit']:.1f}")

    print("\ntimings (s), best of 3 except prefills: attach = build blob + set it into a fresh "
          "context (attach) or into this context cleared (attach_); MLX -> numpy extraction "
          "apart. re-prefill = llama.cpp prefill of the same tokens (fresh context). own = "
          "llama.cpp's save/load of its whole context state, get/set of its own seq state")
    print(f"{'prompt':>10} {'tok':>5} {'blob MB':>7} {'extract':>7} {'build':>6} {'set':>6} "
          f"{'attach':>6} {'attach_':>7} {'reprefill':>9} {'x':>6} {'x_':>6} {'save':>6} "
          f"{'load':>6} {'getseq':>6} {'setseq':>6} {'attach/load':>11}")
    for r in rows:
        print(f"{r['prompt']:>10} {r['tokens']:5d} {r['blob_mb']:7.1f} {r['t_extract']:7.3f} "
              f"{r['t_build']:6.3f} {r['t_set']:6.3f} {r['t_attach']:6.3f} "
              f"{r['t_attach_cleared']:7.3f} {r['t_reprefill']:9.2f} "
              f"{r['t_reprefill'] / r['t_attach']:6.1f} "
              f"{r['t_reprefill'] / r['t_attach_cleared']:6.1f} {r['t_save']:6.3f} "
              f"{r['t_load']:6.3f} {r['t_get_seq']:6.3f} {r['t_set_seq']:6.3f} "
              f"{r['t_attach'] / r['t_load']:11.2f}")
    print("(x = reprefill / attach, x_ = reprefill / attach into a cleared context)")

    print("\nwarm-start cost model: predicted vs measured (s)")
    print(f"{'prompt':>10} {'tok':>5} {'attach pred':>11} {'meas':>6} {'attach_ pred':>12} "
          f"{'meas':>6} {'prefill pred':>12} {'meas':>7} {'x pred':>7} {'meas':>6}")
    for r in rows:
        print(f"{r['prompt']:>10} {r['tokens']:5d} {r['pred_attach']:11.3f} {r['t_attach']:6.3f} "
              f"{r['pred_attach_cleared']:12.3f} {r['t_attach_cleared']:6.3f} "
              f"{r['pred_prefill']:12.2f} {r['t_reprefill']:7.2f} "
              f"{r['pred_prefill'] / r['pred_attach']:7.1f} "
              f"{r['t_reprefill'] / r['t_attach']:6.1f}")
    tot = len(rows) * N_GREEDY
    print(f"\nsummary: a-b exact on {sum(r['prefix_ab'] == N_GREEDY for r in rows)}/{len(rows)} "
          f"prompts, mean prefix a-b {sum(r['prefix_ab'] for r in rows) / len(rows):.1f}/16, "
          f"a-c {sum(r['prefix_ac'] for r in rows) / len(rows):.1f}/16, "
          f"b-c {sum(r['prefix_bc'] for r in rows) / len(rows):.1f}/16; zeroed control "
          f"{sum(r['prefix_zero_b'] for r in rows)}/{tot} tokens")
    rt.close()
    if args.json:
        Path(args.json).write_text(json.dumps({
            "prefill_tps": prefill_tps,
            "attach_fit": {"fresh": model_fit[True], "cleared": model_fit[False]},
            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
