"""engine/cpu_attention.py: prefill attention in numpy on the CPU device gives MLX's results.

The function against `mx.fast.scaled_dot_product_attention` (masks as mlx-lm passes them, GQA,
queries at an offset, half precision), the routing (decode steps and quantized caches stay on
MLX), and tiny random-weight models of several architectures with the path on and off: the
same next-token logits after a chunked prefill (gemma3 past its sliding window, so its sliding
layers get array masks) and the same greedy continuation.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models import base
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache
from mlx_lm.utils import _get_classes
from support.tiny_models import config_for

from permeant_tui.engine import cpu_attention

VOCAB = 512


@pytest.fixture(autouse=True)
def _routed():
    """The path installed and on for each test; the previous state put back after it."""
    cpu_attention.install()
    before = cpu_attention.set_enabled(True)
    yield
    cpu_attention.set_enabled(before)


def _qkv(B, H, H_kv, L, S, D=16, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((B, H, L, D)).astype(dtype)
    k = mx.random.normal((B, H_kv, S, D)).astype(dtype)
    v = mx.random.normal((B, H_kv, S, D)).astype(dtype)
    return q, k, v


def _masks(L, S, B):
    offset = S - L
    window = base.create_causal_mask(L, offset, window_size=7)
    left = base.create_causal_mask(L, offset, left_padding=mx.array([0, 3][:B]))
    return {
        "none": None,
        "causal": "causal",
        "bool": base.create_causal_mask(L, offset),
        "window": window,
        "additive": mx.where(window, 0.0, -1e9).astype(mx.float32),
        "batch_left_padding": left,  # (B, 1, L, S), as BatchKVCache makes them
    }


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "window", "additive",
                                       "batch_left_padding"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("L,S", [(5, 5), (9, 40), (16, 16)])
def test_matches_mlx_float32(mask_kind, heads, L, S):
    B = 2
    q, k, v = _qkv(B, heads[0], heads[1], L, S)
    mask = _masks(L, S, B)[mask_kind]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = cpu_attention.attention(q, k, v, 0.25, mask)
    assert got.shape == want.shape and got.dtype == mx.float32
    if mask_kind == "batch_left_padding":
        # the second sequence's first rows attend to nothing (padding): whatever each side
        # gives there is discarded by the model; the real rows must agree
        got, want = got[:, :, 3:], want[:, :, 3:]
    assert mx.abs(got - want).max().item() < 1e-5


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_in_float32_out_in_input_dtype(dtype):
    q, k, v = _qkv(1, 4, 2, 12, 48, dtype=dtype)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    got = cpu_attention.attention(q, k, v, 0.25, "causal")
    assert got.dtype == dtype
    exact = cpu_attention.attention(*(a.astype(mx.float32) for a in (q, k, v)), 0.25, "causal")
    assert mx.abs(got.astype(mx.float32) - exact).max().item() < 2e-2  # one rounding
    assert mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item() < 3e-2


def test_no_nan_where_a_row_attends_to_nothing():
    q, k, v = _qkv(1, 2, 2, 4, 4)
    mask = mx.zeros((4, 4), dtype=mx.bool_)
    assert not mx.isnan(cpu_attention.attention(q, k, v, 0.25, mask)).any().item()


def _counted(fn):
    before = dict(cpu_attention.counts)
    fn()
    return {k: cpu_attention.counts[k] - before[k] for k in before}


def test_decode_step_and_quantized_cache_stay_on_mlx():
    cache = make_prompt_cache(_model("llama")[0])[0]
    q, k, v = _qkv(1, 4, 2, 1, 30)
    assert base.scaled_dot_product_attention is not mx.fast.scaled_dot_product_attention
    assert _counted(lambda: base.scaled_dot_product_attention(
        q, k, v, cache, scale=0.25, mask=None)) == {"numpy": 0, "mlx": 1}
    q, k, v = _qkv(1, 4, 2, 8, 30)
    assert _counted(lambda: base.scaled_dot_product_attention(
        q, k, v, cache, scale=0.25, mask="causal")) == {"numpy": 1, "mlx": 0}
    # a model whose KV cache is quantized (mlx-lm's kv_bits): every call to mlx-lm
    model, _ = _model("llama", head_dim=64)
    qcache = [QuantizedKVCache(group_size=64, bits=8) for _ in model.layers]
    tokens = mx.array([list(range(1, 21))])
    counted = _counted(lambda: mx.eval(model(tokens, cache=qcache)))
    assert counted["numpy"] == 0 and counted["mlx"] == len(model.layers)


def test_switched_off_everything_goes_to_mlx():
    cache = make_prompt_cache(_model("llama")[0])[0]
    q, k, v = _qkv(1, 4, 2, 8, 30)
    cpu_attention.set_enabled(False)
    assert _counted(lambda: base.scaled_dot_product_attention(
        q, k, v, cache, scale=0.25, mask="causal")) == {"numpy": 0, "mlx": 1}


def test_install_patches_the_model_modules_and_uninstall_restores():
    from mlx_lm.models import gemma3_text, llama

    assert cpu_attention.installed()
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    assert gemma3_text.scaled_dot_product_attention is base.scaled_dot_product_attention
    cpu_attention.uninstall()
    try:
        assert not cpu_attention.installed()
        assert llama.scaled_dot_product_attention is cpu_attention._original
    finally:
        cpu_attention.install()


def test_env_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(cpu_attention.ENV, "0")
    cpu_attention.uninstall()
    try:
        assert "PERMEANT_CPU_ATTENTION=0" in cpu_attention.install()
        assert not cpu_attention.installed()
    finally:
        monkeypatch.delenv(cpu_attention.ENV)
        assert cpu_attention.install().startswith("numpy")


_MODELS: dict = {}


def _model(arch: str, **overrides):
    """A tiny random-weight mlx-lm model of `arch` (gemma3: window 16), built once."""
    key = (arch, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        config = config_for(arch, VOCAB)
        if arch == "gemma3_text":
            config["sliding_window"] = 16
        config.update(overrides)
        model_cls, args_cls = _get_classes(config)
        mx.random.seed(3)
        model = model_cls(args_cls.from_dict(config))
        mx.eval(model.parameters())
        cpu_attention.install()  # the architecture's module is imported now
        _MODELS[key] = (model, config)
    return _MODELS[key]


def _prefill_then_greedy(model, prompt, chunk, n):
    """Logits after the prompt (prefilled in chunks, so later chunks attend at an offset) and
    the next `n` greedy ids."""
    cache = make_prompt_cache(model)
    for i in range(0, len(prompt) - 1, chunk):
        mx.eval(model(mx.array([prompt[i:min(i + chunk, len(prompt) - 1)]]), cache=cache))
    logits = model(mx.array([prompt[-1:]]), cache=cache)[0, -1].astype(mx.float32)
    first, ids = logits, []
    for _ in range(n):
        token = int(mx.argmax(logits).item())
        ids.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return first, ids


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_model_prefill_same_logits_and_greedy_ids(arch):
    model, _ = _model(arch)
    mx.random.seed(7)
    prompt = mx.random.randint(1, VOCAB, (80,)).tolist()
    cpu_attention.set_enabled(False)
    want, want_ids = _prefill_then_greedy(model, prompt, 24, 16)
    cpu_attention.set_enabled(True)
    run: dict = {}
    counted = _counted(lambda: run.update(out=_prefill_then_greedy(model, prompt, 24, 16)))
    got, got_ids = run["out"]
    chunks = 4  # 79 tokens in chunks of 24; the last prompt token and decode steps: one query
    assert counted["numpy"] == chunks * len(model.layers)
    assert counted["mlx"] == 17 * len(model.layers)
    scale = max(1.0, mx.abs(want).max().item())
    assert mx.abs(got - want).max().item() < 1e-3 * scale
    assert got_ids == want_ids
