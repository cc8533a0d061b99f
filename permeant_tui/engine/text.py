"""Text from a file or the network made safe to show: `printable(s)` before it reaches a log, a
terminal or a widget.

Control characters (C0, DEL, C1: ESC, CR, LF, BEL, ...), Unicode line and paragraph separators,
bidirectional overrides and lone surrogates (which a terminal's encoder refuses) become visible escapes (`\\x1b`, `\\r`, `\\n`, `\\u202e`), so such
text can neither move the cursor, retitle the terminal, forge a log line nor reorder what is
shown. Everything else, backslashes included, is kept as it is.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# Format characters that change how text around them is laid out or ordered.
_LAYOUT = frozenset(
    [0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _unsafe(code: int) -> bool:
    return code < 0x20 or 0x7F <= code <= 0x9F or code in _LAYOUT or 0xD800 <= code <= 0xDFFF


def printable(s: str) -> str:
    """`s` with every control, separator and bidi character escaped."""
    if not isinstance(s, str):
        s = str(s)
    if not any(_unsafe(ord(ch)) for ch in s):
        return s
    return "".join(_escape(ch) if _unsafe(ord(ch)) else ch for ch in s)
