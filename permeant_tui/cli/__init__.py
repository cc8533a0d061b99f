"""`permeant`: the TUI (no subcommand) and headless subcommands for scripts, tests and people.

One module per command group, each with `register(subparsers)` that adds its parsers and sets
`func` (a handler taking the parsed args and returning the exit code); `build_parser` wires
them all here, by name. Errors the engine raises on purpose (PermeantError) are printed as one
line on stderr with a non-zero exit code; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys

from . import agents, chat, crossruntime, doctor, exchange, migrate, tui, workspaces
from .common import add_common

EPILOG = """\
one writer per workspace: the UI, chat, export, import, serve, migrate and the demo hold the
workspace's lock while they run; a second one is refused at once (exit 9) naming the holder.
`status` and `usxf inspect` take no lock and work meanwhile.

chat streams its reply (--json: one object at the end); ctrl+c cancels the turn, saves, exits 130.
Arguments, agents, export targets and USXF signatures are checked before the model loads.
On a terminal, long commands show a progress line on stderr; piped, nothing extra (-v: stages).

exit codes: 0 done (also when a turn is recorded but its KV snapshot could not be written:
stderr says so in one line, and the snapshot is rebuilt from the transcript later); 1 error
(settings, workspace); 2 usage, unknown agent or invalid agent name; 3 model not loaded;
4 context exhausted; 5 invalid USXF file or token ids; 6 untrusted signer; 7 migration failed;
8 disk error (full, read-only); 9 workspace busy; 130 interrupted; 141 stdout closed."""


class Parser(argparse.ArgumentParser):
    """Usage errors in the one-line convention too (exit 2), pointing at --help."""

    def error(self, message: str):  # type: ignore[override]
        from ..engine.text import printable

        self.exit(2, f"permeant: error: {self.prog}: {printable(message)} "
                     f"(see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="permeant", description=__doc__.splitlines()[0], epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(ap, top=True)
    ap.set_defaults(func=tui.run)  # no subcommand: the workspace UI
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    chat.register(sub)  # tokenize, chat, status
    doctor.register(sub)  # doctor
    usxf = exchange.register(sub)  # export, import, usxf inspect|verify, keys
    crossruntime.register(usxf)  # usxf attach|capture
    migrate.register(sub)  # serve, migrate
    agents.register(sub)  # agents [add|rename|remove]
    workspaces.register(sub)  # workspaces
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..engine import runtime

    runtime.prepare()  # before anything imports mlx (and it makes the exit wait for MLX)
    args = build_parser().parse_args(argv)
    from ..engine.errors import PermeantError
    from ..engine.text import printable

    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except PermeantError as exc:
        print(f"permeant: error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `permeant ... | head -1`: the reader left; not an error
        _quiet_stdout()
        return EXIT_PIPE
    except OSError as exc:  # a full or read-only disk, a missing folder: one line, no traceback
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"permeant: error: {printable(exc.strerror or str(exc))}{printable(str(where))}",
              file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        print("permeant: interrupted", file=sys.stderr)
        return 130


EXIT_IO = 8  # an OSError the engine did not expect (disk full, read-only, missing folder)
EXIT_PIPE = 141  # stdout's reader went away (as a process killed by SIGPIPE: 128 + 13)


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush does
    not print a second BrokenPipeError."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
