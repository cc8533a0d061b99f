"""What USXF 1.1 is (1.0 plus per-layer attention, docs/USXF.md 2.1): magic, version, header layout, limits, check names, and the records that
cross the API (docs/USXF.md). Writer, reader and tests import these so each lives in one place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UsxfInvalid

if TYPE_CHECKING:  # numpy only in annotations: the UI imports QUANTS without paying for numpy
    import numpy as np

MAGIC = b"USXF\r\n\x1a\n"
VERSION_MAJOR = 1
VERSION_MINOR = 1  # 1.1: attention.layers, kv.tensors[*].start (1.0 files still read)
WRITER = f"permeant-usxf/{VERSION_MAJOR}.{VERSION_MINOR}"

# magic, major, minor, sig_alg, flags, manifest_len, sig_len, chunk_size,
# payload_offset, payload_len, manifest_xxh3, header_xxh3
HEADER = struct.Struct("<8sHHHHQIIQQQQ")
HEADER_SIZE = HEADER.size  # 64
assert HEADER_SIZE == 64

SIG_ALG_ED25519 = 1
SIG_ALG_NAMES = {SIG_ALG_ED25519: "ed25519"}
ED25519_PUBLIC_LEN = 32
ED25519_SIG_LEN = 64
SIG_LEN_ED25519 = ED25519_PUBLIC_LEN + ED25519_SIG_LEN  # public key || signature
SIGNATURE_DOMAIN = b"usxf.signature.v1\x00"
PAYLOAD_DOMAIN = b"usxf.payload.v1\x00"
BLOCKS_DOMAIN = b"usxf.blocks.v1\x00"
BLOCK_HASH_NAME = "xxh3-128-chain/1"
CHUNK_HASH_NAME = "sha256"
DIGEST_NAME = "sha256-chunk-list/1"

PAYLOAD_ALIGN = 4096  # the payload starts on a page
TENSOR_ALIGN = 64  # every tensor region starts on a cache line

CHUNK_SIZE = 4 << 20  # default: 4 MiB (docs/USXF.md 1.2)
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 256 << 20
BLOCK_SIZE = 16  # default: vLLM's paged KV block (docs/USXF.md 4)
MIN_BLOCK_SIZE = 1
MAX_BLOCK_SIZE = 1 << 20

MAX_MANIFEST = 64 << 20
MAX_TOKENS = 1 << 22
MAX_PAYLOAD = 1 << 40
MAX_CHUNKS = 1 << 19
INT8_GROUP = 64

QUANTS = ("none", "f16", "bf16", "int8", "kivi8")  # docs/USXF.md 5
PROBE_N = 128  # default fidelity probe length in tokens (docs/USXF.md 7; export --probe N)
SOURCE_DTYPES = ("float32", "float16", "bfloat16")
STORED_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}
ROPE_LAYOUTS = ("interleaved", "half-split")

# check names (docs/USXF.md 8)
CHECK_IO = "io"
CHECK_TRUNCATED = "truncated"
CHECK_MAGIC = "magic"
CHECK_VERSION = "version"
CHECK_HEADER = "header"
CHECK_BOUNDS = "bounds"
CHECK_TRAILING = "trailing-data"
CHECK_MANIFEST = "manifest"
CHECK_SIGNATURE = "signature"
CHECK_UNTRUSTED = "untrusted-key"
CHECK_IDENTITY = "model-identity"
CHECK_TOKENS = "tokens"
CHECK_BLOCKS = "block-hash"
CHECK_LAYOUT = "layout"
CHECK_AGENT = "agent"
CHECK_FIDELITY = "fidelity"
CHECK_PADDING = "padding"
CHECK_CHUNK = "chunk-checksum"
CHECK_DIGEST = "payload-digest"
CHECK_MALFORMED = "malformed"  # safety net; the fuzz tests assert it never fires


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def payload_offset_for(manifest_len: int, sig_len: int) -> int:
    return align_up(HEADER_SIZE + manifest_len + sig_len, PAYLOAD_ALIGN)


class UsxfUntrustedKey(UsxfInvalid):
    """The signature is valid but its key is not trusted here. Carries what the UI needs to offer
    "trust this key": its id and its shareable text form."""

    def __init__(self, key_id: str, public_key_text: str, path: str | None = None):
        self.key_id, self.public_key_text = key_id, public_key_text
        super().__init__(
            CHECK_UNTRUSTED,
            f"signature valid but key {key_id} is not trusted; trust {public_key_text} "
            f"if you know the sender",
            path,
        )


class UsxfWriteError(UsxfInvalid):
    """write_usxf refused its input (shapes that disagree with the identity, non-finite values
    under a lossy quantization, a manifest over the limit, ...). Nothing was written."""


@dataclass(frozen=True)
class KVPayload:
    """One agent's KV cache: per layer K and V, each (n_kv_heads, L_i, head_dim), C order, in
    logical (token) order. L_i is the sequence length on a full-attention layer and
    min(length, window) on a sliding-window layer (its last positions; USXF 1.1).

    dtype is the source KV dtype: "float32", "float16" or "bfloat16" (carried as np.uint16 bits)."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    dtype: str

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)


@dataclass(frozen=True)
class AgentRecord:
    """Who the state belongs to. Each turn is {"user", "reply", "span": [start, end)} where the
    span is the turn's token positions in the cache."""

    agent_id: str
    role: str
    title: str
    system: str
    turns: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Fidelity:
    """A probe the receiver replays after attaching: append probe_prompt_ids, greedy-decode n
    tokens, compare with expected_ids (what the source produced from this exact state)."""

    probe_prompt_ids: list[int]
    expected_ids: list[int]
    n: int
    context_room: int
    note: str = ""
    # optional: the source's top-1 minus top-2 logit at each expected token (docs/USXF.md 7),
    # so a receiver tells a near tie that flipped apart from a damaged state
    margins: list[float] | None = None
