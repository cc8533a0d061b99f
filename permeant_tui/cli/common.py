"""What every command shares: the workspace and model arguments, opening an engine, and the
one-line error convention (PermeantError -> `permeant: error: ...` on stderr, its exit code)."""

from __future__ import annotations

import argparse


def add_workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", metavar="DIR",
                   help="workspace folder (default: PERMEANT_HOME or the user data dir)")


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH_OR_REPO",
                   help="a .gguf file, an MLX model directory or a Hugging Face repo id "
                        "(default: the embedded SmolLM2-135M-Instruct)")


def add_common(p: argparse.ArgumentParser, workspace: bool = True) -> None:
    if workspace:
        add_workspace(p)
    add_model(p)


def open_engine(args: argparse.Namespace, **kw):
    """Start an engine on args.workspace / args.model and wait for its model. The caller must
    call `shutdown()` (use try/finally)."""
    from ..engine.worker import Engine

    cmd = " ".join(x for x in (getattr(args, "cmd", None), getattr(args, "usxf_cmd", None)) if x)
    engine = Engine(getattr(args, "workspace", None), getattr(args, "model", None),
                    eager_restore=False, purpose=f"permeant {cmd}".strip(), **kw)
    engine.start()
    try:
        engine.wait_ready()
    except BaseException:
        engine.shutdown()
        raise
    return engine
