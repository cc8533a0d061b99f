"""Test support that a `permeant serve` or `permeant migrate` process needs: such a process
cannot share the test's model object, so it builds the same one from an environment variable.
Never set in normal use."""

from __future__ import annotations

import os

TINY_MODEL_ENV = "PERMEANT_TEST_TINY_MODEL"


def model_override_for_tests():
    """PERMEANT_TEST_TINY_MODEL=SEED: a 2-layer random llama with the real tokenizer, built as
    tests/conftest.py builds it (same seed, same weights, same identity); None when unset."""
    seed = os.environ.get(TINY_MODEL_ENV)
    if not seed:
        return None
    from ..engine.models import load_model, random_llama

    return random_llama(load_model(None).tokenizer, int(seed), 2)
