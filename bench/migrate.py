"""Live migration on loopback against re-prefill on the target, in the same run.

For 512, 2048 and 4096 tokens of context (the embedded SmolLM2-135M, float32 KV, 46 KB per
token) and each transfer quantization, migrate an agent to a `permeant serve` process on
127.0.0.1 (TLS, signed requests, every chunk verified, fidelity probe replayed) and time every
stage; then send the same agent with --reprefill (signed transcript only; the target rebuilds
the KV by prefill) and compare.

    .venv/bin/python bench/migrate.py [--tokens 512,2048,4096] [--quants none,f16,bf16,int8]

Both paths pay the same fixed costs (the source's export with its 16-token fidelity probe, the
target's probe replay); "target" columns compare only what differs on the target: attaching
the moved state (copy + verify + attach) against prefilling the tokens.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from permeant_tui.engine import runtime  # noqa: E402

runtime.prepare()

FILLER = (
    "Incident log. The payments API returned intermittent 504 errors between 02:10 and 02:45 "
    "UTC; retries doubled the load on the ledger service, whose connection pool (max 50) was "
    "exhausted while a schema migration held a lock on the transactions table. "
)


def start_server(ws: Path, env: dict) -> tuple[subprocess.Popen, str, str, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "permeant_tui.cli", "serve", "--workspace", str(ws), "--listen",
         "127.0.0.1:0", "--staging-ttl", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(x.rstrip()) for x in proc.stdout],
                     daemon=True).start()
    deadline = time.monotonic() + 300
    while not any(x.endswith("] ready") for x in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("server did not start:\n" + "\n".join(lines))
        time.sleep(0.1)
    out = "\n".join(lines)
    port = re.search(r"listening on https://127\.0\.0\.1:(\d+)", out).group(1)
    pin = re.search(r"--pin ([0-9a-f]{64})", out).group(1)
    return proc, f"127.0.0.1:{port}", pin, lines


def grow_agent(engine, name: str, n_tokens: int) -> int:
    """Bring agent `name` to about n_tokens of cached context by appending one long user turn
    (and a short reply); only the new tokens are prefilled on the source (not timed). The
    first call creates the agent."""
    from permeant_tui.engine.agent import Agent, Turn
    from permeant_tui.engine.generation import sync_to_transcript
    from permeant_tui.engine.settings import AgentSpec

    system = "You are a technical expert specializing in API debugging and system architecture."
    reply = "Understood."

    def build(ctx):
        tok, ws = ctx.model.tokenizer, ctx.workspace
        gen = tuple(tok.encode(reply)) + (tok.eos_token_id,)
        if name not in ws.agents:
            ws.add_agent(AgentSpec(name, "technical", name, system), [])
        ctx.restore(name)
        agent = ws.agent(name)
        probe = Agent(name, "technical", name, system, [*agent.turns, Turn("", reply, gen)])
        base = len(probe.expected_ids(tok))
        filler = tok.encode(FILLER * (n_tokens // 40 + 2))[: max(1, n_tokens - base)]
        turn = Turn(tok.decode(filler), reply, gen, time.time())
        agent.turns.append(turn)
        ws.append_turn(agent, turn)
        sync_to_transcript(ctx.model.model, tok, agent)  # prefills only the new turn
        agent.dirty = True
        ws.save_agent(agent, ctx.model)
        return len(agent.cache_ids)

    return engine.call(build).result()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,2048,4096")
    ap.add_argument("--quants", default="none,f16,bf16,int8")
    args = ap.parse_args()
    sizes = [int(x) for x in args.tokens.split(",")]
    quants = args.quants.split(",")

    import mlx.core as mx

    from permeant_tui.engine.models import load_model
    from permeant_tui.engine.settings import load_settings, save_settings
    from permeant_tui.engine.usxf.keys import WorkspaceKeys
    from permeant_tui.engine.worker import Engine
    from permeant_tui.migrate import migrate_agent

    tmp = Path(tempfile.mkdtemp(prefix="permeant-bench-migrate-"))
    env = {**os.environ, "PERMEANT_HOME": str(tmp / "home"), "PERMEANT_CACHE": str(tmp / "cache")}
    os.environ.update({k: env[k] for k in ("PERMEANT_HOME", "PERMEANT_CACHE")})
    src_ws, dst_ws = tmp / "src", tmp / "dst"
    src_keys = WorkspaceKeys(src_ws / "keys").ensure()
    dst_keys = WorkspaceKeys(dst_ws / "keys").ensure()
    dst_keys.trust(src_keys.public_key_text)
    s = load_settings(dst_ws)  # keep every migrated agent resident: no eviction inside a commit
    s.max_resident, s.memory_budget_mb = 64, 16000
    save_settings(dst_ws, s)

    print(f"machine: {os.cpu_count()} cores, {runtime.device_label()}, {runtime.blas_label()}; "
          f"mlx {mx.__version__}")
    t = time.perf_counter()
    proc, target, pin, lines = start_server(dst_ws, env)
    print(f"target: {target} started in {time.perf_counter() - t:.1f} s; "
          + next(x.strip() for x in lines if x.strip().startswith("model ")))
    lm = load_model(None)
    engine = Engine(src_ws, loaded=lm, eager_restore=False)
    engine.start()
    engine.wait_ready()
    rows = []
    try:
        for n in sorted(sizes):
            t = time.perf_counter()
            real_n = grow_agent(engine, "bench", n)
            name = f"ctx{n}"
            print(f"\nsource agent: {real_n} tokens (grown by prefill in "
                  f"{time.perf_counter() - t:.1f} s, not counted)", flush=True)
            for q in quants:
                rep = migrate_agent(engine, "bench", target, pin, q, False, None, force=True,
                                    name=f"{name}-{q}")
                r, ms = rep.target_result, rep.stages_ms
                rows.append({
                    "tokens": real_n, "path": f"migrate {q}", "mb": rep.size_bytes / 1e6,
                    "export": ms["export"] / 1e3, "transfer": ms["transfer"] / 1e3,
                    "mb_s": rep.transfer_mb_s, "verify": ms["verify"] / 1e3,
                    "attach": r["attach_ms"] / 1e3, "commit": ms["commit"] / 1e3,
                    "total": ms["total"] / 1e3, "fidelity": rep.fidelity,
                    "model": rep.decision.migrate_s})
                rows[-1]["moved"] = rows[-1]["transfer"] + rows[-1]["verify"] + rows[-1]["attach"]
                print(_row(rows[-1]), flush=True)
            rep = migrate_agent(engine, "bench", target, pin, "none", False, None,
                                reprefill=True, name=f"{name}-prefill")
            r, ms = rep.target_result, rep.stages_ms
            pre = {"tokens": real_n, "path": "re-prefill", "mb": rep.size_bytes / 1e6,
                   "export": ms["export"] / 1e3, "transfer": 0.0, "mb_s": 0.0,
                   "verify": ms["verify"] / 1e3, "attach": r["prefill_ms"] / 1e3,
                   "commit": ms["commit"] / 1e3, "total": ms["total"] / 1e3,
                   "fidelity": rep.fidelity, "model": rep.decision.reprefill_s or 0.0}
            pre["moved"] = pre["attach"]
            rows.append(pre)
            print(_row(pre), flush=True)
            for row in rows:
                if row["tokens"] == real_n and row["path"] != "re-prefill":
                    row["ratio"] = pre["moved"] / row["moved"]
                    row["ratio_total"] = pre["total"] / row["total"]
    finally:
        engine.shutdown()
        proc.terminate()
        proc.wait(60)

    print("\nmigration vs re-prefill on the target (same run, loopback TLS; seconds)")
    head = (f"{'tokens':>6}  {'path':<14}{'MB':>7}{'xfer':>7}{'MB/s':>6}{'verify':>7}"
            f"{'attach':>7}{'state':>7}{'model':>7}{'export':>7}{'commit':>7}{'total':>7}"
            f"  {'re-prefill / migrate':>21}  fidelity")
    print(head)
    print("-" * len(head))
    for row in rows:
        ratio = (f"{row['ratio']:5.1f}x ({row['ratio_total']:.2f}x total)"
                 if "ratio" in row else "")
        print(_row(row) + f"  {ratio:>21}  {row['fidelity']}")
    print("""
xfer: upload of every chunk (each verified on arrival); verify: the target's whole-file check
(prepare); attach: import (copy + verify + register) and restore until resident, or for
re-prefill the prefill itself; state = xfer + verify + attach (re-prefill: the prefill), the
time to get the agent's KV state live on the target, which is what the cost model estimates
("model", made before the run from the target's capabilities and the last measured MB/s);
export (with the source's 16-token fidelity probe), commit (with the target's probe replay)
and total (the whole migrate_agent call) include the same fixed costs on both paths.""")
    return 0


def _row(r: dict) -> str:
    return (f"{r['tokens']:>6}  {r['path']:<14}{r['mb']:>7.1f}{r['transfer']:>7.2f}"
            f"{r['mb_s']:>6.0f}{r['verify']:>7.2f}{r['attach']:>7.2f}{r['moved']:>7.2f}"
            f"{r['model']:>7.2f}{r['export']:>7.2f}{r['commit']:>7.2f}{r['total']:>7.2f}")


if __name__ == "__main__":
    sys.exit(main())
