"""GGUF architectures: tiny files written here (tests/support/tiny_gguf.py) load into mlx_lm models that
compute what the same weights compute in a plain mlx_lm model (greedy ids and logits)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from support.tiny_gguf import (
    random_model,
    reference_model,
    smollm2_tokenizer_meta,
    spm_tokenizer_meta,
    write_gguf,
)

from permeant_tui.engine.errors import ModelLoadError
from permeant_tui.engine.gguf import load_gguf_model
from permeant_tui.engine.models import load_model

BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=49152, rope_theta=1e6,
            max_position_embeddings=4096, tie_word_embeddings=True)
QWEN3 = {**BASE, "head_dim": 32}  # qwen3's head dim need not be hidden/heads
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours, then count to 5."}]


@pytest.fixture(scope="module")
def smol_tok():
    meta = smollm2_tokenizer_meta()
    meta["tokenizer.ggml.pre"] = "qwen2"
    return meta


def _greedy(model, ids, n):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [t for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]


def _logits(model, ids):
    import mlx.core as mx

    out = model(mx.array([ids]))
    mx.eval(out)
    return np.array(out[0].astype(mx.float32))


def _write(tmp_path, arch, model_type, config, tok, quant=None, seed=0):
    model = random_model(model_type, config, seed)
    path = tmp_path / f"tiny-{arch}.gguf"
    ref = write_gguf(path, arch, model, config, tok, quant)
    return path, reference_model(model_type, config, ref)


def test_qwen2_gguf_with_k_era_types_loads_and_chats(tmp_path, smol_tok):
    """Q5_0 is outside MLX's GGUF reader: the whole file goes through gguf-py."""
    path, ref = _write(tmp_path, "qwen2", "qwen2", BASE, smol_tok,
                       quant={"ffn": "Q5_0", "attn_q": "Q8_0", "attn_v": "Q4_1"})
    lm = load_model(str(path))
    assert lm.identity.architecture == "qwen2" and lm.identity.rope_layout == "half-split"
    assert lm.chat_format == "gguf template" and not lm.is_base_model
    ids = lm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert _greedy(lm.model, ids, 12) == _greedy(ref, ids, 12)
    np.testing.assert_allclose(_logits(lm.model, ids), _logits(ref, ids), atol=1e-4)


def test_qwen3_gguf_qk_norms_and_head_dim(tmp_path, smol_tok):
    path, ref = _write(tmp_path, "qwen3", "qwen3", QWEN3, smol_tok, quant={"ffn_up": "Q8_0"})
    g = load_gguf_model(path)
    assert g.args["head_dim"] == 32 and g.weights_source == "gguf (mx.load)"
    ids = [1, 9690, 198, 2683, 314, 260, 1345]
    np.testing.assert_allclose(_logits(g.model, ids), _logits(ref, ids), atol=1e-4)


def test_llama_gguf_permuted_qk_runs_interleaved_rope(tmp_path, smol_tok):
    """llama.cpp permutes llama's Q/K rows; loaded with rope_traditional=True the model equals
    the unpermuted half-split one (the KV layout differs: identity says interleaved)."""
    tok = {**smol_tok, "tokenizer.ggml.pre": "smollm"}
    config = {**BASE, "rope_theta": 10000.0}
    model = random_model("llama", config)
    path = tmp_path / "tiny-llama.gguf"
    ref = reference_model("llama", config, write_gguf(path, "llama", model, config, tok,
                                                      quant={"attn_k": "Q8_0"}))
    lm = load_model(str(path))
    assert lm.identity.rope_layout == "interleaved"
    ids = [1, 9690, 198, 2683, 314, 260, 1345, 28, 11, 6]
    np.testing.assert_allclose(_logits(lm.model, ids), _logits(ref, ids), atol=1e-4)


def _llama3_rope_factors(config: dict) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for a Llama 3.1 rope_scaling."""
    import math

    rs, dim = config["rope_scaling"], config["hidden_size"] // config["num_attention_heads"]
    old = rs["original_max_position_embeddings"]
    low, high = old / rs["low_freq_factor"], old / rs["high_freq_factor"]
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * config["rope_theta"] ** (i / dim)
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(rs["factor"])
        else:
            smooth = (old / wavelen - rs["low_freq_factor"]) / (rs["high_freq_factor"]
                                                                 - rs["low_freq_factor"])
            out.append(1 / ((1 - smooth) / rs["factor"] + smooth))
    return np.array(out, np.float32)


def test_llama31_rope_freqs_tensor_scales_rope(tmp_path, smol_tok):
    """Llama 3.1+ GGUFs carry RoPE frequency divisors as a tensor, not as metadata."""
    from mlx.utils import tree_flatten

    tok = {**smol_tok, "tokenizer.ggml.pre": "llama-bpe"}
    config = {**BASE, "rope_theta": 10000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}
    model = random_model("llama", config)
    path = tmp_path / "tiny-llama31.gguf"
    ref = reference_model("llama", config, write_gguf(
        path, "llama", model, config, tok,
        extra_tensors={"rope_freqs.weight": _llama3_rope_factors(config)}))
    weights = {k: np.array(v) for k, v in tree_flatten(ref.parameters())}
    plain = reference_model("llama", {**config, "rope_scaling": None}, weights)
    g = load_gguf_model(path)
    ids = list(range(100, 140))
    np.testing.assert_allclose(_logits(g.model, ids), _logits(ref, ids), atol=1e-4)
    assert np.abs(_logits(plain, ids) - _logits(ref, ids)).max() > 1e-3  # the factors matter
    assert g.args["rope_scaling"]["rope_type"] == "gguf-rope-freqs"


def test_gemma3_gguf_norms_window_pattern_and_local_rope(tmp_path):
    """Gemma 3: norms stored as 1 + w, sliding pattern 6 and local RoPE base 10,000 supplied as
    llama.cpp does, window from the metadata; a prompt longer than the window."""
    tok = spm_tokenizer_meta()
    config = dict(hidden_size=64, num_hidden_layers=7, intermediate_size=128,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
                  vocab_size=len(tok["tokenizer.ggml.tokens"]), rope_theta=1e6,
                  rope_local_base_freq=10000.0, query_pre_attn_scalar=32, sliding_window=8,
                  sliding_window_pattern=6, max_position_embeddings=4096)
    path, ref = _write(tmp_path, "gemma3", "gemma3_text", config, tok,
                       quant={"ffn_down": "Q5_1"})
    lm = load_model(str(path))
    args = lm.model.args
    assert (args.sliding_window, args.sliding_window_pattern, args.rope_local_base_freq,
            args.query_pre_attn_scalar) == (8, 6, 10000.0, 32)
    assert lm.is_base_model and lm.chat_format == "gemma turns (base model)"
    ids = lm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert len(ids) > 2 * config["sliding_window"]
    assert 5 in lm.tokenizer.eos_token_ids  # <end_of_turn>, written by the turn format
    np.testing.assert_allclose(_logits(lm.model, ids), _logits(ref, ids), atol=1e-4)
    assert _greedy(lm.model, ids, 10) == _greedy(ref, ids, 10)


def test_gemma3_gguf_without_window_is_all_global(tmp_path):
    """No sliding_window in the file: llama.cpp runs every layer with full attention."""
    from mlx_lm.models.cache import KVCache

    tok = spm_tokenizer_meta()
    config = dict(hidden_size=64, num_hidden_layers=3, intermediate_size=128,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
                  vocab_size=len(tok["tokenizer.ggml.tokens"]), rope_theta=1e6,
                  query_pre_attn_scalar=32, sliding_window=0, sliding_window_pattern=1)
    path, ref = _write(tmp_path, "gemma3", "gemma3_text", config, tok)
    lm = load_model(str(path))
    assert lm.identity.sliding_window == 0
    assert all(type(c) is KVCache for c in lm.model.make_cache())
    ids = list(range(300, 330))
    np.testing.assert_allclose(_logits(lm.model, ids), _logits(ref, ids), atol=1e-4)


def test_quantized_mode_requantizes_types_mlx_lacks(tmp_path, smol_tok):
    """The Metal path (PERMEANT_WEIGHTS=quantized), run on the CPU: Q5_0 becomes MLX affine
    8-bit, and the notes say so."""
    path, ref = _write(tmp_path, "qwen2", "qwen2", BASE, smol_tok, quant={"ffn": "Q5_0",
                                                                          "attn_q": "Q4_0"})
    g = load_gguf_model(path, "quantized")
    assert any("Q5_0 -> affine 8-bit" in n and "Q4_0 -> affine 4-bit" in n for n in g.notes)
    ids = [1, 9690, 198, 2683, 314, 260]
    a, b = _logits(g.model, ids).ravel(), _logits(ref, ids).ravel()
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


def test_weights_cache_round_trip(tmp_path, smol_tok, monkeypatch):
    monkeypatch.setenv("PERMEANT_MODEL_CACHE", str(tmp_path / "models"))
    untied = {**BASE, "tie_word_embeddings": False}  # the build changes args; the key must not
    path, _ = _write(tmp_path, "qwen2", "qwen2", untied, smol_tok, quant={"ffn": "Q5_0"})
    first = load_gguf_model(path, digest="tiny-digest", cache_weights=True)
    second = load_gguf_model(path, digest="tiny-digest", cache_weights=True)
    assert first.weights_source == "gguf (gguf-py)" and second.weights_source == "cache"
    assert "weights_cache_write" in first.timings_ms
    ids = [1, 9690, 198, 2683]
    assert np.array_equal(_logits(first.model, ids), _logits(second.model, ids))


def test_truncated_gguf_gives_clear_error(tmp_path, smol_tok):
    path, _ = _write(tmp_path, "qwen2", "qwen2", BASE, smol_tok)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    with pytest.raises(ModelLoadError, match="past the end of the file"):
        load_model(str(path))


def test_unknown_pre_tokenizer_gives_clear_error(tmp_path, smol_tok):
    path, _ = _write(tmp_path, "qwen2", "qwen2", BASE,
                     {**smol_tok, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(ModelLoadError, match="pre-tokenizer 'no-such-pre' is not supported"):
        load_model(str(path))


def test_cli_chats_with_a_qwen2_gguf(tmp_path, smol_tok):
    path, _ = _write(tmp_path, "qwen2", "qwen2", BASE, smol_tok, quant={"ffn": "Q5_0"})
    r = subprocess.run([sys.executable, "-m", "permeant_tui.cli", "chat", "technical", "Hello",
                        "--workspace", str(tmp_path / "ws"), "--model", str(path),
                        "--max-tokens", "5", "--json"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out  # a reply record (its shape belongs to the CLI)
