"""mlx-lm without transformers until a model needs it (engine/mlx_imports.py): fresh processes,
since the point is what a new process imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, sys
from permeant_tui.engine import runtime, mlx_imports
runtime.prepare()
from mlx_lm.generate import generate_step
from mlx_lm.models import cache, llama
import mlx_lm.tokenizer_utils as tu
out = {"before": "transformers" in sys.modules or "huggingface_hub" in sys.modules,
       "state": mlx_imports.state()}
if sys.argv[1] == "complete":
    from mlx_lm import load, stream_generate
    import transformers
    out.update(after="transformers" in sys.modules,
               auto=tu.AutoTokenizer is transformers.AutoTokenizer,
               base=tu.PreTrainedTokenizerBase.__module__,
               newline=issubclass(tu.NewlineTokenizer, transformers.PreTrainedTokenizerFast),
               load=callable(load) and callable(stream_generate),
               version=bool(sys.modules["mlx_lm"].__version__),
               hub=sys.modules["mlx_lm.utils"].snapshot_download.__module__)
print(json.dumps(out))
"""


def run(mode: str, **env: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                       timeout=600, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="installed on Linux only")
def test_the_runtime_modules_import_without_transformers():
    out = run("runtime")
    assert out == {"before": False, "state": "not imported (deferred until a model needs them)"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="installed on Linux only")
def test_a_model_that_needs_them_gets_the_real_libraries():
    out = run("complete")
    assert out["before"] is False and out["after"] is True
    assert out["auto"] and out["newline"] and out["load"] and out["version"]
    assert out["base"].startswith("transformers.")
    assert out["hub"].startswith("huggingface_hub")


def test_it_can_be_turned_off():
    out = run("runtime", PERMEANT_LAZY_TRANSFORMERS="0")
    assert out["before"] is True and out["state"] == "imported normally"
