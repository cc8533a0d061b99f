"""USXF, the Unified State Exchange Format: an agent's KV cache as one signed, verifiable file.

The format is defined in docs/USXF.md. Writing: `write_usxf`. Reading: `read_usxf` (everything
verified, payload kept for `load_kv()`), `verify_usxf` (bounded memory), `StreamVerifier`
(bytes as they arrive). Keys: `keys.WorkspaceKeys`. No MLX here: tensors are numpy arrays.
"""

from typing import TYPE_CHECKING

from ..errors import UsxfInvalid
from .spec import (
    BLOCK_SIZE,
    CHUNK_SIZE,
    MAX_MANIFEST,
    PROBE_N,
    QUANTS,
    VERSION_MAJOR,
    VERSION_MINOR,
    AgentRecord,
    Fidelity,
    KVPayload,
    UsxfUntrustedKey,
    UsxfWriteError,
)

# The rest on first use (PEP 562): they import numpy and cryptography, which the UI's first
# paint does not need (the CLI and the migrate screen import QUANTS at start).
_LAZY = {
    "WorkspaceKeys": "keys",
    "block_hashes": "layout", "convert_rope_layout": "layout", "rope_permutation": "layout",
    "StreamVerifier": "reader", "UsxfFile": "reader", "read_usxf": "reader",
    "verify_usxf": "reader",
    "write_usxf": "writer",
}

if TYPE_CHECKING:
    from .keys import WorkspaceKeys
    from .layout import block_hashes, convert_rope_layout, rope_permutation
    from .reader import StreamVerifier, UsxfFile, read_usxf, verify_usxf
    from .writer import write_usxf


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "BLOCK_SIZE",
    "CHUNK_SIZE",
    "MAX_MANIFEST",
    "PROBE_N",
    "QUANTS",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "AgentRecord",
    "Fidelity",
    "KVPayload",
    "StreamVerifier",
    "UsxfFile",
    "UsxfInvalid",
    "UsxfUntrustedKey",
    "UsxfWriteError",
    "WorkspaceKeys",
    "block_hashes",
    "convert_rope_layout",
    "read_usxf",
    "rope_permutation",
    "verify_usxf",
    "write_usxf",
]
