"""Model load time, first start against next start, for each embedded model.

First start: an empty model cache (PERMEANT_MODEL_CACHE pointed at a new folder), so the
Gemma chunks are joined, the GGUF is dequantized with gguf-py (or read with mx.load) and the
float32 weights (and SentencePiece merges) are written to the cache. Next start: the same
folder again, so the weights come back with mx.load from the cached safetensors. Each start
is a fresh process (imports included), as a user's would be; the figures are `load_model`'s
own stage timings. The 1-minute load average is printed beside each run: on a shared machine
the ratio between the two starts is the figure to read, not the seconds.

    .venv/bin/python bench/model_load.py [--models smollm2,gemma3-270m] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHILD = """
import json, sys, time
t0 = time.perf_counter()
from permeant_tui.engine import runtime
runtime.prepare()
from permeant_tui.engine.models import load_model
lm = load_model(sys.argv[1])
out = dict(lm.timings_ms)
out["process_s"] = time.perf_counter() - t0
print(json.dumps(out))
"""
STAGES = ("model_file", "digest", "header", "weights", "weights_cache_write", "tokenizer",
          "identity", "total")


def start(model: str, cache: Path, digests: Path) -> dict:
    env = dict(os.environ, PERMEANT_MODEL_CACHE=str(cache), PERMEANT_CACHE=str(digests),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    load = os.getloadavg()[0]
    r = subprocess.run([sys.executable, "-c", CHILD, model], env=env, capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{model}: load failed:\n{r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["loadavg"] = load
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--keep", metavar="DIR", help="use (and keep) this cache folder")
    args = ap.parse_args()
    from permeant_tui.engine.embedded import EMBEDDED

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    for key in args.models.split(","):
        model = EMBEDDED[key]
        if importlib.util.find_spec(model.packages[0]) is None:
            print(f"\n{key}: not installed ({model.pip}); skipped")
            continue
        base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="permeant-load-"))
        cache = base / key
        if cache.exists():
            shutil.rmtree(cache)
        try:
            first = start(key, cache, base / f"digests-{key}")
            nxt = start(key, cache, base / f"digests-{key}")
        finally:
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)
        print(f"\n{model.display_name}")
        print(f"  {'stage (ms)':<22}{'first start':>14}{'next start':>14}")
        for stage in STAGES:
            a, b = first.get(stage), nxt.get(stage)
            if a is None and b is None:
                continue
            fmt = lambda v: f"{v:14.0f}" if v is not None else f"{'-':>14}"  # noqa: E731
            print(f"  {stage:<22}{fmt(a)}{fmt(b)}")
        print(f"  {'process (s)':<22}{first['process_s']:14.2f}{nxt['process_s']:14.2f}")
        print(f"  {'load average (1 min)':<22}{first['loadavg']:14.2f}{nxt['loadavg']:14.2f}")
        print(f"  next start / first start (load_model total): "
              f"{nxt['total'] / first['total']:.2f}")


if __name__ == "__main__":
    main()
