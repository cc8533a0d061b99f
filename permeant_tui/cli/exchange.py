"""`permeant export`, `import`, `usxf inspect|verify` and `keys`: agents in and out of USXF
files, and the workspace's signing keys. The engine returns reports; this module prints them."""

from __future__ import annotations

import argparse
import json
import sys

from ..engine.text import printable
from ..engine.usxf import PROBE_N, QUANTS
from .common import add_common, add_workspace, open_engine

EXIT_UNTRUSTED = 6
INSPECT_LIMIT = 4 << 20  # manifest bytes `usxf inspect` parses from an untrusted signer


def _probe_len(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1 << 16:
        raise argparse.ArgumentTypeError(f"{text!r}: a probe length from 1 to 65536 tokens")
    return n


def register(subparsers) -> argparse._SubParsersAction:
    """Add export, import, usxf and keys; returns the `usxf` subparsers, where other groups
    (cli/crossruntime.py) add their actions."""
    p = subparsers.add_parser("export", help="export an agent's live KV state as a USXF file")
    add_common(p)
    p.add_argument("agent")
    p.add_argument("-o", "--output", metavar="FILE")
    p.add_argument("--quant", choices=QUANTS, default="none")
    p.add_argument("--no-fidelity", action="store_true", help="skip the fidelity probe")
    p.add_argument("--probe", type=_probe_len, default=PROBE_N, metavar="N",
                   help=f"greedy tokens in the fidelity probe (default {PROBE_N})")
    p.set_defaults(func=export)

    p = subparsers.add_parser("import", help="verify a USXF file and attach it as an agent")
    add_common(p)
    p.add_argument("file")
    p.add_argument("--as", dest="name", metavar="NAME")
    p.add_argument("--check-fidelity", action="store_true")
    p.set_defaults(func=import_file)

    p = subparsers.add_parser("usxf", help="inspect or verify USXF files")
    usxf = p.add_subparsers(dest="usxf_cmd", metavar="ACTION", required=True)
    q = usxf.add_parser("inspect", help="the manifest in readable form")
    add_workspace(q)
    q.add_argument("file")
    q.add_argument("--json", action="store_true")
    q.add_argument("--full", action="store_true",
                   help=f"parse a manifest over {INSPECT_LIMIT >> 20} MiB even when its signer "
                        "is not trusted by this workspace")
    q.set_defaults(func=inspect)
    q = usxf.add_parser("verify", help="check every byte, the block hashes and the signature")
    add_common(q)
    q.add_argument("file")
    q.add_argument("--fidelity", action="store_true",
                   help="also attach it to the model and replay the fidelity probe")
    q.add_argument("--probe", type=_probe_len, default=None, metavar="N",
                   help="replay only the probe's first N tokens (default: all it recorded)")
    q.set_defaults(func=verify)

    p = subparsers.add_parser("keys", help="this workspace's signing key and trusted keys")
    ks = p.add_subparsers(dest="keys_cmd", metavar="ACTION", required=True)
    q = ks.add_parser("show", help="print this workspace's public key")
    add_workspace(q)
    q.set_defaults(func=keys_show)
    q = ks.add_parser("trust", help="trust a public key (as printed by `keys show`)")
    add_workspace(q)
    q.add_argument("pubkey")
    q.set_defaults(func=keys_trust)
    q = ks.add_parser("list", help="list trusted keys")
    add_workspace(q)
    q.set_defaults(func=keys_list)
    return usxf


# ---- export / import -----------------------------------------------------------------------

def export(args: argparse.Namespace) -> int:
    from ..engine.errors import PermeantError

    if args.output is not None and not args.output.strip():
        raise PermeantError("-o/--output needs a file name (leave it out for the exports "
                            "folder)")
    engine = open_engine(args)
    try:
        info = engine.export(args.agent, args.output, args.quant,
                             fidelity=0 if args.no_fidelity else args.probe).result()
    finally:
        engine.shutdown()
    print(f"exported {args.agent} -> {info.path}")
    print(f"  {info.size / 1e6:.1f} MB, {len(info.token_ids)} tokens, quant {args.quant}, "
          f"digest {info.digest}")
    return 0


def import_file(args: argparse.Namespace) -> int:
    from ..engine.names import check_agent_name

    if args.name is not None:
        check_agent_name(args.name)  # before the workspace is opened or the model loads
    engine = open_engine(args)
    try:
        report = engine.import_usxf(args.file, args.name).result()
        if args.check_fidelity:
            report["fidelity"] = engine.replay_fidelity(report["agent"]).result()
    finally:
        engine.shutdown()
    if report.get("replaced"):
        print(f"agent '{report['replaced']}' had no turns: the import takes its place")
    print(f"imported {printable(args.file)} as agent '{report['agent']}': {report['tokens']} "
          f"tokens, signed by {report['key_id']}")
    if "fidelity" in report:
        print(f"fidelity: {report['fidelity']}")
    return 0


# ---- usxf inspect / verify -----------------------------------------------------------------

def manifest_json(f) -> dict:
    """The manifest with bytes as hex: printable as JSON."""
    def clean(v):
        if isinstance(v, bytes):
            return v.hex()
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(dict(f.manifest))


def _bound_untrusted(args: argparse.Namespace) -> None:
    """Before anything is decoded: a manifest over INSPECT_LIMIT is parsed only when its
    signer is trusted by this workspace (checked again by the signature) or --full is given.
    Reads the keys only; writes nothing and takes no lock."""
    from ..engine.errors import UsxfInvalid
    from ..engine.usxf.header import parse_header
    from ..engine.usxf.keys import WorkspaceKeys, key_id_of
    from ..engine.usxf.spec import ED25519_PUBLIC_LEN, HEADER_SIZE
    from ..paths import resolve_workspace

    with open(args.file, "rb") as fh:
        header = parse_header(fh.read(HEADER_SIZE), args.file)
        if args.full or header.manifest_len <= INSPECT_LIMIT:
            return
        fh.seek(HEADER_SIZE + header.manifest_len)
        kid = key_id_of(fh.read(ED25519_PUBLIC_LEN))
    if WorkspaceKeys(resolve_workspace(args.workspace) / "keys").is_trusted(kid):
        return
    raise UsxfInvalid("bounds", f"manifest of {header.manifest_len / 2**20:.1f} MiB from key "
                      f"{kid}, which this workspace does not trust: not parsed (limit "
                      f"{INSPECT_LIMIT >> 20} MiB); add --full to parse it anyway",
                      printable(str(args.file)))


def inspect(args: argparse.Namespace) -> int:
    """Prints what an unknown signer wrote: every string goes through `printable`."""
    from ..engine.usxf import read_usxf

    _bound_untrusted(args)
    f = read_usxf(args.file, trusted=None)
    m = manifest_json(f)
    if args.json:  # json.dumps escapes control characters itself
        print(json.dumps({"file": str(args.file), "size": f.size, "payload_digest": f.digest,
                          "key_id": f.key_id, "manifest": m}, indent=2))
        return 0
    ident, agent, fid, p = f.identity, f.agent, f.fidelity, printable
    print(f"USXF {p(str(args.file))}  ({f.size / 1e6:.2f} MB)")
    print(f"  version      {p(str(m.get('format_version', m.get('version'))))}")
    print(f"  model        {p(ident.name)}  [{p(ident.architecture)}]  fingerprint "
          f"{p(ident.fingerprint)}")
    print(f"  attention    {ident.n_layers} layers, {ident.n_heads} heads, {ident.n_kv_heads} kv "
          f"heads, head dim {ident.head_dim}, RoPE base {ident.rope_theta:g} "
          f"{p(str(ident.rope_layout))}, sliding window {ident.sliding_window or 'none'}")
    print(f"  tokens       {f.n_tokens}")
    print(f"  quant        {p(str(f.quant))}")
    print(f"  agent        {p(agent.agent_id)} ({p(agent.role)}), {len(agent.turns)} turns")
    if fid:
        print(f"  fidelity     probe of {fid.n} tokens, room {fid.context_room}"
              f"{'; ' + p(fid.note) if fid.note else ''}")
    print(f"  signed by    {f.key_id}  (signature valid; trust is checked by `usxf verify`)")
    print(f"  digest       {f.digest}")
    return 0


def verify(args: argparse.Namespace) -> int:
    from ..engine.errors import UsxfInvalid
    from ..engine.usxf import UsxfUntrustedKey, verify_usxf

    try:
        f = verify_usxf(args.file, trusted=_workspace_keys(args.workspace))
    except UsxfUntrustedKey as exc:
        print(f"permeant: untrusted: {exc} (trust it with `permeant keys trust PUBKEY`)",
              file=sys.stderr)
        return EXIT_UNTRUSTED
    except UsxfInvalid as exc:
        print(f"permeant: invalid: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"ok: {args.file}: {f.n_tokens} tokens, {f.size / 1e6:.2f} MB, quant {f.quant}, "
          f"signed by trusted key {f.key_id}")
    if args.fidelity:
        from ..engine.exchange import file_fidelity

        print(f"fidelity: {file_fidelity(args.file, args.model, args.probe)}")
    return 0


# ---- keys ----------------------------------------------------------------------------------

def _workspace_keys(workspace: str | None):
    from ..engine.usxf.keys import WorkspaceKeys
    from ..paths import resolve_workspace

    keys = WorkspaceKeys(resolve_workspace(workspace) / "keys")
    keys.ensure()
    return keys


def keys_show(args: argparse.Namespace) -> int:
    print(_workspace_keys(args.workspace).public_key_text)
    return 0


def keys_trust(args: argparse.Namespace) -> int:
    print(f"trusted {_workspace_keys(args.workspace).trust(args.pubkey)}")
    return 0


def keys_list(args: argparse.Namespace) -> int:
    keys = _workspace_keys(args.workspace)
    for kid in keys.trusted():
        print(kid + ("  (this workspace)" if kid == keys.key_id else ""))
    return 0
