"""`permeant tokenize`, `permeant chat` and `permeant status`: one turn, token ids, the
workspace at a glance, for scripts and tests."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import add_common, open_engine


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenize", help="print token ids (special tokens parsed, no BOS)")
    add_common(p, workspace=False)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("text")
    p.set_defaults(func=tokenize)

    p = subparsers.add_parser("chat", help="run one turn of an agent and print the reply")
    add_common(p)
    p.add_argument("agent")
    p.add_argument("message")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--rebuild", action="store_true",
                   help="ignore the KV snapshot and rebuild the agent by prefill")
    p.set_defaults(func=chat)

    p = subparsers.add_parser("status", help="the workspace's model and agents")
    add_common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=status)


def tokenize(args: argparse.Namespace) -> int:
    from ..engine.models import load_model

    lm = load_model(args.model)
    ids = lm.tokenizer.encode(args.text, add_special_tokens=False)
    print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
    return 0


def chat(args: argparse.Namespace) -> int:
    """One turn. Exit 0 once the turn is recorded, even when its KV snapshot could not be
    written (a full or read-only disk): the reply is printed and stderr says, in one line, that
    the snapshot will be rebuilt from the transcript."""
    from ..engine.generation import TurnParams
    from ..engine.text import printable

    engine = open_engine(args, rebuild=args.rebuild)
    notices: list[str] = []
    engine.connect(lambda ev: _collect_notice(ev, notices))
    try:
        agent = engine.agent(args.agent)
        params = TurnParams(max_tokens=args.max_tokens or engine.settings().max_tokens,
                            temp=args.temp, seed=args.seed)
        _, fut = engine.submit_future(agent.agent_id, args.message, params=params)
        result = fut.result()
    finally:
        engine.shutdown(cancel_running=True)
    for n in dict.fromkeys(notices):  # once each (a failed snapshot write is retried at exit)
        print(f"permeant: {printable(n)}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print(result.reply)
    return 0


def _collect_notice(ev, out: list[str]) -> None:
    """What a person running a headless command should see on stderr."""
    from ..engine.events import AgentRestored, Notice

    if isinstance(ev, Notice):
        out.append(ev.message)
    elif isinstance(ev, AgentRestored) and ev.reason:
        out.append(f"{ev.agent_id}: snapshot not used ({ev.reason}); rebuilt {ev.tokens} tokens "
                   f"by prefill in {ev.ms:.0f} ms")


def status(args: argparse.Namespace) -> int:
    from ..engine.workspace import Workspace
    from ..paths import resolve_workspace

    ws = Workspace.open(resolve_workspace(args.workspace))
    agents = []
    for a in ws.agents.values():
        snap = ws.snapshot_path(a.agent_id)
        agents.append({
            "id": a.agent_id, "role": a.role, "turns": len(a.turns), "tokens": a.tokens_on_disk,
            "bytes": a.bytes_on_disk if snap.exists() else 0,  # manifest and its KV blocks
            "resident": False,  # a status process holds no caches; the TUI shows live residency
            "snapshot": str(snap) if snap.exists() else None,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(a.last_used))
            if snap.exists() or a.turns else None,
        })
    out = {"workspace": str(ws.folder), "model": ws.settings.model or "default (SmolLM2-135M-"
           "Instruct Q4_1, embedded)", "max_resident": ws.settings.max_resident,
           "memory_budget_mb": ws.settings.memory_budget_mb, "agents": agents}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"workspace {out['workspace']}\nmodel     {out['model']}")
    print(f"{'agent':<14}{'role':<13}{'turns':>6}{'tokens':>8}{'MB':>8}  last used")
    for a in agents:
        print(f"{a['id']:<14}{a['role']:<13}{a['turns']:>6}{a['tokens']:>8}"
              f"{a['bytes'] / 1e6:>8.1f}  {a['last_used'] or '-'}")
    return 0
