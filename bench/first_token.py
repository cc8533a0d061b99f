"""Time to the first token after a resume, in a new process: restore a ~2k-token agent from its
snapshot and answer a 17-token message, against rebuilding the same agent by prefill, with and
without the model warm-up at load (engine/speed.py `warm_up`), and as a person types it: the
agent restored and the message prefilled at a pause in typing (engine/drafts.py), then Enter
timed to the first token, with the pause after the whole message ("paused before Enter") or
before its last word ("Enter after a word": that word and the template's tail are prefilled
after Enter).

    .venv/bin/python bench/first_token.py [--tokens 2048] [--keep DIR]

Each start is a fresh process on the real Engine (eager restore off: the agent is restored by
the turn, as when a person writes to it first). Figures are the engine's own: the restore
(AgentRestored ms) and the turn's `ttft` (prefill of the new message to the first token). The
load average is printed beside each; the ratios are the figures to read on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MESSAGE = "Thanks. Which of these fixes would you ship first, and why? One paragraph."

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[3])
from permeant_tui.engine import runtime
runtime.prepare()
from permeant_tui.engine.events import AgentRestored
from permeant_tui.engine.worker import Engine
events = []
engine = Engine(sys.argv[1], eager_restore=False, rebuild=sys.argv[2] == "rebuild",
                on_event=events.append)
engine.start()
engine.wait_ready(3600)
info = engine.model_info()
draft_ms = drafted = 0
if sys.argv[2].startswith("typed"):  # a pause in typing: restore + prefill while typing
    typed = sys.argv[4] if sys.argv[2] == "typed" else sys.argv[4].rsplit(" ", 1)[0]
    t = time.perf_counter()
    drafted = engine.prepare("technical", typed).result(3600)
    draft_ms = (time.perf_counter() - t) * 1000
t = time.perf_counter()
_, fut = engine.submit_future("technical", sys.argv[4], max_tokens=2)
result = fut.result(3600)
wall = (time.perf_counter() - t) * 1000
restored = [e for e in events if isinstance(e, AgentRestored)]
print(json.dumps({"restore_ms": restored[0].ms, "source": restored[0].source,
                  "tokens": restored[0].tokens, "ttft_ms": result.timing_ms["ttft"],
                  "wall_ms": wall, "prefilled": result.prefilled, "drafted": drafted,
                  "draft_ms": draft_ms,
                  "model_load_ms": info.load_ms if info else None,
                  "load": os.getloadavg()[0]}), flush=True)
os._exit(0)  # measured; nothing to save
"""


def start(folder: Path, mode: str, warm: bool) -> dict:
    """One new process on a copy of the workspace (the turn it answers is recorded there)."""
    env = dict(os.environ, PERMEANT_WARMUP="1" if warm else "0")
    with tempfile.TemporaryDirectory(prefix="permeant-bench-ttft-run-") as tmp:
        copy = Path(tmp) / "ws"
        shutil.copytree(folder, copy)
        r = subprocess.run([sys.executable, "-c", CHILD, str(copy), mode, str(ROOT), MESSAGE],
                           capture_output=True, text=True, timeout=3600, env=env)
    if r.returncode:
        raise SystemExit(f"child ({mode}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def show(label: str, r: dict) -> None:
    typed = (f", while typing: {r['drafted']} tokens drafted in {r['draft_ms']:.0f} ms"
             if r["drafted"] else "")
    print(f"{label:<26} {r['source']:<9} {r['tokens']:>6} tokens: restore "
          f"{r['restore_ms']:>9.0f} ms, first token {r['ttft_ms']:>7.0f} ms "
          f"(message {r['prefilled']} tokens){typed}, model load {r['model_load_ms']:.0f} ms  "
          f"(load average {r['load']:.1f})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--keep", help="workspace folder to build once and reuse")
    ap.add_argument("--runs", type=int, default=3, help="resumes of each kind, interleaved")
    args = ap.parse_args()
    from cold_start import workspace_folder

    folder = workspace_folder(args.keep, args.tokens, "permeant-bench-ttft-")
    start(folder, "resume", True)  # page cache warm for every measured start
    kinds = (("resume, no warm-up", "resume", False), ("resume, warm-up at load", "resume", True),
             ("typed, paused before Enter", "typed", True),
             ("typed, Enter after a word", "typed-word", True))
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in kinds}
    for _ in range(args.runs):
        for label, mode, warm in kinds:
            r = start(folder, mode, warm)
            runs[label].append(r)
            show(label, r)
    rebuild = start(folder, "rebuild", True)
    show("rebuild by prefill", rebuild)
    rebuild_total = rebuild["restore_ms"] + rebuild["ttft_ms"]
    print(f"\nmedians of {args.runs}, {rebuild['tokens']}-token agent, new process each:")
    for label, rs in runs.items():
        restore = statistics.median(r["restore_ms"] for r in rs)
        ttft = statistics.median(r["ttft_ms"] for r in rs)
        print(f"{label:<26} restore {restore:.0f} ms + first token {ttft:.0f} ms = "
              f"{restore + ttft:.0f} ms; rebuild + first token {rebuild_total:.0f} ms: "
              f"x{rebuild_total / (restore + ttft):.0f}")
    for label in ("typed, paused before Enter", "typed, Enter after a word"):
        ttft = statistics.median(r["ttft_ms"] for r in runs[label])
        print(f"{label:<26} Enter to first token {ttft:.0f} ms (restore and draft done while "
              f"typing); rebuild + first token / Enter to first token: "
              f"x{rebuild_total / ttft:.0f}")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
