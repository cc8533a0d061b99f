"""USXF, the Unified State Exchange Format: an agent's KV cache as one signed, verifiable file.

The format is defined in docs/USXF.md. Writing: `write_usxf`. Reading: `read_usxf` (everything
verified, payload kept for `load_kv()`), `verify_usxf` (bounded memory), `StreamVerifier`
(bytes as they arrive). Keys: `keys.WorkspaceKeys`. No MLX here: tensors are numpy arrays.
"""

from ..errors import UsxfInvalid
from .keys import WorkspaceKeys
from .layout import block_hashes, convert_rope_layout, rope_permutation
from .reader import StreamVerifier, UsxfFile, read_usxf, verify_usxf
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
from .writer import write_usxf

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
