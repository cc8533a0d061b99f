"""`permeant`: the TUI (no subcommand) and headless subcommands for scripts, tests and people.

One module per command group, each with `register(subparsers)` that adds its parsers and sets
`func` (a handler taking the parsed args and returning the exit code); `build_parser` wires
them all here, by name. Errors the engine raises on purpose (PermeantError) are printed as one
line on stderr with a non-zero exit code; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys

from . import chat, crossruntime, doctor, exchange, migrate, tui
from .common import add_common


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="permeant", description=__doc__.splitlines()[0])
    add_common(ap)
    ap.set_defaults(func=tui.run)  # no subcommand: the workspace UI
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    chat.register(sub)  # tokenize, chat, status
    doctor.register(sub)  # doctor
    usxf = exchange.register(sub)  # export, import, usxf inspect|verify, keys
    crossruntime.register(usxf)  # usxf attach|capture
    migrate.register(sub)  # serve, migrate
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..engine import runtime

    runtime.prepare()  # before anything imports mlx
    args = build_parser().parse_args(argv)
    from ..engine.errors import PermeantError

    try:
        return int(args.func(args) or 0)
    except PermeantError as exc:
        print(f"permeant: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("permeant: interrupted", file=sys.stderr)
        return 130
