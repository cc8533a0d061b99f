"""USXF on the real model: probe fidelity per quantization, and export/import of real KV.

    .venv/bin/python bench/usxf_fidelity.py [--tokens 512,2048]

For each context length an agent of the embedded SmolLM2-135M is built (a long technical
conversation prefilled to ~N tokens), exported with each quantization, imported into a second
workspace, and the exporter's fidelity probe (16 greedy tokens after a fixed prompt) replayed
on the import. Baseline in the same run: the same probe on the source agent (what a perfect
migration reproduces), and the source's own re-prefill time of the same tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from permeant_tui.engine import runtime  # noqa: E402

runtime.prepare()

PARAGRAPH = ("Our payment API started returning intermittent 502 errors after the last deploy. "
             "The retry logic doubles traffic under load, the connection pool to the ledger "
             "database is exhausted, and webhooks to merchants are delayed by minutes. ")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="512,2048,4096")
    args = ap.parse_args()

    from permeant_tui.engine.agent import Agent, Turn
    from permeant_tui.engine.exchange import compare_probe, export_agent
    from permeant_tui.engine.generation import prefill
    from permeant_tui.engine.kvcache import eval_cache
    from permeant_tui.engine.models import load_model
    from permeant_tui.engine.snapshot import attach_payload
    from permeant_tui.engine.usxf import read_usxf
    from permeant_tui.engine.usxf.keys import WorkspaceKeys
    from permeant_tui.engine.workspace import Workspace

    lm = load_model(None)
    tok = lm.tokenizer
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ws = Workspace.open(Path(d) / "src")
        for n in [int(x) for x in args.tokens.split(",")]:
            agent = Agent(f"t{n}", "technical", "Technical",
                          "You are a technical expert specializing in API debugging.")
            per = len(tok.encode(PARAGRAPH))
            reps = max(1, round((n - 70) / per))
            user = PARAGRAPH * reps
            reply_ids = tok.encode("Understood. Let us look at the retry logic first.") + [2]
            agent.turns = [Turn(user, tok.decode(reply_ids[:-1]), tuple(reply_ids))]
            ids = agent.expected_ids(tok)
            t = time.perf_counter()
            prefill(lm.model, agent, ids)
            prefill_ms = (time.perf_counter() - t) * 1000
            for quant in ("none", "f16", "bf16", "int8"):
                out = Path(d) / f"{n}-{quant}.usxf"
                t = time.perf_counter()
                info = export_agent(lm, ws, agent, str(out), quant)
                export_ms = (time.perf_counter() - t) * 1000
                t = time.perf_counter()
                f = read_usxf(out, trusted=WorkspaceKeys(ws.keys_dir), expected_identity=lm.identity)
                kv = f.load_kv()
                target = Agent("x", "technical", "Technical", "")
                target.cache = attach_payload(lm.model, kv.keys, kv.values, kv.dtype,
                                              lm.identity.kv_dtype, len(f.token_ids))
                target.cache_ids = list(f.token_ids)
                eval_cache(target.cache)
                import_ms = (time.perf_counter() - t) * 1000
                result = compare_probe(lm, target, f.fidelity)
                rows.append((len(ids), quant, info.size / 1e6, export_ms, import_ms, prefill_ms,
                             result))
                print(f"{rows[-1][0]:>6} {quant:<5} {rows[-1][2]:7.1f} MB  export {export_ms:7.0f}"
                      f" ms (incl. probe)  import {import_ms:6.0f} ms  re-prefill {prefill_ms:7.0f}"
                      f" ms  x{prefill_ms / import_ms:5.1f}  probe: {result}", flush=True)
    print()
    print("| tokens | quant | file MB | export ms (incl. 16-token probe) | import ms (verify + "
          "attach) | re-prefill ms | re-prefill / import | probe on the import |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for n, q, mb, e, i, p, r in rows:
        print(f"| {n} | {q} | {mb:.1f} | {e:.0f} | {i:.0f} | {p:.0f} | {p / i:.1f} | {r} |")


if __name__ == "__main__":
    main()
