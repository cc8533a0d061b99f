"""Tiny random-weight MLX model directories of several architectures, built in a test.

Each directory is what `mlx_lm.load` (and `permeant --model DIR`) reads: config.json, random
weights in model.safetensors (optionally 4-bit quantized with mlx-lm's own quantize_model), the
SmolLM2 tokenizer as tokenizer.json and a tokenizer_config.json carrying its chat template.
The model classes come from the config through mlx-lm (`mlx_lm.utils._get_classes`), so each
directory runs exactly the attention (and cache types) mlx-lm gives that architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

_COMMON = {
    "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}
N_WORDS = 2000  # the output head only ever picks one of these word tokens

WINDOW = 64  # sliding window of the sliding-window architectures below

ARCHS: dict[str, dict] = {
    "llama": {"model_type": "llama", "rope_theta": 10000.0},
    # Qwen2 configs carry a sliding_window that the runtime does not apply
    "qwen2": {"model_type": "qwen2", "rope_theta": 1000000.0, "use_sliding_window": False,
              "sliding_window": 32},
    # transformers >= 5 nests the RoPE base under rope_parameters
    "qwen3": {"model_type": "qwen3", "rope_parameters": {"rope_theta": 1000000.0,
                                                         "rope_type": "default"}},
    # mlx-lm runs Phi-3 with full attention whatever its config's sliding_window says
    "phi3": {"model_type": "phi3", "rope_theta": 10000.0, "sliding_window": 32,
             "partial_rotary_factor": 0.5},
    # two sliding layers in three, local RoPE base 10,000 and global 1,000,000
    "gemma3_text": {"model_type": "gemma3_text", "rope_theta": 1000000.0,
                    "rope_local_base_freq": 10000.0, "sliding_window": WINDOW,
                    "sliding_window_pattern": 3, "query_pre_attn_scalar": 16,
                    "rms_norm_eps": 1e-6},
    "llama_swa": {"model_type": "llama", "rope_theta": 10000.0, "sliding_window": WINDOW,
                  "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
}
SLIDING = ("gemma3_text", "gemma3_text_q4", "llama_swa")
# recurrent state (mlx-lm ArraysCache): refused at load
RECURRENT = {"mamba": {"model_type": "mamba", "state_size": 8, "conv_kernel": 4,
                       "use_bias": False, "use_conv_bias": True, "time_step_rank": 4}}


def config_for(arch: str, vocab_size: int) -> dict:
    base = {**ARCHS, **RECURRENT}["gemma3_text" if arch == "gemma3_text_q4" else arch]
    return {**_COMMON, **base, "vocab_size": vocab_size}


def write_tokenizer(folder: Path, tokenizer) -> None:
    """The project's GGUF tokenizer (an mlx-lm TokenizerWrapper around GgufTokenizer) as a
    Hugging Face tokenizer.json + tokenizer_config.json with its chat template."""
    inner = tokenizer._tokenizer
    inner._tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": inner.chat_template, "eos_token": "<|im_end|>",
        "bos_token": "<|im_start|>", "tokenizer_class": "PreTrainedTokenizerFast"}))


def word_ids(tokenizer, n: int = N_WORDS) -> list[int]:
    """Ids of space-led alphabetic word tokens: any sequence of them decodes to text that the
    chat template re-tokenizes to the same ids, so a reply is reused from the cache next turn."""
    vocab = tokenizer._tokenizer.vocab
    ids = [i for i, t in enumerate(vocab)
           if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha() and len(t) >= 4]
    return ids[:n]


def _words_only_head(model, tokenizer) -> None:
    """Zero the output head except for word tokens (random rows): greedy replies are words."""
    import mlx.core as mx

    head = getattr(model, "lm_head", None)
    if head is None:
        return
    w = head.weight
    ids = mx.array(word_ids(tokenizer))
    rows = mx.random.normal((ids.size, w.shape[1])) * 0.5
    head.weight = mx.zeros(w.shape, w.dtype).at[ids].add(rows.astype(w.dtype))


def build_model_dir(folder: Path, arch: str, tokenizer, *, seed: int = 0,
                    bits: int | None = None) -> Path:
    """Write a tiny random-weight model of `arch` (a key of ARCHS or RECURRENT, or
    gemma3_text_q4 for 4-bit weights) into `folder`. Returns the folder."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model

    if arch == "gemma3_text_q4":
        bits = bits or 4
    config = config_for(arch, len(tokenizer._tokenizer))
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    _words_only_head(model, tokenizer)
    mx.eval(model.parameters())
    if bits:
        model, config = quantize_model(model, config, group_size=64, bits=bits)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder, tokenizer)
    return folder


def write_model_dir(folder: Path, config: dict, tokenizer, *, seed: int = 0,
                    dtype: str | None = None) -> Path:
    """A random-weight model directory for any mlx-lm `config` (the benchmarks' model shapes),
    its weights cast to `dtype` (e.g. "bfloat16") when given. Returns the folder."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    if dtype:
        model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder, tokenizer)
    return folder


_LOADED: dict = {}


def tiny_model(arch: str, tokenizer):
    """(folder, LoadedModel) of a tiny `arch` model, built and loaded once per test process."""
    if arch not in _LOADED:
        import atexit
        import shutil
        import tempfile

        from permeant_tui.engine.models import load_model

        root = Path(tempfile.mkdtemp(prefix=f"tiny-{arch}-"))
        atexit.register(shutil.rmtree, root, True)
        folder = build_model_dir(root / arch, arch, tokenizer)
        _LOADED[arch] = (folder, load_model(str(folder)))
    return _LOADED[arch]
