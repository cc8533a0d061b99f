"""`permeant`: the TUI (no subcommand) and headless subcommands for scripts, tests and people.

Errors the engine raises on purpose (PermeantError) are printed as one line on stderr with a
non-zero exit code; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T_START = time.perf_counter()


def _add_common(p: argparse.ArgumentParser, workspace: bool = True) -> None:
    if workspace:
        p.add_argument("--workspace", metavar="DIR",
                       help="workspace folder (default: PERMEANT_HOME or the user data dir)")
    p.add_argument("--model", metavar="PATH_OR_REPO",
                   help="a .gguf file, an MLX model directory or a Hugging Face repo id "
                        "(default: the embedded SmolLM2-135M-Instruct)")


def build_parser() -> argparse.ArgumentParser:
    from .engine.exchange import PROBE_N
    from .engine.usxf.spec import QUANTS

    ap = argparse.ArgumentParser(prog="permeant", description=__doc__.splitlines()[0])
    _add_common(ap)
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("tokenize", help="print token ids (special tokens parsed, no BOS)")
    _add_common(p, workspace=False)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("text")

    p = sub.add_parser("chat", help="run one turn of an agent and print the reply")
    _add_common(p)
    p.add_argument("agent")
    p.add_argument("message")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--rebuild", action="store_true",
                   help="ignore the KV snapshot and rebuild the agent by prefill")

    p = sub.add_parser("status", help="the workspace's model and agents")
    _add_common(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("doctor", help="MLX version/device, BLAS, model dtype, a quick speed figure")
    _add_common(p, workspace=False)

    p = sub.add_parser("export", help="export an agent's live KV state as a USXF file")
    _add_common(p)
    p.add_argument("agent")
    p.add_argument("-o", "--output", metavar="FILE")
    p.add_argument("--quant", choices=list(QUANTS), default="none")
    p.add_argument("--no-fidelity", action="store_true", help="skip the fidelity probe")
    p.add_argument("--probe", type=int, default=PROBE_N, metavar="N",
                   help=f"greedy tokens in the fidelity probe (default {PROBE_N})")

    p = sub.add_parser("import", help="verify a USXF file and attach it as an agent")
    _add_common(p)
    p.add_argument("file")
    p.add_argument("--as", dest="name", metavar="NAME")
    p.add_argument("--check-fidelity", action="store_true")

    p = sub.add_parser("usxf", help="inspect or verify USXF files")
    us = p.add_subparsers(dest="usxf_cmd", metavar="ACTION", required=True)
    q = us.add_parser("inspect", help="the manifest in readable form")
    q.add_argument("file")
    q.add_argument("--json", action="store_true")
    q = us.add_parser("verify", help="check every byte, the block hashes and the signature")
    _add_common(q)
    q.add_argument("file")
    q.add_argument("--fidelity", action="store_true",
                   help="also attach it to the model and replay the fidelity probe")
    q.add_argument("--probe", type=int, default=None, metavar="N",
                   help="replay only the probe's first N tokens (default: all it recorded)")

    p = sub.add_parser("keys", help="this workspace's signing key and trusted keys")
    ks = p.add_subparsers(dest="keys_cmd", metavar="ACTION", required=True)
    q = ks.add_parser("show", help="print this workspace's public key")
    q.add_argument("--workspace", metavar="DIR")
    q = ks.add_parser("trust", help="trust a public key (as printed by `keys show`)")
    q.add_argument("--workspace", metavar="DIR")
    q.add_argument("pubkey")
    q = ks.add_parser("list", help="list trusted keys")
    q.add_argument("--workspace", metavar="DIR")
    _plugin_commands(sub, us)
    return ap


def _plugin_commands(sub, usxf_sub) -> None:
    """Subcommands that live beside their subsystem: each module's add_commands(sub) sets
    `handler` on its parsers."""
    import importlib

    for module, target in (("permeant_tui.migrate.commands", sub),
                           ("permeant_tui.engine.crossruntime_cli", usxf_sub)):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue  # subsystem not present in this build
            raise
        mod.add_commands(target)


def main(argv: list[str] | None = None) -> int:
    from .engine import runtime

    runtime.prepare()  # before anything imports mlx
    args = build_parser().parse_args(argv)
    from .engine.errors import PermeantError

    try:
        handler = getattr(args, "handler", None) or globals()[f"cmd_{args.cmd or 'tui'}"]
        return int(handler(args) or 0)
    except PermeantError as exc:
        print(f"permeant: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("permeant: interrupted", file=sys.stderr)
        return 130


def cmd_tui(args) -> int:
    from .app import run_tui
    from .engine.worker import Engine

    engine = Engine(args.workspace, args.model)
    return run_tui(engine, str(engine.folder))


def cmd_tokenize(args) -> int:
    from .engine.models import load_model

    lm = load_model(args.model)
    ids = lm.tokenizer.encode(args.text, add_special_tokens=False)
    print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
    return 0


def _engine(args, **kw):
    from .engine.worker import Engine

    engine = Engine(args.workspace, args.model, eager_restore=False, **kw)
    engine.start()
    engine.wait_ready()
    return engine


def cmd_chat(args) -> int:
    from .engine.generation import TurnParams

    engine = _engine(args, rebuild=args.rebuild)
    notices: list[str] = []
    engine.connect(lambda ev: _collect_notice(ev, notices))
    try:
        agent = engine.ws.agent(args.agent)
        params = TurnParams(max_tokens=args.max_tokens or engine.ws.settings.max_tokens,
                            temp=args.temp, seed=args.seed)
        _, fut = engine.submit_future(agent.agent_id, args.message, params=params)
        result = fut.result()
    finally:
        engine.shutdown(cancel_running=True)
    for n in notices:
        print(f"permeant: {n}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print(result.reply)
    return 0


def _collect_notice(ev, out: list[str]) -> None:
    """What a person running a headless command should see on stderr."""
    from .engine.events import AgentRestored, Notice

    if isinstance(ev, Notice):
        out.append(ev.message)
    elif isinstance(ev, AgentRestored) and ev.reason:
        out.append(f"{ev.agent_id}: snapshot not used ({ev.reason}); rebuilt {ev.tokens} tokens "
                   f"by prefill in {ev.ms:.0f} ms")


def cmd_status(args) -> int:
    from .engine.workspace import Workspace
    from .paths import resolve_workspace

    ws = Workspace.open(resolve_workspace(args.workspace))
    agents = []
    for a in ws.agents.values():
        snap = ws.snapshot_path(a.agent_id)
        agents.append({
            "id": a.agent_id, "role": a.role, "turns": len(a.turns), "tokens": a.tokens_on_disk,
            "bytes": snap.stat().st_size if snap.exists() else 0,
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


def cmd_doctor(args) -> int:
    import platform

    import mlx.core as mx

    from .engine import runtime
    from .engine.models import load_model

    print(f"python     {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"mlx        {mx.__version__}  device {runtime.device_label()}")
    print(f"blas       {runtime.blas_label()}")
    lm = load_model(args.model)
    print(f"model      {lm.identity.name}  ({lm.spec})")
    print(f"weights    {lm.weights_mode} in memory (chosen for {runtime.device_label()}); "
          f"kv dtype {lm.identity.kv_dtype}")
    print(f"identity   {lm.identity.fingerprint}")
    print("load ms    " + ", ".join(f"{k} {v:.0f}" for k, v in lm.timings_ms.items()))
    from .engine.speed import quick_speed

    pf, dec = quick_speed(lm)
    print(f"speed      prefill {pf:.0f} tok/s (256 tokens), decode {dec:.1f} tok/s (32 tokens)")
    return 0


def cmd_export(args) -> int:
    engine = _engine(args)
    try:
        info = engine.export(args.agent, args.output, args.quant,
                             fidelity=0 if args.no_fidelity else args.probe).result()
    finally:
        engine.shutdown()
    print(f"exported {args.agent} -> {info.path}")
    print(f"  {info.size / 1e6:.1f} MB, {len(info.token_ids)} tokens, quant {args.quant}, "
          f"digest {info.digest}")
    return 0


def cmd_import(args) -> int:
    engine = _engine(args)
    try:
        report = engine.import_usxf(args.file, args.name).result()
        if args.check_fidelity:
            from .engine.exchange import replay_fidelity

            report["fidelity"] = engine.call(
                lambda e: replay_fidelity(e, report["agent"])).result()
    finally:
        engine.shutdown()
    print(f"imported {args.file} as agent {report['agent']!r}: {report['tokens']} tokens, "
          f"signed by {report['key_id']}")
    if "fidelity" in report:
        print(f"fidelity: {report['fidelity']}")
    return 0


def cmd_usxf(args) -> int:
    from .engine import exchange

    return getattr(exchange, f"cli_{args.usxf_cmd}")(args)


def cmd_keys(args) -> int:
    from .engine.usxf.keys import WorkspaceKeys
    from .paths import resolve_workspace

    keys = WorkspaceKeys(resolve_workspace(args.workspace) / "keys")
    keys.ensure()
    if args.keys_cmd == "show":
        print(keys.public_key_text)
    elif args.keys_cmd == "trust":
        print(f"trusted {keys.trust(args.pubkey)}")
    else:
        for kid in keys.trusted():
            print(kid + ("  (this workspace)" if kid == keys.key_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
