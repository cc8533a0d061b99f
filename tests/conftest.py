"""Shared fixtures: the real default model (loaded once per session), a tiny random-weight
llama with the real tokenizer (fast unit tests), and isolated data dirs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from permeant_tui.engine import runtime

runtime.prepare()  # OpenBLAS before the first mlx import, as the CLI does

# Large model files (the assembled Gemma GGUF, cached float32 weights) are shared by every test
# run on this machine instead of being rebuilt per test: they are keyed by content digest and
# written atomically (engine/weights_cache.py), so sharing cannot mix models. Subprocesses
# inherit it.
os.environ.setdefault("PERMEANT_MODEL_CACHE", str(
    Path(tempfile.gettempdir()) / f"permeant-test-models-{os.getuid()}"))

# Turns submitted without params sample greedily (the agents' own settings sample): tests
# compare replies token for token. Set here, not in a fixture, so module- and session-scoped
# fixtures and subprocesses see it too; tests/engine/test_agent_settings.py lifts it.
os.environ["PERMEANT_GREEDY"] = "1"

# llama.cpp's outputs for the embedded GGUF, kept in the repository (tests/data/README.md)
FIXTURES = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PERMEANT_HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.setenv("PERMEANT_CACHE", str(tmp_path_factory.mktemp("cache")))
    # The UI's config file (keymap): never the developer's own.
    monkeypatch.setenv("PERMEANT_CONFIG", str(tmp_path_factory.mktemp("config") / "config.toml"))


@pytest.fixture
def token_by_token(monkeypatch):
    """Every streamed token is its own Tokens event. The engine batches tokens by time (~40 ms),
    so on a fast CPU a short reply of a tiny model streams in two events, the second after the
    last token: a test that cancels "after N tokens" needs each token as it comes."""
    from permeant_tui.engine import batch, generation

    monkeypatch.setattr(generation, "BATCH_SECONDS", 0.0)
    monkeypatch.setattr(batch, "BATCH_SECONDS", 0.0)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    assert FIXTURES.is_dir(), f"test data not found at {FIXTURES}"
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


@pytest.fixture(scope="session")
def long_ids(real_model) -> list[int]:
    """Token ids of a conversation long enough for compacted runs of 256 (at least 640)."""
    from support.compaction import long_ids_of

    return long_ids_of(real_model.tokenizer)


def make_tiny_model(tokenizer, seed: int = 0, layers: int = 2):
    from permeant_tui.engine.models import random_llama

    return random_llama(tokenizer, seed, layers)
