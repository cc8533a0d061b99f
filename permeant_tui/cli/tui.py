"""`permeant` with no subcommand: the workspace UI on an engine for --workspace / --model."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from ..app import run_tui
    from ..engine.worker import Engine
    from .workspaces import remember

    engine = Engine(args.workspace, args.model, purpose="permeant (the workspace UI)")
    remember(engine.folder)  # listed by `permeant workspaces`
    return run_tui(engine, str(engine.folder))
