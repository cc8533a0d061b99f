#!/usr/bin/env python
"""Two sessions, two processes: session 1 builds the agents' memory, session 2 resumes it.

Session 1 (a child process) asks the team a question: the technical and business agents answer,
the coordinator synthesises both (Engine.ask_team); the process saves and exits. Session 2 (a new
child process) restores all three agents from their KV snapshots, measures in the same run what
re-reading (re-prefilling) the same conversations would have cost, and asks the technical agent
a follow-up that only makes sense with the memory of session 1.

    python demo/two_sessions.py                      # waits for Enter between the sessions
    python demo/two_sessions.py --non-interactive --max-tokens 64 --workspace /tmp/demo

The last line of session 2 is `SUMMARY {json}` (used by tests/test_demo.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

QUESTION = ("We have a critical API bug affecting payment processing. "
            "Analyze technical issues and business impact.")
FOLLOW_UP = "What are the detailed steps to fix that API bug from our previous discussion?"
AGENTS = ("technical", "business", "coordinator")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", metavar="DIR",
                    help="workspace folder (default: a new temporary folder)")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens per reply (default 96)")
    ap.add_argument("--model", metavar="M", default=None,
                    help="a .gguf file, an MLX model directory or a Hugging Face repo id "
                         "(default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--non-interactive", action="store_true",
                    help="do not wait for Enter between the sessions")
    ap.add_argument("--session", type=int, choices=(1, 2), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def say(text: str = "") -> None:
    print(text, flush=True)


def show_reply(title: str, text: str) -> None:
    say(f"--- {title} " + "-" * max(0, 60 - len(title)))
    for para in (text.strip() or "(empty reply)").splitlines():
        say(textwrap.fill(para, 92, initial_indent="  ", subsequent_indent="  ") if para else "")


def _engine(args, **kw):
    from permeant_tui.engine import runtime

    runtime.prepare()  # OpenBLAS before the first mlx import (Linux CPU)
    from permeant_tui.engine.worker import Engine

    engine = Engine(args.workspace, args.model, purpose="permeant demo", **kw)
    t = time.perf_counter()
    engine.start()
    engine.wait_ready(600)
    engine.call(lambda ctx: None).result()  # eager restores (if any) run before this job
    return engine, (time.perf_counter() - t) * 1000


def session_1(args) -> int:
    from permeant_tui.engine.workspace import Workspace

    engine, ready_ms = _engine(args, eager_restore=False)
    try:
        info = engine.model_info()
        say(f"model      {info.name}, {info.weights_mode} weights; loaded in "
            f"{info.load_ms or ready_ms:.0f} ms")
        earlier = {a.agent_id: len(a.turns) for a in engine.agents() if a.turns}
        if earlier:
            say(f"note       this workspace has earlier turns ({earlier}); session 1 adds to them")
        say(f"question   {QUESTION}\n")
        t = time.perf_counter()
        team = engine.ask_team(QUESTION, max_tokens=args.max_tokens).result()
        for agent_id in AGENTS:
            r = team[agent_id]
            show_reply(f"{agent_id} ({r.prefilled} tokens read, {r.generated} generated, "
                       f"{r.timing_ms['prefill'] + r.timing_ms['decode']:.0f} ms)", r.reply)
        say(f"\nteam answered in {time.perf_counter() - t:.1f} s")
        saved = engine.save().result()
        say(f"saved      {', '.join(saved) or 'nothing new (every agent saved after its turn)'}")
    finally:
        engine.shutdown()
    say("snapshots on disk:")
    ws = Workspace.open(engine.folder)  # as the next process will find it
    for agent_id in AGENTS:
        snap = ws.snapshot_path(agent_id)
        agent = ws.agent(agent_id)
        say(f"  {agent_id:<12} {agent.tokens_on_disk:>6} tokens  "
            f"{agent.bytes_on_disk / 1e6:>7.1f} MB  {snap}")
    say("session 1 ends: the process exits, nothing stays in memory.")
    return 0


def session_2(args) -> int:
    from permeant_tui.engine.agent import Agent
    from permeant_tui.engine.events import AgentRestored, Notice
    from permeant_tui.engine.generation import prefill

    events: list = []
    engine, ready_ms = _engine(args, eager_restore=True, on_event=events.append)
    try:
        info = engine.model_info()
        restored = {e.agent_id: e for e in events if isinstance(e, AgentRestored)}
        for n in events:
            if isinstance(n, Notice):
                say(f"{n.level:<10} {n.message}")
        say(f"model      {info.name}: loaded in {info.load_ms:.0f} ms; "
            f"model + all agents ready {ready_ms:.0f} ms after engine start")

        def reprefill(ctx) -> dict:
            """What the restore saved: prefill each agent's conversation into a scratch cache."""
            out = {}
            for a in ctx.workspace.agents.values():
                ids = a.expected_ids(ctx.model.tokenizer)
                scratch = Agent(a.agent_id, a.role, a.title, a.system)
                t = time.perf_counter()
                prefill(ctx.model.model, scratch, ids)
                out[a.agent_id] = {"tokens": len(ids), "ms": (time.perf_counter() - t) * 1000}
            return out

        say("measuring what re-reading the same conversations would cost (prefill, same run)...")
        cost = engine.call(reprefill).result()
        say(f"\n{'agent':<13}{'restored from':<15}{'restore ms':>11}{'tokens reused':>15}"
            f"{'re-prefill ms':>15}{'speed-up':>10}")
        summary = {}
        for agent_id in AGENTS:
            ev = restored.get(agent_id)
            c = cost[agent_id]
            source, ms, tokens = (ev.source, ev.ms, ev.tokens) if ev else ("(not restored)", 0, 0)
            reused = tokens if source in ("snapshot", "usxf") else 0
            ratio = f"{c['ms'] / ms:.0f}x" if ms > 0 and reused else "-"
            say(f"{agent_id:<13}{source:<15}{ms:>11.1f}{reused:>15}{c['ms']:>15.1f}{ratio:>10}")
            if ev and ev.reason:
                say(f"  ({agent_id}: snapshot not used: {ev.reason})")
            summary[agent_id] = {"source": source, "restore_ms": round(ms, 2), "tokens": tokens,
                                 "tokens_reused": reused, "reprefill_ms": round(c["ms"], 2),
                                 "reprefill_tokens": c["tokens"]}
        total_restore = sum(s["restore_ms"] for s in summary.values())
        total_prefill = sum(s["reprefill_ms"] for s in summary.values())
        say(f"{'all three':<13}{'':<15}{total_restore:>11.1f}"
            f"{sum(s['tokens_reused'] for s in summary.values()):>15}{total_prefill:>15.1f}"
            f"{(total_prefill / total_restore if total_restore else 0):>9.0f}x")

        say(f"\nfollow-up to technical: {FOLLOW_UP}")
        r = engine.submit_future("technical", FOLLOW_UP, max_tokens=args.max_tokens)[1].result()
        show_reply(f"technical ({r.cached} tokens reused from session 1, {r.prefilled} new "
                   f"tokens read, first token after {r.timing_ms['ttft']:.0f} ms)", r.reply)
    finally:
        engine.shutdown()
    say("session 2 ends: the follow-up turn was saved too.")
    say("SUMMARY " + json.dumps({
        "session": 2, "workspace": str(engine.folder), "agents": summary,
        "follow_up": {"agent": "technical", "source": r.source, "cached": r.cached,
                      "prefilled": r.prefilled, "generated": r.generated,
                      "ttft_ms": round(r.timing_ms["ttft"], 2)}}))
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    if args.session == 1:
        return session_1(args)
    if args.session == 2:
        return session_2(args)
    ws = Path(args.workspace or tempfile.mkdtemp(prefix="permeant-demo-")).resolve()
    child = [sys.executable, str(Path(__file__).resolve()), "--workspace", str(ws),
             "--max-tokens", str(args.max_tokens)] + (["--model", args.model] if args.model else [])
    say(f"workspace  {ws}")
    say("=" * 78 + "\nSESSION 1 (new process): three agents build their memory\n" + "=" * 78)
    rc = subprocess.call(child + ["--session", "1"])
    if rc:
        return rc
    if not args.non_interactive:
        input("\nSession 1's process has exited. Press Enter to start session 2 "
              "(a new process)... ")
    say("\n" + "=" * 78 + "\nSESSION 2 (new process): resume all three agents from their "
        "snapshots\n" + "=" * 78)
    rc = subprocess.call(child + ["--session", "2"])
    if rc == 0:
        say(f"\nOpen the same workspace in the TUI: permeant --workspace {ws}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
