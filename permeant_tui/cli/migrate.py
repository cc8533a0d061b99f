"""`permeant serve` (run a migration target) and `permeant migrate` (move an agent to one):
their parsers and handlers. Nothing heavy is imported at module level (the parser is built on
every command)."""

from __future__ import annotations

import argparse
import sys
import time

from ..engine.text import printable
from .common import QUANTS, add_common, check_agent_listed, engine_for


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run a migration target: a TLS daemon other "
                                            "workspaces migrate agents to")
    add_common(p)
    p.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:8765",
                   help="address to listen on (default 127.0.0.1:8765; 0.0.0.0:PORT for all "
                        "interfaces; port 0 picks a free one)")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (default: a self-signed "
                                                      "one made in the workspace)")
    p.add_argument("--tls-key", metavar="FILE", help="its PEM private key")
    p.add_argument("--fingerprint", action="store_true",
                   help="print the certificate's SHA-256 fingerprint and exit")
    p.add_argument("--staging-ttl", type=float, default=600.0, metavar="SECONDS",
                   help="remove a staged migration idle this long (default 600)")
    p.add_argument("--max-migrations", type=int, default=4, metavar="N",
                   help="staged migrations at once (default 4)")
    p.add_argument("--max-chunk-mb", type=int, default=16, metavar="MB",
                   help="largest accepted chunk (default 16)")
    p.add_argument("--max-manifest-mb", type=int, default=32, metavar="MB",
                   help="largest accepted USXF head: header + manifest + signature (default 32)")
    p.add_argument("--disk-reserve-mb", type=int, default=256, metavar="MB",
                   help="free disk to keep after staging and importing (default 256)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("migrate", help="move an agent's live KV state to a `permeant "
                                              "serve` target")
    add_common(p)
    p.add_argument("agent")
    p.add_argument("--to", required=True, metavar="HOST:PORT", dest="to")
    p.add_argument("--pin", metavar="FINGERPRINT",
                   help="the target's certificate SHA-256 (as `permeant serve` prints it); "
                        "remembered per target after the first use")
    p.add_argument("--quant", choices=QUANTS, default="none",
                   help="transfer type of the KV values (default none: bit-exact)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep", dest="move", action="store_false",
                   help="keep the agent here too (default)")
    g.add_argument("--move", dest="move", action="store_true",
                   help="after the target commits, archive the agent here (transcript kept)")
    p.set_defaults(move=False)
    g2 = p.add_mutually_exclusive_group()
    g2.add_argument("--force", action="store_true",
                    help="move the KV state even when re-prefill on the target looks faster")
    g2.add_argument("--reprefill", action="store_true",
                    help="send the signed transcript only; the target rebuilds the KV by prefill")
    p.add_argument("--as", dest="name", metavar="NAME",
                   help="agent name on the target (default: the same, or NAME-2, ... if taken)")
    p.add_argument("--chunk-kib", type=int, default=None, metavar="KIB",
                   help="upload chunk size in KiB, a power of two (default 4096)")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.set_defaults(func=cmd_migrate)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..migrate.protocol import Limits
    from ..migrate.serve import ServeOptions, serve

    limits = Limits(ttl_s=float(args.staging_ttl), max_migrations=int(args.max_migrations),
                    max_chunk_bytes=int(args.max_chunk_mb) << 20,
                    max_head_bytes=int(args.max_manifest_mb) << 20,
                    disk_reserve_bytes=int(args.disk_reserve_mb) << 20)
    return serve(ServeOptions(args.workspace, args.model, args.listen, args.tls_cert,
                              args.tls_key, args.fingerprint, limits))


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class MigrationPrinter:
    """Prints each stage with its time; transfer progress every ~10% (every chunk on a TTY)."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.next_pct = 10

    def line(self, stage: str, ms: float | None, text: str) -> None:
        t = f"{ms:8.0f} ms" if ms is not None else " " * 11
        if self.tty:
            self.out.write("\r\033[K")
        self.out.write(f"{stage:<13}{t}  {printable(text)}\n")
        self.out.flush()

    def __call__(self, stage: str, info: dict) -> None:
        if stage == "capabilities":
            c = info["caps"]
            m, rt = c.get("model", {}), c.get("runtime", {})
            mem = (c.get("memory") or {}).get("available", 0)
            pf = c.get("prefill_tok_s")
            self.line(stage, info["ms"],
                      f"{m.get('name')} ({'same model' if info['same_model'] else 'OTHER model'}, "
                      f"fingerprint {str(m.get('fingerprint'))[:16]}), runtime {rt.get('name')} "
                      f"{rt.get('version')} on {rt.get('device')}, kv {c.get('dtypes', {}).get('kv')}, "
                      f"weights {rt.get('weights')}, context {c.get('context_limit')}, free memory "
                      f"{mem / 1e9:.1f} GB, prefill {pf if pf is None else f'{pf:.0f}'} tok/s")
        elif stage == "decision":
            d = info["decision"]
            link = f"{d.link_mb_s:.0f} MB/s {'measured' if d.link_measured else 'estimated'}"
            pre = (f"{d.reprefill_s:.1f} s ({info['tokens']} tokens at {d.prefill_tok_s:.0f} tok/s)"
                   if d.reprefill_s is not None else "unknown")
            self.line(stage, None,
                      f"{'MIGRATE' if d.mode == 'kv' else 'RE-PREFILL'}: move {_mb(d.size_bytes)} "
                      f"~ {d.migrate_s:.1f} s (transfer {d.transfer_s:.1f} s at {link} + verify "
                      f"{d.verify_s:.1f} s) vs re-prefill on the target ~ {pre}; {d.reason}")
        elif stage == "export":
            self.line(stage, info["ms"], f"{_mb(info['size'])}, {info['chunks']} chunks of "
                                         f"{info['chunk_size'] >> 10} KiB, quant {info['quant']}, "
                                         f"digest {info['digest'][:16]}")
        elif stage == "open":
            self.line(stage, info["ms"], f"migration {info['id']}, staged as {info['name']!r}"
                                         f"{' (resumed)' if info.get('resumed') else ''}")
        elif stage == "transfer":
            pct = 100 * info["done"] / max(info["n_chunks"], 1)
            text = (f"{_mb(info['sent'])} / {_mb(info['total'])} sent, {info['mb_s']:.1f} MB/s, "
                    f"chunk {info['done']}/{info['n_chunks']}")
            if self.tty:
                self.out.write(f"\r\033[Ktransfer       {printable(text)}")
                self.out.flush()
            elif pct >= self.next_pct or info["done"] == info["n_chunks"]:
                self.next_pct = int(pct // 10) * 10 + 10
                self.line(stage, None, text)
        elif stage == "resume":
            self.line(stage, None, f"connection lost ({info['error']}); target has "
                                   f"{info['present']}/{info['n_chunks']} chunks, resuming from "
                                   f"chunk {info['from_chunk']}")
        elif stage == "retry":
            self.line(stage, None, f"{info['what']}: attempt {info['attempt']}"
                                   + (f" ({info['error']})" if info.get("error") else ""))
        elif stage == "verify":
            self.line(stage, info["ms"], f"target verified the signature, every chunk and the "
                                         f"payload digest ({info['target_ms']:.0f} ms there)")
        elif stage == "commit":
            r = info["result"]
            how = ("state moved" if r.get("mode") == "kv" else
                   f"rebuilt by prefill in {r.get('prefill_ms', 0):.0f} ms")
            if r.get("mode") == "kv" and r.get("restored_from") not in (None, "usxf"):
                how = f"WARNING: the target rebuilt it ({r.get('restored_from')})"
            self.line(stage, info["ms"], f"attached on the target as {info['agent']!r} ({how}, "
                                         f"{r.get('tokens')} tokens, resident after "
                                         f"{r.get('attach_ms', 0):.0f} ms there)")
        elif stage == "fidelity":
            self.line(stage, info.get("ms"), f"probe on the target: {info['result']}")
        elif stage == "move":
            m = info["marker"]
            self.line(stage, info["ms"], f"source agent archived "
                                         f"({m.get('archived_transcript')}), moved.json written")
        elif stage == "abort":
            self.line(stage, None, f"staged data on the target removed ({info['id']})")
        elif stage == "done":
            r = info["report"]
            extra = (f", transfer {r.transfer_mb_s:.1f} MB/s" if r.mode == "kv" else "")
            self.line(stage, info["ms"], f"{r.agent} -> {r.target} as {r.target_agent!r} "
                                         f"({'moved' if r.moved else 'kept here too'}){extra}")


def cmd_migrate(args: argparse.Namespace) -> int:
    import json

    from ..engine.names import check_agent_name
    from ..migrate import MigrationError, migrate_agent
    from ..migrate.testing import model_override_for_tests

    chunk = None
    if args.chunk_kib is not None:
        chunk = args.chunk_kib * 1024
        if chunk <= 0 or chunk & (chunk - 1) or not 4 <= args.chunk_kib <= 256 * 1024:
            raise MigrationError("--chunk-kib must be a power of two from 4 to 262144")
    if args.name is not None:
        check_agent_name(args.name)  # before the model loads
    from ..migrate.protocol import normalize_fingerprint, parse_hostport

    check_agent_listed(args, args.agent)
    parse_hostport(args.to)
    if args.pin is not None:
        normalize_fingerprint(args.pin)
    t = time.perf_counter()
    engine = engine_for(args, loaded=model_override_for_tests())
    try:
        engine.agent(args.agent)  # an unknown agent: exit 2 before the model loads
        engine.start()
        engine.wait_ready()
        printer = MigrationPrinter()
        if not args.json:
            info = engine.model_info()
            printer.line("load", (time.perf_counter() - t) * 1000,
                         f"{info.identity.name}, workspace {engine.folder}")
        rep = migrate_agent(engine, args.agent, args.to, args.pin, args.quant, args.move,
                            None if args.json else printer, force=args.force,
                            reprefill=args.reprefill, name=args.name, chunk_size=chunk)
    finally:
        engine.shutdown()
    if args.json:
        print(json.dumps(rep.to_json(), indent=2, default=str))
    return 0
