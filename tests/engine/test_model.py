"""The embedded GGUF is loaded correctly: llama.cpp's greedy tokens, identity, clear errors."""

import struct
import subprocess
import sys

import pytest

from permeant_tui.engine.errors import ModelLoadError
from permeant_tui.engine.models import default_model_path, load_model


def _greedy(model, ids, n):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out = []
    for tok, _ in generate_step(mx.array(ids), model, max_tokens=n):
        out.append(tok)
    return out


def matching_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_greedy_agrees_with_llamacpp(real_model, greedy_cases):
    """llama.cpp multiplies Q4_1 weights with 8-bit activations, so exact whole-sequence
    agreement is not expected; a correctly mapped model matches a long prefix on most
    prompts, a wrongly mapped one (no rope_traditional, swapped names) matches ~0."""
    prefixes = [matching_prefix(_greedy(real_model.model, c["prompt_ids"], 16), c["greedy16"])
                for c in greedy_cases]
    mean = sum(prefixes) / len(prefixes)
    assert mean >= 8, prefixes
    assert sum(p >= 3 for p in prefixes) >= len(prefixes) - 1, prefixes


def test_wrong_rope_layout_is_caught_by_the_same_measure(real_model, greedy_cases):
    """Negative control for the test above: flip the RoPE layout and agreement collapses."""
    for layer in real_model.model.model.layers:
        layer.self_attn.rope.traditional = False
    try:
        prefixes = [matching_prefix(_greedy(real_model.model, c["prompt_ids"], 8), c["greedy16"])
                    for c in greedy_cases[:4]]
    finally:
        for layer in real_model.model.model.layers:
            layer.self_attn.rope.traditional = True
    assert sum(prefixes) / len(prefixes) < 2, prefixes


def test_identity_describes_the_model(real_model):
    ident = real_model.identity
    assert (ident.architecture, ident.n_layers, ident.n_heads, ident.n_kv_heads,
            ident.head_dim) == ("llama", 30, 9, 3, 64)
    assert ident.rope_layout == "interleaved" and ident.rope_theta == 100000.0
    assert ident.kv_dtype == "float32" and real_model.weights_mode == "float32"
    assert len(ident.weights_digest) == 32 and len(ident.fingerprint) == 32


def test_identity_fingerprint_changes_with_any_structural_field(real_model):
    from dataclasses import replace

    ident = real_model.identity
    assert replace(ident, name="renamed").fingerprint == ident.fingerprint
    for field, value in [("weights_digest", "0" * 32), ("n_kv_heads", 4), ("rope_layout",
                         "half-split"), ("kv_dtype", "float16"), ("tokenizer_digest", "x")]:
        other = replace(ident, **{field: value})
        assert other.fingerprint != ident.fingerprint
        assert ident.differences(other) == [field]


def test_default_model_is_found_through_package_resources():
    p = default_model_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 50_000_000


def test_missing_model_path_gives_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))


def test_non_gguf_file_gives_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(bad))


def _write_gguf(path, arch: str):
    """A minimal valid GGUF (v3) with only general.architecture and one tiny f32 tensor."""
    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    kv = s("general.architecture") + struct.pack("<I", 8) + s(arch)
    tensor = s("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 2) + \
        struct.pack("<I", 0) + struct.pack("<Q", 0)
    head = b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 1, 1) + kv + tensor
    head += b"\0" * ((32 - len(head) % 32) % 32)
    path.write_bytes(head + b"\0" * 32)


def test_non_llama_gguf_gives_clear_error(tmp_path):
    p = tmp_path / "bert.gguf"
    _write_gguf(p, "bert")
    with pytest.raises(ModelLoadError, match="architecture 'bert' is not supported"):
        load_model(str(p))


def test_cli_bad_model_exits_nonzero_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "permeant_tui.cli", "chat", "technical", "hi",
                        "--workspace", str(tmp_path), "--model", str(tmp_path / "missing.gguf")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "model not found" in r.stderr


def test_mlx_model_directory_loads_and_generates(tmp_path, real_model):
    """`--model DIR`: an MLX/HF-layout directory (config.json, safetensors, tokenizer.json),
    loaded through mlx_lm.load. A tiny random llama written here stands in for a real one."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from permeant_tui.engine.models import random_llama

    tiny = random_llama(real_model.tokenizer, seed=3)
    d = tmp_path / "tiny-mlx"
    d.mkdir()
    mx.save_safetensors(str(d / "model.safetensors"), dict(tree_flatten(tiny.model.parameters())))
    config = {k: v for k, v in vars(tiny.model.args).items() if not k.startswith("_")}
    config["rope_traditional"] = False
    (d / "config.json").write_text(json.dumps(config))
    inner = real_model.tokenizer._tokenizer
    inner._tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": inner.chat_template, "eos_token": "<|im_end|>",
        "bos_token": "<|im_start|>", "tokenizer_class": "PreTrainedTokenizerFast"}))

    lm = load_model(str(d))
    ident = lm.identity
    assert (ident.n_layers, ident.n_kv_heads, ident.head_dim) == (2, 2, 16)
    assert ident.rope_layout == "half-split" and lm.weights_mode == "float32"
    assert ident.fingerprint != tiny.identity.fingerprint  # another weights digest and layout
    assert len(_greedy(lm.model, [1, 9690, 198, 2683], 4)) == 4
