"""`permeant serve` and `permeant migrate`.

PLACEHOLDER until helper "migrate" moves migrate/commands.py here: it registers the same
commands by delegating to that module's `add_commands`.
"""

from __future__ import annotations


def register(subparsers) -> None:
    from ..migrate import commands

    commands.add_commands(subparsers)
    for name in ("serve", "migrate"):
        parser = subparsers.choices[name]
        parser.set_defaults(func=parser.get_default("handler"))
