"""`permeant export`, `import`, `usxf inspect|verify` and `keys`: agents in and out of USXF
files, and the workspace's signing keys. The engine returns reports; this module prints them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..engine.errors import PermeantError
from ..engine.text import printable
from .common import (
    PROBE_N,
    QUANTS,
    UsageError,
    add_common,
    add_workspace,
    check_agent_listed,
    open_session,
)

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

class Untrusted(PermeantError):
    """A file signed by a key this workspace does not trust (exit 6, as `usxf verify`)."""

    exit_code = EXIT_UNTRUSTED


class TargetUnwritable(PermeantError):
    """An export target that cannot be written (exit 8, as other disk errors)."""

    exit_code = 8


def check_export_target(output: str | None, exports_dir: Path) -> None:
    """Refuse, before anything loads, a target that cannot become a file: a folder, a device,
    a missing or read-only folder. The writer still reports what only writing can find (a full
    disk)."""
    if output is not None and not output.strip():
        raise UsageError("-o/--output needs a file name (leave it out for the exports folder)")
    target = Path(output).expanduser() if output is not None else None
    if target is not None and (target.exists() or target.is_symlink()):
        if target.is_dir():
            raise UsageError(f"-o {printable(output or '')}: is a folder; name a file in it")
        if not target.is_file():
            raise TargetUnwritable(f"-o {printable(output or '')}: not a regular file (a device "
                                   f"or a pipe); name a file")
    folder = target.parent if target is not None else exports_dir
    probe = folder
    while not probe.exists() and target is None:  # the exports folder is created on demand
        probe = probe.parent
    if not probe.is_dir():
        raise TargetUnwritable(f"cannot write {printable(str(target or folder))}: the folder "
                               f"{printable(str(probe))} does not exist")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TargetUnwritable(f"cannot write {printable(str(target or folder))}: the folder "
                               f"{printable(str(probe))} is not writable (read-only or no "
                               f"permission)")


def export(args: argparse.Namespace) -> int:
    def check(engine) -> None:
        agent = engine.agent(args.agent)  # UnknownAgent: exit 2
        if not agent.turns:
            raise PermeantError(f"agent {args.agent!r} has no conversation to export yet")
        check_export_target(args.output, engine.folder / "exports")

    check_agent_listed(args, args.agent)
    if args.output is not None:
        check_export_target(args.output, Path("."))  # the obvious ones before the workspace
    session = open_session(args, check=check)
    try:
        session.reporter.stage(f"exporting {args.agent}", 0.0)
        info = session.wait(session.engine.export(args.agent, args.output, args.quant,
                                                  fidelity=0 if args.no_fidelity else args.probe))
    finally:
        session.close()
    print(f"exported {args.agent} -> {info.path}")
    print(f"  {info.size / 1e6:.1f} MB, {len(info.token_ids)} tokens, quant {args.quant}, "
          f"digest {info.digest}")
    return 0


def precheck_usxf(path: str, keys) -> tuple[str, bytes]:
    """The file's header, size, manifest checksum, signature and signer trust, and its manifest
    checks, reading only the head of the file (no payload, no model): (agent id, key id).
    UsxfInvalid (exit 5) or Untrusted (exit 6). The payload's digests are checked by the import
    itself."""
    from ..engine.errors import UsxfInvalid
    from ..engine.usxf import UsxfUntrustedKey
    from ..engine.usxf.header import check_signature, check_size, parse_header
    from ..engine.usxf.keys import trusted_raw_keys
    from ..engine.usxf.manifest import decode_manifest, parse_manifest
    from ..engine.usxf.spec import HEADER_SIZE

    spath = str(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            header = parse_header(fh.read(HEADER_SIZE), spath)
            check_size(header, size, spath)
            prefix = fh.read(header.prefix_len)
        if len(prefix) != header.prefix_len:
            raise UsxfInvalid("truncated", "the file ended early", spath)
        manifest = prefix[:header.manifest_len]
        kid, _, _ = check_signature(header, manifest, prefix[header.manifest_len:],
                                    trusted_raw_keys(keys), spath)
        parsed = parse_manifest(decode_manifest(manifest, spath), header, kid, spath)
    except UsxfUntrustedKey as exc:
        raise Untrusted(f"{printable(spath)}: {exc.detail} (`permeant keys trust "
                        f"{exc.public_key_text}` first)") from None
    except UsxfInvalid:
        raise
    except IsADirectoryError:
        raise UsxfInvalid("io", "is a folder, not a USXF file", spath) from None
    except OSError as exc:
        raise UsxfInvalid("io", f"cannot read: {exc.strerror or exc}", spath) from None
    except Exception as exc:  # the readers' contract: UsxfInvalid for any bytes
        raise UsxfInvalid("malformed", f"unexpected {type(exc).__name__}: {exc}"[:300],
                          spath) from None
    return parsed.agent.agent_id, kid


def import_file(args: argparse.Namespace) -> int:
    from ..engine.errors import WorkspaceError
    from ..engine.names import check_agent_name
    from ..engine.usxf.keys import WorkspaceKeys

    if args.name is not None:
        check_agent_name(args.name)  # before the workspace is opened or the model loads

    def check(engine) -> None:
        keys = WorkspaceKeys(engine.folder / "keys")
        keys.ensure()
        agent_id, _ = precheck_usxf(args.file, keys)
        name = check_agent_name(args.name if args.name is not None else agent_id)
        for a in engine.agents():
            if a.agent_id.casefold() == name.casefold() and a.turns:
                n = len(a.turns)
                raise WorkspaceError(f"agent '{a.agent_id}' exists and has {n} turn"
                                     f"{'s' if n > 1 else ''}; import with --as NEW_NAME (or "
                                     f"reset '{a.agent_id}' first)")

    session = open_session(args, check=check)
    try:
        engine = session.engine
        session.reporter.stage(f"importing {printable(args.file)} (verifying every byte)")
        report = session.wait(engine.import_usxf(args.file, args.name))
        if args.check_fidelity:
            session.reporter.stage(f"replaying the fidelity probe on {report['agent']}")
            report["fidelity"] = session.wait(engine.replay_fidelity(report["agent"]))
    finally:
        session.close()
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


def own_workspaces_signed_by(key_id: str, exclude: Path) -> list[Path]:
    """Your workspaces (those this user opened: `permeant workspaces`) whose own signing key
    is `key_id`. A folder merely found next to the file is never trusted this way: anyone can
    put a key pair beside a file."""
    from ..engine.usxf.keys import WorkspaceKeys
    from .workspaces import known_workspaces

    def signed(folder: Path) -> bool:
        keys = WorkspaceKeys(folder / "keys")
        if not keys.private_path.is_file():
            return False
        try:
            return keys.key_id == key_id
        except PermeantError:
            return False

    yours = [Path(r["path"]) for r in known_workspaces() if r["exists"]]
    return [w for w in yours if w != exclude and signed(w)]


def _near_file(path: str) -> list[Path]:
    """A workspace the file sits in (`<workspace>/exports/NAME.usxf`, or anywhere under it)."""
    out = []
    for parent in Path(path).resolve().parents:
        if (parent / "workspace.json").is_file() and (parent / "keys").is_dir():
            out.append(parent)
            break
    return out


def verify(args: argparse.Namespace) -> int:
    """Every byte, the block hashes, the signature and its trust in this workspace. Without
    --workspace, a file signed by another workspace of yours is trusted as yours (and says
    which); a file that only sits in a workspace folder names the flag to add."""
    from ..engine.errors import UsxfInvalid
    from ..engine.usxf import UsxfUntrustedKey, verify_usxf
    from ..engine.usxf.keys import WorkspaceKeys
    from ..paths import resolve_workspace
    from .common import reporter_for

    reporter = reporter_for(args)
    here = resolve_workspace(args.workspace)
    own_of = ""
    with reporter:
        reporter.stage(f"verifying {printable(args.file)}")
        try:
            try:
                f = verify_usxf(args.file, trusted=_workspace_keys(args.workspace))
            except UsxfUntrustedKey as exc:
                if args.workspace is not None:
                    raise
                yours = own_workspaces_signed_by(exc.key_id, here)
                if not yours:
                    raise
                f = verify_usxf(args.file, trusted=WorkspaceKeys(yours[0] / "keys"))
                own_of = f" (the own key of your workspace {yours[0]})"
        except UsxfUntrustedKey as exc:
            reporter.stop()
            hint = "trust it with `permeant keys trust PUBKEY`"
            if args.workspace is None:
                near = [w for w in _near_file(args.file) if w != here]
                if near:
                    hint = (f"it sits in the workspace {near[0]}: if that is yours, add "
                            f"--workspace {near[0]}; else {hint}")
            print(f"permeant: untrusted: {printable(str(exc))} ({printable(hint)})",
                  file=sys.stderr)
            return EXIT_UNTRUSTED
        except UsxfInvalid as exc:
            reporter.stop()
            print(f"permeant: invalid: {printable(str(exc))}", file=sys.stderr)
            return exc.exit_code
        reporter.say(f"verified {f.size / 1e6:.2f} MB")
        fidelity = None
        if args.fidelity:
            from ..engine.exchange import file_fidelity

            reporter.stage("fidelity: loading the model and replaying the probe")
            fidelity = file_fidelity(args.file, args.model, args.probe)
    print(f"ok: {args.file}: {f.n_tokens} tokens, {f.size / 1e6:.2f} MB, quant {f.quant}, "
          f"signed by trusted key {f.key_id}{printable(own_of)}")
    if fidelity is not None:
        print(f"fidelity: {fidelity}")
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
