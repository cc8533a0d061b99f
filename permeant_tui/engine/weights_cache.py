"""Weights as loaded, cached as safetensors beside the model cache, keyed by the GGUF's digest.

Dequantizing a GGUF to float32 takes seconds (Gemma 3 270M Q4_K_M: ~9 s with numpy); the
result is the same every time, so it is written once (atomically, `engine/atomic.py`) and the
next start reads it back with `mx.load`, which maps the file instead of decoding it.
The key covers everything the arrays depend on: the GGUF's content digest, the weights mode
(float32 / float16 / bfloat16 / quantized) and `LOADER_VERSION` (bump it when the mapping or
dequantization changes). Safe to delete; `PERMEANT_MODEL_CACHE` moves it (tests share one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LOADER_VERSION = 1


def models_cache_dir() -> Path:
    """Assembled embedded GGUFs and cached weights (large files, machine-local)."""
    env = os.environ.get("PERMEANT_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    from ..paths import cache_dir

    return cache_dir() / "models"


def cache_path(digest: str, mode: str) -> Path:
    return models_cache_dir() / "weights" / f"{digest}-{mode}-v{LOADER_VERSION}.safetensors"


def load_cached(digest: str, mode: str, args: dict) -> dict | None:
    """The cached arrays, or None (absent, unreadable or written for other model args)."""
    import mlx.core as mx

    p = cache_path(digest, mode)
    if not p.is_file():
        return None
    try:
        weights, meta = mx.load(str(p), return_metadata=True)  # type: ignore[misc]
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None
    if not isinstance(weights, dict) or not isinstance(meta, dict) or \
            meta.get("permeant.args") != _args_key(args):
        return None
    return weights


def save_cached(digest: str, mode: str, args: dict, weights: dict) -> Path | None:
    """Write the arrays atomically; a cache that cannot be written is skipped silently."""
    import mlx.core as mx

    from .atomic import commit_file, temp_path

    p = cache_path(digest, mode)
    tmp = temp_path(p, ".tmp.safetensors")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(tmp), weights, metadata={
            "permeant.args": _args_key(args), "permeant.gguf_digest": digest,
            "permeant.mode": mode, "permeant.loader": str(LOADER_VERSION)})
        return commit_file(tmp, p)
    except (OSError, RuntimeError, ValueError):
        tmp.unlink(missing_ok=True)
        return None


def _args_key(args: dict) -> str:
    return json.dumps(args, sort_keys=True, default=str)
