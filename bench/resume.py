"""Resume against re-prefill: what a KV snapshot costs to write and to restore (load, verify,
attach), what re-reading the same conversation costs instead, how restore compares with a plain
read of the same bytes and with mlx-lm's own prompt-cache files, and a whole-workspace cold
start (a new process, model plus three agents restored and ready).

    .venv/bin/python bench/resume.py [--contexts 512,2048,4096] [--repeats 5] [--no-rebuild-start]
        [--no-sliding | --sliding-only] [--sliding-contexts 1024] [--sliding-model gemma3-270m]

The last section (bench/resume_sliding.py) adds a sliding-window model: a Gemma-3-shaped one
past its window against the same shape with every layer full attention.

Every figure is measured in this run, on the embedded SmolLM2-135M-Instruct. "cold" means the
files' pages were dropped from the page cache first (posix_fadvise DONTNEED after fsync), which
approximates a first read after a reboot; "warm" is a second read of files just written. A
"plain read" reads the snapshot's files (manifest and blocks) into one reused buffer, faulted in
beforehand: the cost of the bytes alone. bench/resume_incremental.py adds the incremental saves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

USERS = [
    "Our payment API returns intermittent 502 errors under load. Where do we start?",
    "The retry logic doubles the traffic when the card network is slow. Is that the cause?",
    "How should we change the connection pool and the timeouts?",
    "What would you log and measure to confirm the fix in production?",
    "How do we roll this out without another outage?",
]
REPLY = ("Start with the gateway logs: correlate each 502 with the upstream latency of the card "
         "network and with the size of the database connection pool at that moment. If the "
         "pool is exhausted, requests queue, time out and are retried; each retry adds load, "
         "so the failure feeds itself. Cap retries with exponential backoff and jitter, make "
         "the payment calls idempotent with a request key, and size the pool from measured "
         "concurrency rather than a guess. Then add a circuit breaker in front of the card "
         "network so that a slow upstream degrades one feature instead of the whole API. ")


def conversation(tok, system: str, n: int):
    """An Agent whose cached ids (expected_ids) are exactly n tokens."""
    from permeant_tui.engine.agent import Agent, Turn

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    agent = Agent("bench", "technical", "Bench", system)
    i = 0
    while len(agent.expected_ids(tok)) < n:
        reply = REPLY * 2
        agent.turns.append(Turn(USERS[i % len(USERS)], reply, (*tok.encode(reply), im_end)))
        i += 1
    last = agent.turns[-1]
    head = len(agent.expected_ids(tok)) - len(last.generated_ids)
    ids = last.generated_ids[: n - head]
    agent.turns[-1] = Turn(last.user, tok.decode(list(ids)), tuple(ids))
    assert len(agent.expected_ids(tok)) == n
    return agent


def prefilled_agent(tokens: int):
    """(the embedded model, the ids, a live Agent holding them in its cache) for a conversation
    of `tokens` tokens, built by prefill: what the focused benchmarks start from."""
    from permeant_tui.engine.agent import DEFAULT_AGENTS, Agent
    from permeant_tui.engine.generation import prefill
    from permeant_tui.engine.models import load_model

    lm = load_model(None)
    agent = conversation(lm.tokenizer, DEFAULT_AGENTS[0][3], tokens)
    ids = agent.expected_ids(lm.tokenizer)
    live = Agent("bench", "technical", "Bench", agent.system)
    prefill(lm.model, live, ids)
    return lm, ids, live


def drop_cache(path: Path) -> bool:
    """Evict a file's (clean) pages from the page cache. False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def timed_with(fn, setup, repeats: int) -> float:
    """Median ms of fn, each run after an untimed setup()."""
    out = []
    for _ in range(repeats):
        setup()
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def measure_context(lm, n: int, folder: Path, repeats: int) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache, trim_prompt_cache
    from resume_incremental import PlainReader, fresh, snapshot_files

    from permeant_tui.engine.agent import DEFAULT_AGENTS, Agent
    from permeant_tui.engine.generation import prefill
    from permeant_tui.engine.snapshot import _tensor_checksum, attach, read_snapshot, write_snapshot

    tok = lm.tokenizer
    agent = conversation(tok, DEFAULT_AGENTS[0][3], n)
    ids = agent.expected_ids(tok)
    render_ms = timed(lambda: agent.expected_ids(tok), repeats)

    live = Agent("bench", "technical", "Bench", agent.system)
    t = time.perf_counter()
    prefill(lm.model, live, ids)
    prefill_ms = (time.perf_counter() - t) * 1000

    path = folder / f"ws-{n}/agents/bench/kv.safetensors"
    save_ms = timed_with(lambda: write_snapshot(path, live.cache, ids, lm.identity, "bench"),
                         lambda: fresh(path, live.cache), repeats)  # a first save: every block
    files = snapshot_files(path)
    size = sum(p.stat().st_size for p in files)
    reader = PlainReader(size)

    def restore():
        pairs, _, _ = read_snapshot(path, lm.identity, ids)
        return attach(lm.model, pairs)

    restore()  # first read after the write: warm page cache from here on
    restore_ms = timed(restore, repeats)
    pairs, _, _ = read_snapshot(path, lm.identity, ids)
    flat = [a for kv in pairs for a in kv]
    checksum_ms = timed(lambda: _tensor_checksum(flat), repeats)
    read_ms = timed(lambda: reader.read(files), repeats)
    la = load_avg()
    cold = all([drop_cache(p) for p in files])
    cold_restore_ms = timed(restore, 1) if cold else None
    cold_read_ms = ([drop_cache(p) for p in files], timed(lambda: reader.read(files), 1))[1] \
        if cold else None

    # The restored state continues exactly like the live one: next-token logits compared.
    restored = restore()
    probe = mx.array([[ids[-1]]])
    a = lm.model(probe, cache=live.cache)
    b = lm.model(probe, cache=restored)
    identical = bool(mx.array_equal(a, b).item())
    max_diff = float(mx.max(mx.abs(a - b)).item())
    trim_prompt_cache(live.cache, 1)

    # mlx-lm's own prompt-cache files (no identity, checksum or token check), same cache.
    mpath = folder / f"mlx-lm-{n}.safetensors"
    mlx_save_ms = timed(lambda: save_prompt_cache(str(mpath), live.cache), repeats)

    def mlx_load():
        c = load_prompt_cache(str(mpath))
        mx.eval([x.state[:2] for x in c])

    mlx_load()
    mlx_load_ms = timed(mlx_load, repeats)
    mb = size / 1e6
    return {
        "tokens": n, "snapshot_mb": round(mb, 1), "render_ms": render_ms,
        "reprefill_ms": prefill_ms, "save_ms": save_ms, "restore_ms": restore_ms,
        "checksum_ms": checksum_ms, "read_ms": read_ms, "cold_restore_ms": cold_restore_ms,
        "cold_read_ms": cold_read_ms, "restore_mb_s": mb / (restore_ms / 1000),
        "read_mb_s": mb / (read_ms / 1000), "mlx_lm_save_ms": mlx_save_ms,
        "mlx_lm_load_ms": mlx_load_ms, "logits_identical": identical, "max_logit_diff": max_diff,
        "live": live, "ids": ids, "agent": agent, "path": path, "load": la,
    }


def measure_llamacpp(results: list[dict], folder: Path, repeats: int) -> list[dict] | None:
    """llama.cpp (llama-cpp-python) on the same GGUF and the same token ids: its prefill, and
    its own sequence-state files (llama_state_seq_save_file / _load_file, what llama-server's
    /slots?action=save|restore call). KV in f32, as ours, so the bytes are comparable."""
    try:
        import ctypes

        import llama_cpp
        import numpy as np

        from permeant_tui.engine.llamacpp import LlamaCppRuntime
        from permeant_tui.engine.models import default_model_path
    except ImportError:
        return None
    n_max = max(r["tokens"] for r in results)
    rt = LlamaCppRuntime(str(default_model_path()), n_ctx=n_max + 64, kv_dtype="f32",
                         n_threads=os.cpu_count() or 1)
    L = rt._L
    out = []
    try:
        for r in results:
            ids = r["ids"]
            t = time.perf_counter()
            rt.prefill(ids[:-1])
            prefill_ms = (time.perf_counter() - t) * 1000
            want = rt.decode(ids[-1:]).copy()  # next-token logits without a save/restore
            rt.prefill(ids[:-1])
            f = folder / f"llamacpp-{r['tokens']}.bin"
            n_keep = len(ids) - 1
            toks = (L.llama_token * n_keep)(*ids[:-1])
            save_ms = timed(lambda f=f, toks=toks, n=n_keep: L.llama_state_seq_save_file(
                rt._ctx, str(f).encode(), 0, toks, n), repeats)
            cap = (L.llama_token * (n_max + 64))()
            n_out = ctypes.c_size_t(0)

            def load(f=f, cap=cap, n_out=n_out):
                rt.reset()
                if not L.llama_state_seq_load_file(rt._ctx, str(f).encode(), 0, cap,
                                                   len(cap), ctypes.byref(n_out)):
                    raise RuntimeError("llama_state_seq_load_file failed")

            load()
            load_ms = timed(load, repeats)
            rt.n_past = len(ids) - 1
            got = rt.decode(ids[-1:])
            out.append({"tokens": r["tokens"], "prefill_ms": prefill_ms, "save_ms": save_ms,
                        "load_ms": load_ms, "mb": f.stat().st_size / 1e6,
                        "identical": bool(np.array_equal(got, want)),
                        "version": llama_cpp.__version__})
    finally:
        rt.close()
    return out


COLD_START = r"""
import json, os, sys, time
born = float(sys.argv[4])  # the parent's clock just before it spawned this process
sys.path.insert(0, sys.argv[3])
from permeant_tui.engine import runtime
runtime.prepare()
from permeant_tui.engine.events import AgentRestored
from permeant_tui.engine.worker import Engine
events = []
t0 = time.time()
engine = Engine(sys.argv[1], eager_restore=True, rebuild=sys.argv[2] == "rebuild",
                on_event=events.append)
engine.start()
engine.wait_ready(3600)
engine.call(lambda ctx: None).result()
ready = time.time()
mem = runtime.memory_figures()
print(json.dumps({
    "process_start_to_ready_ms": (ready - born) * 1000,
    "engine_start_to_ready_ms": (ready - t0) * 1000,
    "model_load_ms": engine.model_info().load_ms,
    "agents": [(e.agent_id, e.source, round(e.ms, 1), e.tokens) for e in events
               if isinstance(e, AgentRestored)],
    "rss_mb": mem.rss_bytes / 1e6, "mlx_active_mb": mem.mlx_active_bytes / 1e6,
    "mlx_peak_mb": mem.mlx_peak_bytes / 1e6}), flush=True)
os._exit(0)  # measured; do not let shutdown write the rebuilt snapshots back
"""


def build_workspace(folder: Path, lm, ctx: dict) -> None:
    """Three agents of ctx's length, one prefill for all three snapshots: each agent's system
    prompt differs by one character (so do its token ids and so its blocks' names: no block is
    shared), and its snapshot holds the live cache's K/V under its own ids (what a restore costs
    does not depend on what the tokens say)."""
    from permeant_tui.engine.settings import AgentSpec, WorkspaceSettings, save_settings
    from permeant_tui.engine.snapshot import write_snapshot
    from permeant_tui.engine.workspace import Workspace

    tok, n = lm.tokenizer, len(ctx["ids"])
    base = ctx["agent"].system
    systems = [s for s in (f"{base} ({c})" for c in "ABCDEFGHJKLMNPQRSTUVWXYZ")
               if len(tok.encode(s)) == len(tok.encode(f"{base} (A)"))][:3]
    names = ("technical", "business", "coordinator")
    save_settings(folder, WorkspaceSettings(agents=[AgentSpec(i, i, i.title(), s)
                                                    for i, s in zip(names, systems, strict=True)]))
    ws = Workspace.open(folder)
    for a in ws.agents.values():
        convo = conversation(tok, a.system, n)
        for turn in convo.turns:
            ws.append_turn(a, turn)
        write_snapshot(ws.snapshot_path(a.agent_id), ctx["live"].cache, convo.expected_ids(tok),
                       lm.identity, a.agent_id, ws.blocks)
    from permeant_tui.engine.snapshot_format import BLOCK_TOKENS, block_spans

    per_agent = len(block_spans(n // BLOCK_TOKENS * BLOCK_TOKENS, BLOCK_TOKENS))
    assert len(ws.blocks.names()) == 3 * per_agent, "blocks shared between the agents"


def cold_start(folder: Path, mode: str, drop: list[Path]) -> dict:
    for p in drop:
        drop_cache(p)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    born = time.time()
    out = subprocess.run([sys.executable, "-c", COLD_START, str(folder), mode, root, repr(born)],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"cold start ({mode}) failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load": load_avg()}


def fmt(v, spec=".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="512,2048,4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-rebuild-start", action="store_true",
                    help="skip the cold start that rebuilds all three agents by prefill (slow)")
    ap.add_argument("--no-llamacpp", action="store_true",
                    help="skip the llama.cpp baseline (used when llama-cpp-python is installed)")
    ap.add_argument("--no-sliding", action="store_true", help="skip the sliding-window section")
    ap.add_argument("--sliding-only", action="store_true", help="run only that section")
    ap.add_argument("--sliding-contexts", default="1024")
    ap.add_argument("--sliding-model", default="gemma3-270m",
                    help="a real sliding-window model for a second row, when it loads")
    args = ap.parse_args()

    from permeant_tui.engine import runtime

    blas = runtime.prepare()
    if args.sliding_only:
        return sliding(args)
    import mlx.core as mx

    from permeant_tui.engine.models import load_model
    from permeant_tui.paths import cache_dir

    lm = load_model(None, digest_cache=cache_dir() / "digests")  # as the engine: cached digest
    print(f"# bench/resume.py  {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine  {platform.machine()} {platform.system()}, {os.cpu_count()} cores; "
          f"mlx {mx.__version__}, {runtime.device_label()}; BLAS {blas}")
    print(f"model    {lm.identity.name}, {lm.weights_mode} weights, KV {lm.identity.kv_dtype}, "
          f"{lm.identity.n_layers} layers x {lm.identity.n_kv_heads} kv heads x "
          f"{lm.identity.head_dim}")
    print(f"load average at start {load_avg()}\n")

    tmp = Path(tempfile.mkdtemp(prefix="permeant-bench-resume-"))
    results = []
    try:
        for n in [int(x) for x in args.contexts.split(",")]:
            print(f"context {n}: re-prefill, save x{args.repeats}, restore x{args.repeats} ...",
                  file=sys.stderr, flush=True)
            results.append(measure_context(lm, n, tmp, args.repeats))

        print("## Per agent: snapshot against re-prefill (median ms)\n")
        print("| tokens | MB | save | restore | (checksum) | re-prefill | re-prefill / restore "
              "| logits after restore |")
        print("|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in results:
            same = "bit-identical" if r["logits_identical"] else f"max diff {r['max_logit_diff']:.2g}"
            print(f"| {r['tokens']} | {r['snapshot_mb']} | {r['save_ms']:.1f} | "
                  f"{r['restore_ms']:.1f} | {r['checksum_ms']:.1f} | {r['reprefill_ms']:.0f} | "
                  f"**{r['reprefill_ms'] / r['restore_ms']:.0f}x** | {same} |")
        print("\nrestore = read_snapshot (load + format/identity/checksum/token checks) + attach; "
              "(checksum) = the xxh3-128 pass alone, included in restore; the chat-template "
              "render of the transcript that ensure_resident also does took (median) "
              + ", ".join(f"{r['render_ms']:.1f} ms at {r['tokens']}" for r in results) + ".\n")

        print("## Restore against reading the same bytes (median ms, MB/s)\n")
        print("| tokens | restore warm | plain read warm | restore / read | restore MB/s | "
              "read MB/s | restore cold | plain read cold | load avg |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in results:
            print(f"| {r['tokens']} | {r['restore_ms']:.1f} | {r['read_ms']:.1f} | "
                  f"{r['restore_ms'] / r['read_ms']:.2f}x | {r['restore_mb_s']:.0f} | "
                  f"{r['read_mb_s']:.0f} | {fmt(r['cold_restore_ms'])} | "
                  f"{fmt(r['cold_read_ms'])} | {r['load']} |")
        print("\nplain read = the same files (manifest and blocks) read into one reused buffer, "
              "faulted in beforehand (a page-cache read).")

        print("\n## Same cache through mlx-lm's save_prompt_cache / load_prompt_cache "
              "(median ms; no checks)\n")
        print("| tokens | mlx-lm save | permeant save | mlx-lm load+eval | permeant restore "
              "(verified) |")
        print("|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['tokens']} | {r['mlx_lm_save_ms']:.1f} | {r['save_ms']:.1f} | "
                  f"{r['mlx_lm_load_ms']:.1f} | {r['restore_ms']:.1f} |")

        lcpp = None if args.no_llamacpp else measure_llamacpp(results, tmp, args.repeats)
        if lcpp:
            print(f"\n## llama.cpp (llama-cpp-python {lcpp[0]['version']}), same GGUF, same token "
                  "ids, f32 KV: sequence-state files (median ms)\n")
            print("| tokens | llama.cpp prefill | permeant re-prefill (MLX) | llama.cpp save file | "
                  "llama.cpp load file | MB | prefill / load | logits after load | "
                  "permeant restore |")
            print("|---:|---:|---:|---:|---:|---:|---:|---|---:|")
            for c, r in zip(lcpp, results, strict=True):
                same = "bit-identical" if c["identical"] else "differ"
                print(f"| {c['tokens']} | {c['prefill_ms']:.0f} | {r['reprefill_ms']:.0f} | "
                      f"{c['save_ms']:.1f} | {c['load_ms']:.1f} | {c['mb']:.1f} | "
                      f"{c['prefill_ms'] / c['load_ms']:.0f}x | {same} | {r['restore_ms']:.1f} |")
            print("\nllama.cpp's load checks magic/version, token capacity, layer count, V layout, "
                  "K/V types and row sizes; no checksum, no weights or tokenizer identity.")
        elif not args.no_llamacpp:
            print("\n(llama-cpp-python not installed: no llama.cpp baseline in this run)")

        big = max(results, key=lambda r: r["tokens"])
        if big["tokens"] >= 4096:
            import resume_incremental

            print()
            resume_incremental.run(lm, big["live"].cache, big["ids"], big["reprefill_ms"],
                                   tmp / "incremental", args.repeats)
        else:
            print("\n(incremental snapshots: needs a context of 4096 tokens; skipped)")
        ws = tmp / "workspace"
        build_workspace(ws, lm, big)
        from permeant_tui.engine.models import default_model_path

        files = [default_model_path(), *sorted(ws.glob("agents/*/kv.safetensors")),
                 *sorted(ws.glob("kv-blocks/*.kvb"))]
        for r in results:  # free this process's caches before the child processes run
            r.pop("live")
        print(f"\n## Whole workspace cold start: a new process, model + three {big['tokens']}-"
              "token agents ready\n", flush=True)
        runs = [("restore, page cache dropped", cold_start(ws, "restore", files)),
                ("restore, warm page cache", cold_start(ws, "restore", []))]
        if not args.no_rebuild_start:
            print("cold start with --rebuild (3 re-prefills) ...", file=sys.stderr, flush=True)
            runs.append(("rebuild all by prefill", cold_start(ws, "rebuild", [])))
        print("| start | process start -> ready ms | model load ms | agents (source ms) | "
              "RSS MB | MLX active MB | MLX peak MB | load avg |")
        print("|---|---:|---:|---|---:|---:|---:|---|")
        for name, c in runs:
            agents = ", ".join(f"{a} {s} {ms:.0f}" for a, s, ms, _ in c["agents"])
            print(f"| {name} | {c['process_start_to_ready_ms']:.0f} | {c['model_load_ms']:.0f} | "
                  f"{agents} | {c['rss_mb']:.0f} | {c['mlx_active_mb']:.0f} | "
                  f"{c['mlx_peak_mb']:.0f} | {c['load']} |")
        print("\nprocess start -> ready: from the parent's clock just before it spawned the "
              "process (not psutil's create_time, which can be a second early on a VM).")
        if len(runs) == 3:
            print(f"\ncold start, restore (page cache dropped) against rebuild: "
                  f"**{runs[2][1]['process_start_to_ready_ms'] / runs[0][1]['process_start_to_ready_ms']:.1f}x"
                  f"** faster to ready; the agents alone: "
                  f"{sum(a[2] for a in runs[2][1]['agents']) / sum(a[2] for a in runs[0][1]['agents']):.0f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_sliding:
        print()
        sliding(args)
    return 0


def sliding(args) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import resume_sliding

    resume_sliding.run([int(x) for x in args.sliding_contexts.split(",")], args.repeats,
                       args.sliding_model or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
