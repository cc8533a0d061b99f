"""llama.cpp as a second runtime (issue 6): its per-sequence KV state read and written byte for
byte (`codec`), a small ctypes runtime around llama-cpp-python (`runtime`), and the bridge that
moves USXF exports in and out of it (`bridge`).

No Textual import; `llama_cpp` is imported only when a runtime is made, so this package imports
without the optional extra `permeant-tui[llamacpp]`.
"""

from .bridge import (
    AttachReport,
    CaptureReport,
    CostModel,
    ProbeResult,
    attach_usxf,
    calibrate,
    capture_usxf,
    check_identity,
    gguf_identity,
    kv_from_mlx_cache,
)
from .codec import (
    GGML_TYPE_BF16,
    GGML_TYPE_F16,
    GGML_TYPE_F32,
    KV_TYPES,
    SEQ_STATE_MAGIC,
    BufferWriter,
    CountingWriter,
    SeqStateError,
    SeqStateInfo,
    SeqStateWriter,
    SlidingWindowUnsupported,
    build_seq_state,
    parse_seq_state,
    permute_k_heads,
    seq_state_info,
    seq_state_nbytes,
    write_seq_state,
)
from .runtime import LlamaCppRuntime

__all__ = [
    "GGML_TYPE_BF16",
    "GGML_TYPE_F16",
    "GGML_TYPE_F32",
    "KV_TYPES",
    "SEQ_STATE_MAGIC",
    "AttachReport",
    "BufferWriter",
    "CaptureReport",
    "CostModel",
    "CountingWriter",
    "LlamaCppRuntime",
    "ProbeResult",
    "SeqStateError",
    "SeqStateInfo",
    "SeqStateWriter",
    "SlidingWindowUnsupported",
    "attach_usxf",
    "build_seq_state",
    "calibrate",
    "capture_usxf",
    "check_identity",
    "gguf_identity",
    "kv_from_mlx_cache",
    "parse_seq_state",
    "permute_k_heads",
    "seq_state_info",
    "seq_state_nbytes",
    "write_seq_state",
]
