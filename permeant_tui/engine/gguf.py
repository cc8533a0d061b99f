"""GGUF -> (mlx_lm model, tokenizer). The embedded models are GGUF files.

Two ways in, chosen per file (`gguf_reader.GgufFile.mlx_fast_path`):

- F32/F16/Q4_0/Q4_1/Q8_0 only: MLX's own reader (`mx.load`) returns Q4_0/Q4_1/Q8_0 tensors as
  MLX affine quantized triples (uint32 weight, scales, biases; group 32), bit width taken from
  the shapes. Kept quantized on Metal; dequantized on the CPU device with float32 scales.
- any other type (Q4_K, Q5_0, Q6_K, IQ*, BF16, ...): gguf-py dequantizes each tensor to float32.
  On the CPU device that is what runs. On Metal (`weights_mode == "quantized"`) MLX has no
  kernels for these types, so each quantized tensor is re-quantized to MLX's affine format,
  group 32: 8-bit for types of 5 bits or more, 4-bit below (lossy; `notes` says so, for
  `doctor`). Metal cannot be exercised on the Linux CI; the path is the same MLX calls the CPU
  test runs with PERMEANT_WEIGHTS=quantized.

Architectures and what llama.cpp changed on the way to GGUF: `gguf_arch.py`. Tokenizer:
`gguf_tokenizer.py`. Weights as loaded can be cached (`weights_cache.py`) for the next start.
"""

from __future__ import annotations

import importlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError
from .gguf_arch import apply_rope_freqs, arch_of, fix_float, mlx_name
from .gguf_arch import model_args as model_args  # re-exported: crossruntime uses it
from .gguf_reader import GgufFile, open_gguf

_GROUP = 32  # GGUF Q4_0/Q4_1/Q8_0 block size, and the group of re-quantized weights
_EIGHT_BIT_TYPES = {"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K"}
FLOAT_MODES = ("float32", "float16", "bfloat16")


@dataclass
class GgufModel:
    model: object
    tokenizer: object  # mlx_lm TokenizerWrapper
    args: dict
    metadata: dict
    weights_source: str  # "gguf (mx.load)", "gguf (gguf-py)" or "cache"
    notes: list[str] = field(default_factory=list)
    timings_ms: dict = field(default_factory=dict)


def read_gguf(path: str | Path) -> tuple[GgufFile, dict]:
    """The parsed file (tensors memory-mapped, not read) and its metadata."""
    f = open_gguf(path)
    return f, f.metadata


def quant_bits(weights: dict, prefix: str) -> int | None:
    """Bit width of a quantized tensor from its shapes (None when not quantized)."""
    w, s = weights.get(prefix + ".weight"), weights.get(prefix + ".scales")
    if s is None or w is None:
        return None
    return w.shape[-1] * 32 // (s.shape[-1] * _GROUP)


def _mlx_load(f: GgufFile, spec) -> dict:
    """Every tensor through mx.load (the fast path), names mapped, norm fixes applied."""
    import mlx.core as mx

    try:
        tensors = mx.load(str(f.path))
    except Exception as exc:  # mlx raises RuntimeError/ValueError with its own text
        raise ModelLoadError(f"could not read GGUF {f.path}: {exc}") from exc
    if not isinstance(tensors, dict):
        raise ModelLoadError(f"could not read GGUF {f.path}: no tensors")
    out = {}
    for name, value in tensors.items():
        target = mlx_name(name, spec)
        if target is None:
            continue
        out[target] = fix_float(target, value, spec)  # only norms change; never quantized
    return out


def _dequantize_all(f: GgufFile, spec, mode: str, notes: list[str]) -> dict:
    """Every tensor through gguf-py: float arrays in `mode`, or re-quantized triples."""
    import mlx.core as mx

    requant: dict[str, int] = {}
    out = {}
    for name, info in f.tensors.items():
        target = mlx_name(name, spec)
        if target is None:
            continue
        arr = mx.array(fix_float(target, f.dequantize(name), spec))
        quantized = info.type_name not in ("F32", "F16", "BF16")
        if mode == "quantized" and quantized and arr.ndim == 2 and arr.shape[-1] % _GROUP == 0:
            bits = 8 if info.type_name in _EIGHT_BIT_TYPES else 4
            w, s, b = mx.quantize(arr, group_size=_GROUP, bits=bits)
            base = target.rsplit(".", 1)[0]
            new = {target: w, f"{base}.scales": s.astype(mx.float16),
                   f"{base}.biases": b.astype(mx.float16)}
            requant[info.type_name] = bits
        else:
            dtype = mx.float32 if mode == "quantized" else getattr(mx, mode)
            new = {target: arr.astype(dtype) if arr.dtype != dtype else arr}
        mx.eval(*new.values())  # one tensor at a time: peak memory stays one tensor above
        out.update(new)
    if requant:
        notes.append("re-quantized for MLX (lossy): " + ", ".join(
            f"{t} -> affine {b}-bit" for t, b in sorted(requant.items())))
    return out


def _dequantize_triples(weights: dict, dtype) -> dict:
    """mx.load's quantized triples -> plain arrays. Scales and biases in float32 first:
    dequantizing in their float16 would round every weight to half precision (llama.cpp
    computes d*q+m in f32)."""
    import mlx.core as mx

    prefixes = {k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")}
    out = {}
    for k, v in weights.items():
        base = k.rsplit(".", 1)[0]
        if base in prefixes:
            if k.endswith(".weight"):
                out[k] = mx.dequantize(
                    v, weights[base + ".scales"].astype(mx.float32),
                    weights[base + ".biases"].astype(mx.float32),
                    group_size=_GROUP, bits=quant_bits(weights, base)).astype(dtype)
        else:
            out[k] = v.astype(dtype) if v.dtype != dtype else v
    return out


def weights_from_file(f: GgufFile, mode: str, notes: list[str]) -> tuple[dict, str]:
    """-> (mlx parameter name -> array, a label of the path taken)."""
    import mlx.core as mx

    if mode not in FLOAT_MODES + ("quantized",):
        raise ModelLoadError(f"unknown weights mode {mode!r} (PERMEANT_WEIGHTS: quantized, "
                             f"{', '.join(FLOAT_MODES)})")
    spec = arch_of(f.metadata, f.path)
    if f.mlx_fast_path:
        weights = _mlx_load(f, spec)
        if mode != "quantized":
            weights = _dequantize_triples(weights, getattr(mx, mode))
        return weights, "gguf (mx.load)"
    return _dequantize_all(f, spec, mode, notes), "gguf (gguf-py)"


def build_model(weights: dict, args: dict, path: Path):
    """An mlx_lm model of args['model_type'] holding `weights` (quantized triples kept)."""
    import mlx.core as mx
    import mlx.nn as nn

    module = importlib.import_module(f"mlx_lm.models.{args['model_type']}")
    args["tie_word_embeddings"] = "lm_head.weight" not in weights
    model = module.Model(module.ModelArgs.from_dict(args))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(dict(weights))
    bits = {k.rsplit(".", 1)[0]: quant_bits(weights, k.rsplit(".", 1)[0])
            for k in weights if k.endswith(".scales")}
    if bits:
        def predicate(path_: str, module_) -> dict | bool:
            if path_ in bits:
                return {"group_size": _GROUP, "bits": bits[path_], "mode": "affine"}
            return False

        nn.quantize(model, class_predicate=predicate)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: weights do not fit the {args['model_type']} model: "
                             f"{exc}") from exc
    mx.eval(model.parameters())
    return model


def load_gguf_model(path: str | Path, weights_mode: str = "float32", *,
                    digest: str | None = None, cache_weights: bool = False) -> GgufModel:
    """Model and tokenizer from a GGUF file. With `cache_weights` (and the file's `digest`),
    the weights as loaded are read from / written to `weights_cache` (not for the fast
    quantized path, which is already a memory map of the file)."""
    from . import weights_cache
    from .gguf_tokenizer import tokenizer_from_gguf

    p = Path(path)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    f = open_gguf(p)
    args = model_args(f.metadata, p)
    key_args = dict(args)  # the cache key: args as read, before the model build adjusts them
    timings["header"] = (time.perf_counter() - t) * 1000
    notes: list[str] = []
    key = digest if cache_weights else None
    use_cache = key is not None and not (weights_mode == "quantized" and f.mlx_fast_path)
    # The tokenizer (seconds for a 262k SentencePiece vocabulary) is built beside the weights.
    with ThreadPoolExecutor(1, thread_name_prefix="gguf-tokenizer") as pool:
        tok_job = pool.submit(_timed, tokenizer_from_gguf, f.metadata, p, key)
        t = time.perf_counter()
        weights = (weights_cache.load_cached(key, weights_mode, key_args)
                   if key is not None and use_cache else None)
        source = "cache"
        if weights is None:
            weights, source = weights_from_file(f, weights_mode, notes)
        model = build_model(weights, args, p)
        if "rope_freqs.weight" in f.tensors:
            apply_rope_freqs(model, f.dequantize("rope_freqs.weight"), args)
        timings["weights"] = (time.perf_counter() - t) * 1000
        if key is not None and use_cache and source != "cache":
            t = time.perf_counter()
            weights_cache.save_cached(key, weights_mode, key_args, dict(weights))
            timings["weights_cache_write"] = (time.perf_counter() - t) * 1000
        del weights
        tok, timings["tokenizer"] = tok_job.result()
    return GgufModel(model, tok, args, f.metadata, source, notes, timings)


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t) * 1000


def load_gguf(path: str | Path, weights_mode: str = "float32"):
    """-> (model, TokenizerWrapper, args dict, metadata dict)."""
    g = load_gguf_model(path, weights_mode)
    return g.model, g.tokenizer, g.args, g.metadata
