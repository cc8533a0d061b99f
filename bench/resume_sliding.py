"""Resume past the sliding window: a Gemma-3-shaped sliding-window model against the same shape
with every layer full attention. Restore (read_snapshot: load + every check, then attach)
against re-prefill, and snapshot bytes per token (a sliding layer stores only its window).

    .venv/bin/python bench/resume_sliding.py [--contexts 1024,4096] [--repeats 3] [--model M]
    (also run by bench/resume.py unless --no-sliding)

The tiny models are random-weight MLX directories built here with mlx-lm's own gemma3_text
class (Gemma 3 270M's shape: 18 layers, 640 hidden, 4 heads, 1 KV head of 256, window 512,
five sliding layers in six; the SmolLM2 tokenizer), so restore and prefill costs are those of
the real architecture; `--model` adds a row for a real model when it loads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resume import timed  # noqa: E402  (one timing helper for both resume benches)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

GEMMA3_270M_SHAPE = {
    "model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18,
    "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256,
    "max_position_embeddings": 32768, "tie_word_embeddings": True,
}
TEXT = ("Start with the gateway logs: correlate each 502 with the upstream latency of the card "
        "network and with the size of the database connection pool at that moment. ")


def build(folder: Path, tok, window: int, pattern: int) -> Path:
    """A random-weight gemma3_text directory (pattern 1: every layer full attention)."""
    from support.tiny_models import write_model_dir

    config = {**GEMMA3_270M_SHAPE, "sliding_window": window, "sliding_window_pattern": pattern,
              "vocab_size": len(tok._tokenizer)}
    return write_model_dir(folder, config, tok, dtype="bfloat16")


def measure(lm, label: str, n: int, folder: Path, repeats: int) -> dict:
    import mlx.core as mx

    from permeant_tui.engine import kvcache
    from permeant_tui.engine.snapshot import attach, read_snapshot, write_snapshot

    ids = (lm.tokenizer.encode(TEXT) * (n // 8 + 8))[:n]
    t = time.perf_counter()
    cache = kvcache.new_cache(lm.model)
    for a in range(0, n, 512):  # the engine's prefill step
        lm.model(mx.array([ids[a:a + 512]]), cache=cache)
        kvcache.eval_cache(cache)
    prefill_ms = (time.perf_counter() - t) * 1000
    from resume import timed_with
    from resume_incremental import fresh, snapshot_files

    path = folder / f"{label}-{n}/agents/bench/kv.safetensors"
    save_ms = timed_with(lambda: write_snapshot(path, cache, ids, lm.identity, "bench"),
                         lambda: fresh(path, cache), repeats)  # a first save: every block
    size = sum(p.stat().st_size for p in snapshot_files(path))  # manifest and blocks

    def restore():
        states, _, _ = read_snapshot(path, lm.identity, ids)
        c = attach(lm.model, states)
        kvcache.eval_cache(c)
        return c

    restore()
    restore_ms = timed(restore, repeats)
    probe = mx.array([[ids[-1]]])
    a = lm.model(probe, cache=kvcache.copy_cache(cache))
    b = lm.model(probe, cache=restore())
    same = bool(mx.array_equal(a, b).item())
    windows = [w for w in lm.identity.layer_windows() if w]
    return {"model": label, "tokens": n, "layers": lm.identity.n_layers,
            "sliding": f"{len(windows)} x {windows[0]}" if windows else "none",
            "mb": size / 1e6, "kb_per_token": size / n / 1e3, "save_ms": save_ms,
            "restore_ms": restore_ms, "prefill_ms": prefill_ms,
            "logits": "bit-identical" if same else "differ"}


def run(contexts: list[int], repeats: int, real: str | None = None, out=print) -> list[dict]:
    import shutil

    from permeant_tui.engine.models import load_model

    base = load_model(None)  # the embedded model: its tokenizer for the tiny directories
    tmp = Path(tempfile.mkdtemp(prefix="permeant-bench-sliding-"))
    rows = []
    try:
        models = [("gemma3-shaped, sliding", build(tmp / "sliding", base.tokenizer, 512, 6)),
                  ("same shape, all full", build(tmp / "full", base.tokenizer, 512, 1))]
        for label, folder in models:
            lm = load_model(str(folder))
            for n in contexts:
                print(f"{label} {n} ...", file=sys.stderr, flush=True)
                rows.append(measure(lm, label, n, tmp, repeats))
            del lm
        if real:
            try:
                lm = load_model(real)
            except Exception as exc:  # report, do not fail the bench
                out(f"(--model {real} did not load: {' '.join(str(exc).split())[:200]})\n")
            else:
                for n in contexts:
                    rows.append(measure(lm, lm.identity.name, n, tmp, repeats))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out("## Past the sliding window: restore against re-prefill, bytes per token (median ms)\n")
    out(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        f"({os.cpu_count()} cores)\n")
    out("| model | sliding layers | tokens | snapshot MB | KB / token | save | restore | "
        "re-prefill | re-prefill / restore | logits after restore |")
    out("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        out(f"| {r['model']} | {r['sliding']} of {r['layers']} | {r['tokens']} | {r['mb']:.1f} | "
            f"{r['kb_per_token']:.1f} | {r['save_ms']:.1f} | {r['restore_ms']:.1f} | "
            f"{r['prefill_ms']:.0f} | **{r['prefill_ms'] / r['restore_ms']:.0f}x** | "
            f"{r['logits']} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None, help="also measure this model (e.g. gemma3-270m)")
    args = ap.parse_args()
    from permeant_tui.engine import runtime

    runtime.prepare()
    run([int(x) for x in args.contexts.split(",")], args.repeats, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
