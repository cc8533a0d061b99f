"""ModelIdentity: what must match before any KV state is attached. A model path is not identity.

The fingerprint covers the architecture, the attention structure (layers, heads, kv heads,
head dim, RoPE base/scaling/layout, sliding window), a digest of the weights as loaded from
the file, a digest of the tokenizer's vocabulary and specials, and the KV dtype. The display
name is not part of it: the same weights under another name are the same model.

`attention` describes each layer as the loaded model runs it (read from the instantiated
model and its make_cache, not guessed from the config): type (full or sliding), window, and
its RoPE (base, rotary dims, layout, scaling). It is "" when every layer is full attention
with the one RoPE the scalar fields already describe, so plain models keep the fingerprint
they had before the field existed. `sliding_window` is the window mlx-lm applies (0 when it
applies none, e.g. Qwen2 with use_sliding_window false, Mistral v0.1, Phi-3).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import xxhash


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    rope_theta: float
    rope_scaling: str  # canonical JSON of the scaling config, "null" when none
    rope_layout: str  # "interleaved" (GGUF/traditional) or "half-split" (HF/NeoX)
    sliding_window: int  # 0 when none
    context_limit: int
    weights_digest: str
    tokenizer_digest: str
    kv_dtype: str
    attention: str = ""  # canonical JSON list, one entry per layer; "" for uniform full attention

    def _fields(self) -> dict:
        d = asdict(self)
        if not d["attention"]:
            d.pop("attention")  # identities from before the field keep their fingerprint
        return d

    @property
    def fingerprint(self) -> str:
        d = self._fields()
        d.pop("name")
        d.pop("context_limit")  # a runtime setting, not a property of the KV layout
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return xxhash.xxh3_128_hexdigest(blob)

    def to_dict(self) -> dict:
        return {**self._fields(), "fingerprint": self.fingerprint}

    def layers(self) -> list[dict]:
        """Per-layer attention: [{"type": "full"|"sliding", "window": int, "rope": {...}}]."""
        if self.attention:
            return json.loads(self.attention)
        return [{"type": "full", "window": 0}] * self.n_layers

    def layer_windows(self) -> list[int]:
        """Each layer's sliding window (0 for full attention)."""
        return [int(x.get("window") or 0) if x.get("type") == "sliding" else 0
                for x in self.layers()]

    @classmethod
    def from_dict(cls, d: dict) -> ModelIdentity:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def differences(self, other: ModelIdentity) -> list[str]:
        """Field names (other than the display name) whose values differ."""
        out = []
        for f in fields(self):
            if f.name in ("name", "context_limit"):
                continue
            if getattr(self, f.name) != getattr(other, f.name):
                out.append(f.name)
        return out


def rope_config(args: dict) -> tuple[float, str]:
    """(RoPE base, canonical JSON of the scaling) from a config, reading `rope_parameters`
    (transformers >= 5 nests rope_theta and the scaling there) as well as `rope_theta`."""
    params = args.get("rope_parameters") or {}
    theta = args.get("rope_theta")
    if theta is None:
        theta = params.get("rope_theta", 10000.0)
    scaling = args.get("rope_scaling")
    if scaling is None and params:
        rest = {k: v for k, v in params.items() if k != "rope_theta"}
        scaling = rest if rest and rest != {"rope_type": "default"} else None
    return float(theta), json.dumps(scaling, sort_keys=True)


_ROPE_ATTRS = (("dims", "dims"), ("dim", "dims"), ("base", "base"), ("traditional", "traditional"),
               ("scale", "scale"), ("_scale", "scale"), ("mscale", "mscale"))


def _rope(module) -> dict | None:
    """What a layer's RoPE module does: class, rotary dims, base, layout, scale, and a digest of
    precomputed frequencies (Llama 3 / YaRN / LongRoPE scaling)."""
    if module is None:
        return None
    d: dict = {"class": type(module).__name__}
    for attr, key in _ROPE_ATTRS:
        v = getattr(module, attr, None)
        if isinstance(v, (bool, int, float)):
            d[key] = v
    freqs = getattr(module, "_freqs", None)
    if freqs is not None:
        import numpy as np

        d["freqs"] = xxhash.xxh3_64_hexdigest(np.asarray(freqs, dtype=np.float32).tobytes())
    return d


def _attention_module(layer):
    for name in ("self_attn", "attention", "attn"):
        m = getattr(layer, name, None)
        if m is not None:
            return m
    return None


def attention_structure(model, specs, head_dim: int, rope_theta: float) -> tuple[str, int]:
    """(the `attention` field, the applied sliding window) of an instantiated model, given
    kvcache.layer_specs(model). Layers come from `model.layers`; RoPE from each layer's attention
    module; type and window from the cache mlx-lm builds for it."""
    layers = list(getattr(model, "layers", []))
    out = []
    for i, spec in enumerate(specs):
        attn = _attention_module(layers[i]) if i < len(layers) else None
        sliding = spec.kind == "sliding"
        entry = {"type": "sliding" if sliding else "full", "window": spec.window if sliding else 0,
                 "rope": _rope(getattr(attn, "rope", None))}
        if sliding and spec.keep:
            entry["keep"] = spec.keep
        out.append(entry)
    window = max((e["window"] for e in out), default=0)
    ropes = [e["rope"] for e in out]
    uniform = (all(e["type"] == "full" for e in out) and all(r == ropes[0] for r in ropes)
               and (ropes[0] is None or (ropes[0].get("dims", head_dim) == head_dim
                                         and ropes[0].get("base", rope_theta) == rope_theta)))
    if uniform:
        return "", window
    return json.dumps(out, sort_keys=True, separators=(",", ":")), window


def tokenizer_digest(vocab: list[str], specials: dict[str, int], template: str | None) -> str:
    h = xxhash.xxh3_128()
    for tok in vocab:
        h.update(tok.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update((template or "").encode())
    return h.hexdigest()


def file_digest(path: str | os.PathLike, cache_dir: Path | None = None) -> str:
    """xxh3-128 of a file's bytes, cached by (path, size, mtime) so a 4 GB model is hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    key = xxhash.xxh3_64_hexdigest(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache_file = cache_dir / f"{key}.digest" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        return cache_file.read_text().strip()
    h = xxhash.xxh3_128()
    with open(p, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if cache_file is not None:
        try:
            from .atomic import write_atomic

            write_atomic(cache_file, digest.encode(), durable=False)
        except OSError:
            pass  # a cache, not a requirement
    return digest


def tree_digest(paths: list[Path], cache_dir: Path | None = None) -> str:
    """Digest of several weight files (an MLX/HF model directory), order-independent by name."""
    h = xxhash.xxh3_128()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode())
        h.update(file_digest(p, cache_dir).encode())
    return h.hexdigest()
