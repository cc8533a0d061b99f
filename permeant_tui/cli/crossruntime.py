"""`permeant usxf attach|capture --runtime llamacpp`: a USXF export continued in llama.cpp, or
llama.cpp's state captured as a USXF file. The engine's bridge returns reports; this prints them."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_workspace

DEFAULT_SYSTEM = ("You are a technical expert specializing in API debugging and system "
                  "architecture.")


def register(usxf_sub) -> None:
    """Add `attach` and `capture` to the `usxf` command's subparsers."""
    p = usxf_sub.add_parser("attach", help="attach a USXF file in another runtime and continue")
    p.add_argument("file")
    p.add_argument("--runtime", choices=["llamacpp"], required=True)
    p.add_argument("--gguf", metavar="PATH|NAME",
                   help="the target GGUF, or an embedded model's name (smollm2, gemma3-270m); "
                        "default: the default embedded model")
    p.add_argument("--continue", dest="n", type=int, default=16, metavar="N")
    add_workspace(p)  # whose trusted keys verify the file
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_attach)

    p = usxf_sub.add_parser("capture", help="prefill in another runtime, write its state as USXF")
    p.add_argument("--runtime", choices=["llamacpp"], required=True)
    p.add_argument("--gguf", metavar="PATH|NAME",
                   help="a GGUF, or an embedded model's name (smollm2, gemma3-270m); default: "
                        "the default embedded model")
    p.add_argument("--prompt-file", required=True, metavar="F")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--agent", default="captured", help="agent id stored in the file")
    p.add_argument("--system", default=DEFAULT_SYSTEM)
    p.add_argument("--max-tokens", type=int, default=32)
    add_workspace(p)  # whose key signs the file
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_capture)


def _gguf(arg: str | None) -> Path:
    """A GGUF path, or the file of the embedded model `arg` names (assembled on first use)."""
    from ..engine import embedded

    model = embedded.lookup(arg)
    if model is not None and (arg is None or not Path(arg).exists()):
        return embedded.model_path(model)
    return Path(arg or "")


def _keys(workspace: str | None):
    from ..engine.usxf.keys import WorkspaceKeys
    from ..paths import resolve_workspace

    keys = WorkspaceKeys(resolve_workspace(workspace) / "keys")
    keys.ensure()
    return keys


def attach_lines(r) -> list[str]:
    """An AttachReport as the lines `usxf attach` prints."""
    lines = [
        f"verified {r.path}: {r.tokens} tokens, quant {r.quant}, signed by {r.key_id} "
        f"({r.verify_ms:.0f} ms)",
        f"warm start: attach est {r.estimate_attach_ms:.0f} ms vs re-prefill est "
        f"{r.estimate_prefill_ms:.0f} ms ({r.tokens} tokens at {r.prefill_tok_s:.0f} tok/s) -> "
        f"{r.decision}; attached in {r.attach_ms:.0f} ms (blob {r.blob_bytes / 1e6:.1f} MB)",
        f"continued {len(r.continued)} tokens in llama.cpp: {list(r.continued)}",
        f"text: {r.text!r}",
    ]
    if r.probe is not None:
        lines.append(
            f"cross-runtime probe: {r.probe.matched}/{r.probe.n} of the exporter's probe tokens "
            f"reproduced in llama.cpp (llama.cpp's 8-bit activations can flip a close greedy "
            f"choice; bench/cross_runtime.py measures this against llama.cpp's own prefill)")
    return lines


def capture_lines(r) -> list[str]:
    """A CaptureReport as the lines `usxf capture` prints."""
    return [f"captured {r.tokens} tokens from llama.cpp in {r.capture_ms:.0f} ms -> {r.path} "
            f"({r.size / 1e6:.1f} MB)",
            f"reply: {r.reply!r}"]


def cmd_attach(args: argparse.Namespace) -> int:
    from ..engine.llamacpp.bridge import attach_usxf

    report = attach_usxf(args.file, _gguf(args.gguf), args.n, _keys(args.workspace),
                         threads=args.threads)
    print("\n".join(attach_lines(report)))
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from ..engine.llamacpp.bridge import capture_usxf

    prompt = Path(args.prompt_file).read_text()
    report = capture_usxf(_gguf(args.gguf), prompt, Path(args.output), _keys(args.workspace),
                          system=args.system, agent_id=args.agent, max_tokens=args.max_tokens,
                          threads=args.threads)
    print("\n".join(capture_lines(report)))
    return 0
