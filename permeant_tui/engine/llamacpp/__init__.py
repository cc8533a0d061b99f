"""llama.cpp as a second runtime (issue 6, sliding-window models issue 13): its per-sequence KV
state read and written byte for byte (`codec`, through the sinks in `writers`), model layers
mapped to llama.cpp's KV caches (`cells`: one unified cache, or iSWA's base and SWA caches), a
small ctypes runtime around llama-cpp-python (`runtime`), and the bridge that moves USXF exports
in and out of it (`bridge`).

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
from .cells import (
    LayerKV,
    before,
    cache_groups,
    caches_from_layers,
    layers_from_caches,
    layers_from_payload,
    payload_from_layers,
)
from .codec import (
    SEQ_STATE_MAGIC,
    CacheCells,
    CacheInfo,
    SeqStateError,
    SeqStateInfo,
    SlidingWindowUnsupported,
    build_seq_state,
    build_seq_state_caches,
    parse_seq_state,
    parse_seq_state_caches,
    permute_k_heads,
    seq_state_info,
    seq_state_nbytes,
    write_seq_state,
    write_seq_state_caches,
)
from .runtime import LlamaCppRuntime
from .writers import (
    GGML_TYPE_BF16,
    GGML_TYPE_F16,
    GGML_TYPE_F32,
    KV_TYPES,
    BufferWriter,
    CountingWriter,
    SeqStateWriter,
)

__all__ = [
    "GGML_TYPE_BF16",
    "GGML_TYPE_F16",
    "GGML_TYPE_F32",
    "KV_TYPES",
    "SEQ_STATE_MAGIC",
    "AttachReport",
    "BufferWriter",
    "CacheCells",
    "CacheInfo",
    "CaptureReport",
    "CostModel",
    "CountingWriter",
    "LayerKV",
    "LlamaCppRuntime",
    "ProbeResult",
    "SeqStateError",
    "SeqStateInfo",
    "SeqStateWriter",
    "SlidingWindowUnsupported",
    "attach_usxf",
    "before",
    "build_seq_state",
    "build_seq_state_caches",
    "cache_groups",
    "caches_from_layers",
    "calibrate",
    "capture_usxf",
    "check_identity",
    "gguf_identity",
    "kv_from_mlx_cache",
    "layers_from_caches",
    "layers_from_payload",
    "parse_seq_state",
    "parse_seq_state_caches",
    "payload_from_layers",
    "permute_k_heads",
    "seq_state_info",
    "seq_state_nbytes",
    "write_seq_state",
    "write_seq_state_caches",
]
