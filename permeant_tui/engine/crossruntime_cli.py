"""`permeant usxf attach|capture --runtime llamacpp`: wired into the CLI by cli._plugin_commands."""

from __future__ import annotations

from pathlib import Path


def add_commands(usxf_sub) -> None:
    p = usxf_sub.add_parser("attach", help="attach a USXF file in another runtime and continue")
    p.add_argument("file")
    p.add_argument("--runtime", choices=["llamacpp"], required=True)
    p.add_argument("--gguf", metavar="PATH", help="the target GGUF (default: the embedded model)")
    p.add_argument("--continue", dest="n", type=int, default=16, metavar="N")
    p.add_argument("--workspace", metavar="DIR", help="whose trusted keys verify the file")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_attach)

    p = usxf_sub.add_parser("capture", help="prefill in another runtime, write its state as USXF")
    p.add_argument("--runtime", choices=["llamacpp"], required=True)
    p.add_argument("--gguf", metavar="PATH", help="default: the embedded model")
    p.add_argument("--prompt-file", required=True, metavar="F")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--agent", default="captured", help="agent id stored in the file")
    p.add_argument("--system", default="You are a technical expert specializing in API "
                   "debugging and system architecture.")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--workspace", metavar="DIR", help="whose key signs the file")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_capture)


def _gguf(arg) -> Path:
    from .models import default_model_path

    return Path(arg) if arg else default_model_path()


def _keys(workspace):
    from ..paths import resolve_workspace
    from .usxf.keys import WorkspaceKeys

    keys = WorkspaceKeys(resolve_workspace(workspace) / "keys")
    keys.ensure()
    return keys


def cmd_attach(args) -> int:
    from ..paths import cache_dir
    from .crossruntime import attach_usxf

    attach_usxf(args.file, _gguf(args.gguf), args.n, _keys(args.workspace),
                threads=args.threads, digest_cache=cache_dir() / "digests")
    return 0


def cmd_capture(args) -> int:
    from .crossruntime import capture_usxf

    prompt = Path(args.prompt_file).read_text()
    capture_usxf(_gguf(args.gguf), prompt, Path(args.output), _keys(args.workspace),
                 system=args.system, agent_id=args.agent, max_tokens=args.max_tokens,
                 threads=args.threads)
    return 0
