"""The one rule for agent names, wherever a name enters: `import --as`, a USXF file's own agent
id, settings, a migration. A name is a folder under `agents/`, so it must never be able to name
another place: 1-64 characters of A-Z a-z 0-9 _ . -, starting with a letter or a digit (no
`.`, `..`, `/`, absolute paths, control characters, or names too long for a filesystem)."""

from __future__ import annotations

import re

from .errors import PermeantError
from .text import printable

AGENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
AGENT_NAME_RULE = "1-64 of A-Z a-z 0-9 _ . - starting with a letter or a digit"


class AgentNameInvalid(PermeantError):
    """A name that is not a valid agent name (the message says the rule)."""

    exit_code = 2


def is_agent_name(name: object) -> bool:
    return isinstance(name, str) and AGENT_NAME_RE.fullmatch(name) is not None


def check_agent_name(name: object) -> str:
    """`name` if it is a valid agent name; else AgentNameInvalid with a one-line message."""
    if is_agent_name(name):
        return name  # type: ignore[return-value]
    shown = printable(name if isinstance(name, str) else repr(name))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise AgentNameInvalid(f"invalid agent name '{shown}': use {AGENT_NAME_RULE}")
