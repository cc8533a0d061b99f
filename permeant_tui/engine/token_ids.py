"""Token ids from outside (a USXF file, a transcript on disk, a migration request) are checked
before they reach MLX: its embedding lookup reads out of bounds on an id past the vocabulary
(a segfault, or silently wrong logits), and a float or a negative id is never a token."""

from __future__ import annotations

import numbers
from collections.abc import Iterable

from .errors import InvalidTokenIds


def checked_ids(values: Iterable[object], vocab_size: int, source: str) -> list[int]:
    """`values` as a list of ints in [0, vocab_size), or InvalidTokenIds naming `source`, the
    first bad position and value. numpy integers pass; bool is refused (True is an int in
    Python, not a token)."""
    out: list[int] = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise InvalidTokenIds(f"{source}: token id at position {i} is not an integer "
                                  f"({type(v).__name__} {_short(v)})")
        v = int(v)
        if not 0 <= v < vocab_size:
            raise InvalidTokenIds(f"{source}: token id {_short(v)} at position {i} is outside "
                                  f"the model's vocabulary (0..{vocab_size - 1})")
        out.append(v)
    return out


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."
