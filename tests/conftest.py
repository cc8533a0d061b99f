"""Shared fixtures: the real default model (loaded once per session), a tiny random-weight
llama with the real tokenizer (fast unit tests), and isolated data dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from permeant_tui.engine import runtime

runtime.prepare()  # OpenBLAS before the first mlx import, as the CLI does

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
if not FIXTURES.exists():  # CI clones main with shared/ beside it; a dev checkout may differ
    FIXTURES = Path("/work/shared/fixtures")


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PERMEANT_HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.setenv("PERMEANT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    assert FIXTURES.exists(), f"shared fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session")
def tokenizer_cases(fixtures_dir):
    return json.loads((fixtures_dir / "smollm2_tokenizer_cases.json").read_text())["cases"]


@pytest.fixture(scope="session")
def greedy_cases(fixtures_dir):
    return json.loads((fixtures_dir / "smollm2_greedy_llamacpp.json").read_text())["cases"]


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M-Instruct, loaded once (about 3 s)."""
    from permeant_tui.engine.models import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def tiny_model(real_model):
    """A 2-layer random-weight llama sharing the real tokenizer: fast, deterministic."""
    return make_tiny_model(real_model.tokenizer)


def make_tiny_model(tokenizer, seed: int = 0, layers: int = 2):
    import mlx.core as mx
    from mlx_lm.models import llama

    from permeant_tui.engine.models import LoadedModel, _identity, _kv_dtype

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
    identity = _identity(f"tiny-random-{seed}", "llama", args, f"random-seed-{seed}-{layers}",
                         tokenizer, _kv_dtype(model), 2048)
    return LoadedModel(model, tokenizer, identity, "<tiny>", "float32", 2048, {})
