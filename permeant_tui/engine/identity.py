"""ModelIdentity: what must match before any KV state is attached. A model path is not identity.

The fingerprint covers the architecture, the attention structure (layers, heads, kv heads,
head dim, RoPE base/scaling/layout, sliding window), a digest of the weights as loaded from
the file, a digest of the tokenizer's vocabulary and specials, and the KV dtype. The display
name is not part of it: the same weights under another name are the same model.
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

    @property
    def fingerprint(self) -> str:
        d = asdict(self)
        d.pop("name")
        d.pop("context_limit")  # a runtime setting, not a property of the KV layout
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return xxhash.xxh3_128_hexdigest(blob)

    def to_dict(self) -> dict:
        return {**asdict(self), "fingerprint": self.fingerprint}

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
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(digest)
            os.replace(tmp, cache_file)
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
