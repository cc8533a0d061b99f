"""Tiny GGUF files written in the tests with gguf-py's GGUFWriter, as llama.cpp's converter would
write them: random weights from an mlx_lm model of the architecture, renamed to GGUF names,
Q/K rows permuted for llama, Gemma's norms stored as 1 + w, chosen tensors quantized.
`reference_model` holds the same (dequantized, unpermuted) weights in a plain mlx_lm model."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

HARD_TEXTS = [
    "Hello, world!", " leading space", "trailing space ", "  two leading", "x  y   z    w",
    "tabs\tand\t\tmore\t", "line\nbreaks\n\n\nand\r\nCRLF", "\n", "   ", "",
    "def f(x):\n    return x**2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "if x != y && z >= 3: print(f'{x!r}')", "<div class=\"a\">b</div>", "C:\\path\\to\\file.txt",
    "12345 + 6789 = 19134", "3.14159265358979", "1,234,567.89 and 0x1F and 1e-9",
    "2024-11-30T04:05:06Z", "phone: +1 (555) 010-9999", "000123 0007",
    "日本語のテキスト", "中文文本测试，标点。", "한국어 문장", "Ελληνικά και русский",
    "emoji 😀🎉👍🏽 mix", "👨‍👩‍👧‍👦 family", "naïve café résumé", "a\u00a0b\u2003c",
    "Ωmega ∑ ∫ √ ∞ ≠", "don't can't won't I'm you're", "DON'T SHOUT I'LL", "Hello!!! ??? ...",
    "http://example.com/a?b=c&d=e#frag", "user@example.com", "snake_case camelCase kebab-case",
    "[1, 2, 3] {\"k\": [true, null]}", "\u200bzero width", "ﬁ ligature and ½ fraction",
]


BPE_SPECIALS = ["<|im_start|>user\nHi there<|im_end|>\n", "a<|endoftext|>b",
                "<|im_end|><|im_start|>", "not special: <|im_start", "<|im_start|>"]
SPM_SPECIALS = ["<start_of_turn>user\nHi<end_of_turn>\n", "<b>bold</b> text", "a  b   c",
                "<bos>hello<eos>", "\n\nthe world\n", "<start_of_turn"]


def llama_cpp_vocab(path):
    """llama.cpp's tokenizer on a GGUF file (vocab_only: no weights are loaded)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (make test installs it)")
    from llama_cpp import Llama

    return Llama(model_path=str(path), vocab_only=True, verbose=False)


def mismatches(ours, llm, texts, add_bos=False) -> list:
    """(text, our ids, llama.cpp's ids) for every text the two tokenize differently."""
    bad = []
    for text in texts:
        a = ours.encode(text, add_special_tokens=add_bos)
        b = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        if a != b:
            bad.append((text, a, b))
    return bad


def smollm2_tokenizer_meta() -> dict:
    """The SmolLM2 vocabulary, merges, token types and chat template, from the embedded GGUF."""
    from permeant_tui.engine.gguf_reader import open_gguf
    from permeant_tui.engine.models import default_model_path

    meta = open_gguf(default_model_path()).metadata
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


def spm_tokenizer_meta(add_space_prefix: bool = False) -> dict:
    """A small SentencePiece vocabulary shaped like Gemma's: controls, user-defined newline and
    space runs, 256 byte tokens, characters and scored multi-character pieces."""
    tokens, types, scores = [], [], []

    def add(t, kind, score=0.0):
        tokens.append(t)
        types.append(kind)
        scores.append(score)

    for t in ("<pad>", "<eos>", "<bos>"):
        add(t, 3, -1000.0)
    add("<unk>", 2, -1000.0)
    for t in ("<start_of_turn>", "<end_of_turn>"):
        add(t, 3, -1000.0)
    for t in ("\n", "\n\n", "  ", "   ", "<b>", "</b>"):
        add(t, 4, -1000.0)
    for b in range(256):
        add(f"<0x{b:02X}>", 6)
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'()=+-_#:")
    pieces = ["▁t", "he", "▁the", "in", "ing", "▁a", "er", "▁w", "or", "ld", "▁wor", "▁world",
              "ll", "lo", "llo", "▁he", "▁hello", "▁H", "▁Hello", "re", "▁re", "tu", "rn",
              "▁return", "▁x", "12", "123", "00", "▁in", "▁is", "is", "▁of", "on", "▁on",
              "▁f", "▁for", "an", "▁an", "▁and", "ed", "▁de", "▁def", "é", "caf", "▁café"]
    for i, t in enumerate(["▁", *chars]):
        add(t, 1, -100.0 - i)
    for i, t in enumerate(pieces):
        add(t, 1, -1.0 - i)
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": np.array(types, np.int32),
        "tokenizer.ggml.scores": np.array(scores, np.float32),
        "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def random_model(model_type: str, config: dict, seed: int = 0):
    import mlx.core as mx

    mx.random.seed(seed)
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    model = module.Model(module.ModelArgs.from_dict({"model_type": model_type, **config}))
    mx.eval(model.parameters())
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute: half-split rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_gguf(path: Path, arch: str, model, config: dict, tokenizer: dict,
               quant: dict[str, str] | None = None, extra: dict | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None) -> dict:
    """Write `model` as llama.cpp would. `quant` maps a GGUF tensor-name fragment to a ggml
    type name (e.g. {"ffn": "Q5_0"}). Returns the reference weights {mlx name: np.float32}:
    what a correct loader must hold (quantization round trip applied, no permutation)."""
    import gguf
    from mlx.utils import tree_flatten

    from permeant_tui.engine.gguf_arch import ARCHS, mlx_name

    spec = ARCHS[arch]
    names = {}
    for gname in _gguf_names(config["num_hidden_layers"], spec):
        target = mlx_name(gname, spec)
        names[target] = gname
    w = gguf.GGUFWriter(str(path), arch)
    _write_hparams(w, arch, config, extra or {})
    _write_tokenizer(w, tokenizer)
    reference = {}
    for target, value in tree_flatten(model.parameters()):
        arr = np.array(value, dtype=np.float32)
        gname = names[target]
        qtype = next((gguf.GGMLQuantizationType[t] for frag, t in (quant or {}).items()
                      if frag in gname and arr.ndim == 2), None)
        stored = arr + 1.0 if spec.norm_shift and target.endswith("norm.weight") else arr
        heads = None
        if spec.rope_traditional and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads"] if "attn_q" in gname else \
                config["num_key_value_heads"]
            stored = _permute(stored, heads)
        if qtype is not None:
            packed = gguf.quants.quantize(stored, qtype)
            w.add_tensor(gname, packed, raw_dtype=qtype)
            arr = gguf.quants.dequantize(packed, qtype).reshape(arr.shape)
            arr = _unpermute(arr, heads) if heads else arr
        else:
            w.add_tensor(gname, np.ascontiguousarray(stored, dtype=np.float32))
        reference[target] = arr
    for gname, arr in (extra_tensors or {}).items():
        w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def reference_model(model_type: str, config: dict, weights: dict):
    import mlx.core as mx

    model = random_model(model_type, config, seed=99)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
    return model


def _gguf_names(n_layers: int, spec) -> list[str]:
    out = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(n_layers):
        for part in spec.layer_map:
            out += [f"blk.{i}.{part}.weight", f"blk.{i}.{part}.bias"]
    return out


def _write_hparams(w, arch: str, c: dict, extra: dict) -> None:
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c.get("max_position_embeddings", 2048))
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c.get("rope_theta", 10000.0))
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "gemma3" and c.get("sliding_window"):
        w.add_sliding_window(c["sliding_window"])
    for key, value in extra.items():
        w.add_key_value(key, value[0], value[1])


def _write_tokenizer(w, t: dict) -> None:
    w.add_tokenizer_model(t["tokenizer.ggml.model"])
    w.add_tokenizer_pre(t.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(list(t["tokenizer.ggml.tokens"]))
    w.add_token_types([int(x) for x in t["tokenizer.ggml.token_type"]])
    if "tokenizer.ggml.scores" in t:
        w.add_token_scores([float(x) for x in t["tokenizer.ggml.scores"]])
    if "tokenizer.ggml.merges" in t:
        w.add_token_merges(list(t["tokenizer.ggml.merges"]))
    for key in ("bos", "eos", "unknown", "padding"):
        if f"tokenizer.ggml.{key}_token_id" in t:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", int(t[f"tokenizer.ggml.{key}_token_id"]))
    for key in ("add_bos_token", "add_space_prefix"):
        if f"tokenizer.ggml.{key}" in t:
            w.add_bool(f"tokenizer.ggml.{key}", bool(t[f"tokenizer.ggml.{key}"]))
    if t.get("tokenizer.chat_template"):
        w.add_string("tokenizer.chat_template", t["tokenizer.chat_template"])
