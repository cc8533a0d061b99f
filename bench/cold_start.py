"""Cold start of the workspace UI, split by stage: process spawn to first paint, to model ready,
to three agents restored from their snapshots and ready.

    .venv/bin/python bench/cold_start.py [--tokens 4096] [--runs 3] [--keep DIR]

The clock starts in this (parent) process just before the child is spawned (CLOCK_MONOTONIC is
shared by every process on Linux), not from psutil's create_time, which a VM rounds to its boot
time's whole seconds. The child is the real `PermeantApp` on the real `Engine`, run headless
(Textual's headless driver composes, lays out and renders as in a terminal); it notes each stage
as it passes. Stages:

  interpreter   spawn to the first line of the child (Python start, site, .pth files)
  cli imports   the `permeant` entry module (argument parser and every command's module)
  ui imports    Textual and the app's screens and widgets
  first paint   the workspace on screen (App.on_ready): a person can read and type
  model ready   ModelReady: MLX and mlx-lm imports, weights, tokenizer, identity
  agents ready  every agent restored from its snapshot (AgentRestored for each)

The workspace (three agents with the same N-token conversation, built by one prefill) is made
once per run, or kept with --keep. Runs are sequential; the load average is printed beside each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CHILD = r"""
import time
T = {"interpreter": time.monotonic()}
import json, os, sys
sys.path.insert(0, sys.argv[2])
import permeant_tui.cli  # what the `permeant` console script imports first
from permeant_tui.engine import runtime
runtime.prepare()
T["cli imports"] = time.monotonic()
from permeant_tui.app import PermeantApp
from permeant_tui.engine.events import AgentRestored, ModelLoading, ModelReady
from permeant_tui.engine.worker import Engine
T["ui imports"] = time.monotonic()
engine = Engine(sys.argv[1], purpose="bench/cold_start.py")
n_agents = len(engine.agents())
restored = []
sources = []


class Timed(PermeantApp):
    CSS_PATH = [os.path.join(os.path.dirname(sys.modules["permeant_tui.app"].__file__), p)
                for p in PermeantApp.CSS_PATH]

    def on_ready(self):
        T["first paint"] = time.monotonic()
        super().on_ready()

    def _sink(self, event):
        if isinstance(event, ModelLoading):
            T.setdefault("model: " + event.stage, time.monotonic())
        if isinstance(event, ModelReady):
            T["model ready"] = time.monotonic()
        if isinstance(event, AgentRestored):
            restored.append(event.agent_id)
            sources.append((event.agent_id, event.source, round(event.ms, 1)))
            if len(restored) == n_agents:
                T["agents ready"] = time.monotonic()
                self.call_from_thread(self.exit)
        super()._sink(event)


app = Timed(engine, sys.argv[1])
app.run(headless=True, size=(160, 48))
info = engine.model_info()
print(json.dumps({"marks": T, "agents": sources,
                  "transformers": "transformers" in sys.modules}), flush=True)
os._exit(0)  # measured; nothing to save
"""

ORDER = ("interpreter", "cli imports", "ui imports", "first paint", "model ready", "agents ready")


def workspace_folder(keep: str | None, tokens: int, prefix: str) -> Path:
    """`keep` (built there once and reused) or a new temporary folder, holding a workspace of
    three `tokens`-token agents."""
    folder = Path(keep or tempfile.mkdtemp(prefix=prefix))
    if not (folder / "workspace.json").exists():
        print(f"building a workspace of three {tokens}-token agents in {folder} ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        build_workspace(folder, tokens)
    return folder


def build_workspace(folder: Path, n: int) -> None:
    """Three agents sharing one n-token conversation (bench/resume.py's builder)."""
    from resume import build_workspace as build
    from resume import conversation

    from permeant_tui.engine import runtime
    from permeant_tui.engine.agent import DEFAULT_AGENTS, Agent
    from permeant_tui.engine.generation import prefill
    from permeant_tui.engine.models import load_model

    runtime.prepare()
    lm = load_model(None)
    agent = conversation(lm.tokenizer, DEFAULT_AGENTS[0][3], n)
    ids = agent.expected_ids(lm.tokenizer)
    live = Agent("bench", "technical", "Bench", agent.system)
    prefill(lm.model, live, ids)
    build(folder, lm, {"agent": agent, "live": live, "ids": ids})


def one_start(folder: Path, env: dict | None = None) -> dict:
    script = folder.parent / f".{folder.name}-cold-start-child.py"  # Textual wants a file
    script.write_text(CHILD)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(script), str(folder), str(ROOT)],
                       capture_output=True, text=True, timeout=1800,
                       env={**os.environ, **(env or {})})
    if r.returncode:
        raise SystemExit(f"child failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["at"] = {k: (v - t0) * 1000 for k, v in out["marks"].items()}
    out["load"] = os.getloadavg()[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", help="workspace folder to build once and reuse")
    ap.add_argument("--compare-eager-imports", action="store_true",
                    help="interleave starts with PERMEANT_LAZY_TRANSFORMERS=0 (mlx-lm imported "
                         "whole, transformers included) and print both")
    args = ap.parse_args()
    folder = workspace_folder(args.keep, args.tokens, "permeant-bench-cold-")
    # As `make run` does: with PYTHONDONTWRITEBYTECODE set, an editable install would compile
    # the package at every start.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "permeant_tui")],
                   check=True)
    one_start(folder)  # the first start after building may rewrite caches; not counted
    kinds = {"deferred transformers": {}}
    if args.compare_eager_imports:
        kinds["eager imports (PERMEANT_LAZY_TRANSFORMERS=0)"] = {"PERMEANT_LAZY_TRANSFORMERS": "0"}
    by_kind: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(args.runs):
        for kind, env in kinds.items():
            r = one_start(folder, env)
            by_kind[kind].append(r)
            at = r["at"]
            print(f"run {i + 1} {kind}: " + ", ".join(f"{k} {at[k]:.0f}" for k in ORDER
                                                       if k in at)
                  + f" ms  (load average {r['load']:.1f})", flush=True)
    for kind, runs in by_kind.items():
        print(f"\ncold start, {kind}, {args.tokens}-token agents x3, median of {args.runs} "
              f"(ms from spawn; stage = time since the previous mark)")
        print(f"{'mark':<14}{'at ms':>9}{'stage ms':>10}")
        prev = 0.0
        for k in ORDER:
            vals = [r["at"][k] for r in runs if k in r["at"]]
            if not vals:
                continue
            at = statistics.median(vals)
            print(f"{k:<14}{at:>9.0f}{at - prev:>10.0f}")
            prev = at
    if args.compare_eager_imports:
        lazy, eager = (by_kind[k] for k in kinds)
        pairs = [(a["at"]["model ready"], b["at"]["model ready"]) for a, b in
                 zip(lazy, eager, strict=True) if "model ready" in a["at"]
                 and "model ready" in b["at"]]
        if pairs:
            print("model ready, eager / deferred imports (median of paired runs): x"
                  f"{statistics.median(b / a for a, b in pairs):.2f}")
    runs = by_kind["deferred transformers"]
    last = runs[-1]
    ready = last["at"].get("model ready", float("inf"))  # "agents" and "settled" come after
    starts = sorted((v, k) for k, v in last["at"].items() if k.startswith("model: ")
                    and v <= ready)
    ends = [v for v, _ in starts[1:]] + [last["at"].get("model ready", 0.0)]
    print("model load stages (last run, ms): " + ", ".join(
        f"{k[7:]} {end - v:.0f}" for (v, k), end in zip(starts, ends, strict=True)))
    print("restores (last run): " + ", ".join(f"{a} {s} {ms} ms" for a, s, ms in last["agents"]))
    print(f"transformers imported: {last['transformers']}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
