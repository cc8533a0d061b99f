"""GGUF architectures -> mlx_lm models: configuration from metadata, tensor names, weight fixes.

What llama.cpp's converter changed on the way to GGUF, and what it hard-codes instead of writing
into the metadata, is undone or restated here, one architecture at a time:

- llama (and mistral): Q/K rows are permuted for llama.cpp's interleaved RoPE, so the model
  runs with `rope_traditional=True` (the KV cache then holds keys in that layout: identity's
  `rope_layout` says "interleaved"). Llama 3.1+ files carry `rope_freqs.weight`, the per-frequency
  divisors llama.cpp applies; they become the RoPE frequencies (see `apply_rope_freqs`).
- qwen2 / qwen3: no permutation (half-split RoPE, llama.cpp's NEOX type); qwen2 has Q/K/V
  biases, qwen3 QK norms and an explicit head dimension.
- gemma3: no permutation; every `*norm.weight` is stored as 1 + w (llama.cpp multiplies by the
  stored weight, mlx_lm's Gemma RMSNorm adds the 1 itself), so 1 is subtracted here. The
  sliding-window pattern (every 6th layer global) and the local RoPE base (10,000) are not in
  most files: llama.cpp hard-codes them and reads `attention.sliding_window_pattern` /
  `rope.freq_base_swa` only when present; so does this module. The query scale is
  1/sqrt(key_length), except for the 62-layer 27B model (1/sqrt(hidden/heads)), as llama.cpp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError
from .gguf_reader import scalar

_COMMON = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|scales|biases|bias)$")


@dataclass(frozen=True)
class ArchSpec:
    gguf_name: str
    model_type: str  # the mlx_lm.models module
    rope_traditional: bool
    layer_map: dict = field(default_factory=dict)
    norm_shift: float = 0.0  # subtracted from every *norm.weight


ARCHS = {
    "llama": ArchSpec("llama", "llama", True,
                      {**_COMMON, "ffn_norm": "post_attention_layernorm"}),
    "mistral": ArchSpec("mistral", "llama", True,
                        {**_COMMON, "ffn_norm": "post_attention_layernorm"}),
    "qwen2": ArchSpec("qwen2", "qwen2", False,
                      {**_COMMON, "ffn_norm": "post_attention_layernorm"}),
    "qwen3": ArchSpec("qwen3", "qwen3", False,
                      {**_COMMON, **_QK_NORM, "ffn_norm": "post_attention_layernorm"}),
    "gemma3": ArchSpec("gemma3", "gemma3_text", False, {
        **_COMMON, **_QK_NORM,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }, norm_shift=1.0),
}
SUPPORTED = ", ".join(sorted(ARCHS))
GEMMA3_SWA_PATTERN = 6  # llama.cpp: load_swa_pattern(ml, 6) when the file does not say
GEMMA3_LOCAL_ROPE_BASE = 10_000.0  # llama.cpp: hparams.rope_freq_base_train_swa default


def arch_of(meta: dict, path: Path) -> ArchSpec:
    arch = scalar(meta, "general.architecture")
    if arch not in ARCHS:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; this loader reads {SUPPORTED} "
            "GGUF files (for others, pass an MLX model directory or HF repo id)")
    return ARCHS[arch]


def model_args(meta: dict, path: Path) -> dict:
    """mlx_lm ModelArgs (as a dict) for the file's architecture, from its metadata."""
    spec = arch_of(meta, path)
    a = f"{spec.gguf_name}."

    def get(key, default=None):
        return scalar(meta, a + key, default)

    def need(key):
        v = get(key)
        if v is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {a + key}")
        return v

    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    key_len = get("attention.key_length")
    head_dim = int(key_len or get("rope.dimension_count") or hidden // n_heads)
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    args = {
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(vocab),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_traditional": spec.rope_traditional,
        "rope_scaling": _rope_scaling(get),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": True,  # corrected by the loader when output.weight exists
    }
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embeddings ({rot} of {head_dim} dims) "
                             "are not supported for GGUF files")
    if spec.model_type == "qwen2" and head_dim != hidden // n_heads:
        raise ModelLoadError(f"{path}: qwen2 head dim {head_dim} != hidden/heads")
    if spec.model_type == "gemma3_text":
        _gemma3_args(args, get, path)
    return args


def _rope_scaling(get) -> dict | None:
    kind = get("rope.scaling.type")
    if not kind or kind == "none":
        return None
    factor = float(get("rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"type": "linear", "rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {"type": "yarn", "rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings":
                    int(get("rope.scaling.original_context_length", 0) or 0)}
    return {"type": str(kind), "factor": factor}


def _gemma3_args(args: dict, get, path: Path) -> None:
    window = get("attention.sliding_window")
    pattern = get("attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
    if hasattr(pattern, "__len__"):  # a per-layer bool array: accept it when periodic
        flags = [bool(x) for x in pattern]
        n = next((i + 1 for i, f in enumerate(flags) if not f), 0)
        if not n or any(f != ((i % n) < n - 1) for i, f in enumerate(flags)):
            raise ModelLoadError(f"{path}: non-periodic sliding-window layer pattern")
        pattern = n
    softcap = get("final_logit_softcapping")
    if softcap:
        raise ModelLoadError(f"{path}: final logit soft-capping is not supported for gemma3")
    n_layers = args["num_hidden_layers"]
    args.update({
        # no window in the file: llama.cpp runs every layer with full attention (pattern 1:
        # mlx_lm then makes no sliding layer, and identity records no window)
        "sliding_window": int(window) if window else 0,
        "sliding_window_pattern": int(pattern) if window else 1,
        "rope_local_base_freq": float(get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)),
        "query_pre_attn_scalar": float(args["hidden_size"] // args["num_attention_heads"]
                                       if n_layers == 62 else args["head_dim"]),
    })
    if args["rope_scaling"] is not None:
        args["rope_scaling"] = {"rope_type": args["rope_scaling"]["rope_type"],
                                "factor": args["rope_scaling"]["factor"]}


def mlx_name(name: str, spec: ArchSpec) -> str | None:
    """GGUF tensor name -> mlx_lm parameter name; None for tensors the model does not load
    (`rope_freqs`, handled by `apply_rope_freqs`)."""
    m = _BLK.match(name)
    if m:
        layer, part, kind = m.groups()
        if part not in spec.layer_map:
            raise ModelLoadError(f"unexpected GGUF tensor {name} for {spec.gguf_name}")
        return f"model.layers.{layer}.{spec.layer_map[part]}.{kind}"
    base, _, kind = name.rpartition(".")
    if base.startswith("rope_freqs"):
        return None
    if base not in _TOP:
        raise ModelLoadError(f"unexpected GGUF tensor {name} for {spec.gguf_name}")
    return f"{_TOP[base]}.{kind}"


def fix_float(name: str, value, spec: ArchSpec):
    """Undo the converter's changes to a float tensor (numpy or MLX array)."""
    if spec.norm_shift and name.endswith("norm.weight"):
        return value - spec.norm_shift
    return value


def apply_rope_freqs(model, freq_factors, args: dict) -> None:
    """Llama 3.1+: `rope_freqs.weight` holds llama.cpp's per-frequency divisors. MLX's fast
    RoPE takes the periods directly: base^(2i/d) * factor_i."""
    import mlx.core as mx
    import mlx.nn as nn

    dims = args["head_dim"]
    base = args["rope_theta"]
    periods = (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
               * mx.array(freq_factors, dtype=mx.float32))

    class FactorRoPE(nn.Module):
        def __init__(self):
            super().__init__()
            self._freqs = periods

        def __call__(self, x, offset: int = 0):
            return mx.fast.rope(x, dims, traditional=args["rope_traditional"], base=None,
                                scale=1.0, offset=offset, freqs=self._freqs)

    for layer in model.model.layers:
        layer.self_attn.rope = FactorRoPE()
    args["rope_scaling"] = {"rope_type": "gguf-rope-freqs",
                            "factors": [round(float(f), 6) for f in freq_factors]}


def layer_windows(args: dict) -> list[int]:
    """Each layer's sliding window as llama.cpp and mlx_lm apply it (0: full attention), from
    `model_args`: gemma3 slides every layer but each `sliding_window_pattern`-th; the other
    architectures here attend fully."""
    n = int(args["num_hidden_layers"])
    window = int(args.get("sliding_window") or 0)
    if args.get("model_type") != "gemma3_text" or not window:
        return [0] * n
    pattern = int(args.get("sliding_window_pattern") or 1)
    return [0 if (i + 1) % pattern == 0 else window for i in range(n)]
