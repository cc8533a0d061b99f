"""GGUF -> (mlx_lm llama model, tokenizer). The embedded default model is a GGUF file.

`mx.load(path, return_metadata=True)` reads GGUF: Q4_0/Q4_1/Q8_0 tensors arrive as MLX affine
quantized triples (uint32 weight, scales, biases; group 32), norms as float32. We map the
names onto mlx_lm's llama model, take each tensor's bit width from its shapes, tie the
embeddings when there is no `output.weight`, and set `rope_traditional=True` because GGUF
stores the Q/K rows permuted for interleaved RoPE.

The tokenizer is rebuilt from the GGUF metadata with the `tokenizers` library (BPE + Digits +
ByteLevel, as llama.cpp's pre-tokenizer for these models) and wrapped for mlx_lm. No
`transformers` import: it costs seconds at start-up and is not needed.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ModelLoadError

_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GROUP = 32  # GGUF Q4_0/Q4_1/Q8_0 block size
_LLAMA_LIKE = {"llama", "mistral"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|scales|biases|bias)$")


def _scalar(meta: dict, key: str, default=None):
    v = meta.get(key, default)
    if hasattr(v, "item"):
        v = v.item()
    return v


def read_gguf(path: str | Path):
    """Raw tensors and metadata, with a clear error for anything that is not a GGUF file."""
    import mlx.core as mx

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"model file not found: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{p} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return mx.load(str(p), return_metadata=True)
    except Exception as exc:  # mlx raises RuntimeError/ValueError with its own text
        raise ModelLoadError(f"could not read GGUF {p}: {exc}") from exc


def model_args(meta: dict, path: Path) -> dict:
    arch = _scalar(meta, "general.architecture")
    if arch not in _LLAMA_LIKE:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; this loader reads llama-"
            f"architecture GGUF files (for others, pass an MLX model directory or HF repo id)"
        )
    a = f"{arch}."

    def need(key):
        v = _scalar(meta, a + key)
        if v is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {a + key}")
        return v

    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    head_dim = int(_scalar(meta, a + "rope.dimension_count", hidden // n_heads))
    vocab = _scalar(meta, a + "vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    scaling = None
    stype = _scalar(meta, a + "rope.scaling.type")
    if stype and stype != "none":
        scaling = {"type": stype, "factor": float(_scalar(meta, a + "rope.scaling.factor", 1.0))}
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_scalar(meta, a + "attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(vocab),
        "rope_theta": float(_scalar(meta, a + "rope.freq_base", 10000.0)),
        "rope_traditional": True,  # GGUF permutes Q/K rows for interleaved RoPE
        "rope_scaling": scaling,
        "max_position_embeddings": int(_scalar(meta, a + "context_length", 2048)),
        "tie_word_embeddings": True,  # corrected below when output.weight exists
    }


def map_weights(tensors: dict) -> dict:
    """GGUF tensor names -> mlx_lm llama parameter names (quantized triples kept together)."""
    out = {}
    for name, value in tensors.items():
        m = _BLK.match(name)
        if m:
            layer, part, kind = m.groups()
            if part not in _LAYER_MAP:
                raise ModelLoadError(f"unexpected GGUF tensor {name}")
            out[f"model.layers.{layer}.{_LAYER_MAP[part]}.{kind}"] = value
            continue
        base, _, kind = name.rpartition(".")
        if base not in _TOP_MAP:
            if base.startswith("rope_freqs"):
                continue
            raise ModelLoadError(f"unexpected GGUF tensor {name}")
        out[f"{_TOP_MAP[base]}.{kind}"] = value
    return out


def quant_bits(weights: dict, prefix: str) -> int | None:
    """Bit width of a quantized tensor from its shapes (None when not quantized)."""
    w, s = weights.get(prefix + ".weight"), weights.get(prefix + ".scales")
    if s is None or w is None:
        return None
    in_features = s.shape[-1] * _GROUP
    return w.shape[-1] * 32 // in_features


def build_model(tensors: dict, meta: dict, path: Path, weights_mode: str):
    """weights_mode: 'float32' | 'float16' | 'bfloat16' (dequantized copies) or 'quantized'."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    args = model_args(meta, path)
    weights = map_weights(tensors)
    args["tie_word_embeddings"] = "lm_head.weight" not in weights
    model = llama.Model(llama.ModelArgs.from_dict(args))

    prefixes = sorted({k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")})
    if weights_mode == "quantized":
        bits = {p: quant_bits(weights, p) for p in prefixes}

        def predicate(path_: str, module) -> dict | bool:
            if path_ in bits:
                return {"group_size": _GROUP, "bits": bits[path_], "mode": "affine"}
            return False

        nn.quantize(model, class_predicate=predicate)
        final = weights
    else:
        dtype = getattr(mx, weights_mode)
        final = {}
        for k, v in weights.items():
            base = k.rsplit(".", 1)[0]
            if base in prefixes:
                if k.endswith(".weight"):
                    bits = quant_bits(weights, base)
                    # Scales and biases in float32 first: dequantizing in their float16 would
                    # round every weight to half precision (llama.cpp computes d*q+m in f32).
                    final[k] = mx.dequantize(
                        v, weights[base + ".scales"].astype(mx.float32),
                        weights[base + ".biases"].astype(mx.float32),
                        group_size=_GROUP, bits=bits,
                    ).astype(dtype)
            else:
                final[k] = v.astype(dtype) if v.dtype != dtype else v
    try:
        model.load_weights(list(final.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: weights do not fit the llama model: {exc}") from exc
    mx.eval(model.parameters())
    return model, args


def load_gguf(path: str | Path, weights_mode: str = "float32"):
    """-> (model, TokenizerWrapper, args dict, metadata dict)."""
    from .gguf_tokenizer import tokenizer_from_gguf

    p = Path(path)
    tensors, meta = read_gguf(p)
    model, args = build_model(tensors, meta, p, weights_mode)
    tok = tokenizer_from_gguf(meta, p)
    return model, tok, args, meta
