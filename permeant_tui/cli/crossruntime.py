"""`permeant usxf attach|capture --runtime llamacpp`.

PLACEHOLDER until helper "llamacpp" moves engine/crossruntime_cli.py here: it registers the
same actions by delegating to that module's `add_commands`.
"""

from __future__ import annotations


def register(usxf_subparsers) -> None:
    from ..engine import crossruntime_cli

    crossruntime_cli.add_commands(usxf_subparsers)
    for name in ("attach", "capture"):
        parser = usxf_subparsers.choices[name]
        parser.set_defaults(func=parser.get_default("handler"))
