"""How fast the CLI refuses what cannot work (issue 15: it used to load the model first, 4-11 s).

Each case runs in a fresh process (`python -m permeant_tui.cli ...`), wall time, median of
`--runs`; the baseline, in the same run, is a command that must load the model (one token of
`chat`). Prints the load average beside each figure and the ratio to the baseline.

    python bench/cli_refusals.py [--runs 3]
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


def wall(args: list[str], env: dict) -> tuple[float, int]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "permeant_tui.cli", *args], env=env,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t, r.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="permeant-bench-cli-"))
    env = dict(os.environ, PERMEANT_HOME=str(tmp / "ws"), PERMEANT_CACHE=str(tmp / "cache"),
               HF_HUB_OFFLINE="1")
    d = tmp / "ws" / "agents" / "technical"
    d.mkdir(parents=True)
    (d / "transcript.jsonl").write_text(json.dumps(
        {"user": "hi", "reply": "hello", "generated_ids": [1, 2], "ts": 1.0}) + "\n")
    (tmp / "not.usxf").write_bytes(b"not a USXF file" * 100)
    cases = {
        "baseline: chat coordinator hi --max-tokens 1 (loads the model)":
            (["chat", "coordinator", "hi", "--max-tokens", "1", "--temp", "0"], 0),
        "chat nobody hi": (["chat", "nobody", "hi"], 2),
        "export business (no conversation)": (["export", "business"], 1),
        "export technical -o /nonexistent/x.usxf": (["export", "technical", "-o",
                                                      "/nonexistent/x.usxf"], 8),
        "import not.usxf": (["import", str(tmp / "not.usxf")], 5),
        "agents add sec ... (roster, no model)": (["agents", "add", "sec", "--role", "r",
                                                    "--system", "s"], 0),
    }
    base = None
    print(f"{'case':<58}{'median s':>9}{'x baseline':>12}  load avg")
    for name, (args, code) in cases.items():
        times = []
        for _ in range(a.runs):
            s, rc = wall(args, env)
            assert rc == code, (name, rc)
            times.append(s)
            if args[:2] == ["agents", "add"]:
                wall(["agents", "remove", "sec", "--yes"], env)
        med = statistics.median(times)
        base = base or med
        print(f"{name:<58}{med:>9.2f}{med / base:>12.3f}  {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
