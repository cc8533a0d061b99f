"""The sgemv shim (engine/blas.py) on the real model: built from source into a fresh folder,
loaded before MLX in a new process, and greedy ids equal with it on and off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from permeant_tui.engine import blas, runtime

CHILD = r"""
import json
from permeant_tui.engine import runtime
runtime.prepare()
core, sgemv = runtime.kernel_labels()
import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream
from permeant_tui.engine.models import load_model
lm = load_model(None)
ids = lm.tokenizer.encode("The payment API returns 502 errors under load; the retry logic")
out = {"sgemv": sgemv, "core": core}
for on in (True, False, True):
    mx.synchronize(generation_stream)
    runtime.set_sgemv(on)
    before = runtime._shim.permeant_sgemv_routed()
    gen = generate_step(mx.array(ids), lm.model, max_tokens=24)
    toks = [int(t) for t, _ in gen]
    mx.synchronize(generation_stream)  # work left on generate_step's own stream
    out["on" if on else "off"] = toks
    out["routed_" + ("on" if on else "off")] = runtime._shim.permeant_sgemv_routed() - before
print(json.dumps(out))
"""


@pytest.fixture
def openblas():
    lib = runtime.find_openblas()
    if sys.platform != "linux" or lib is None:
        pytest.skip("the shim is for MLX on Linux with OpenBLAS")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the shim is skipped by design (doctor says so)")
    return lib


def test_the_shim_builds_and_passes_its_self_test(openblas, tmp_path):
    path, note = blas.build_shim(tmp_path / "shim.so")
    assert path is not None, note
    code = (f"import ctypes, os\nfrom permeant_tui.engine import blas\n"
            f"s = blas.load_shim(blas.Path({str(path)!r}))\n"
            f"lib = ctypes.CDLL({openblas!r}, mode=os.RTLD_LOCAL)\n"
            f"print(blas.attach_shim(s, lib))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "True", r.stderr


def test_greedy_ids_are_identical_with_and_without_sgemv(openblas, tmp_path):
    env = dict(os.environ, PERMEANT_BLAS_DIR=str(tmp_path))
    env.pop("PERMEANT_SGEMV", None)
    path, note = blas.build_shim(tmp_path / blas.shim_path().name)
    assert path is not None, note
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["sgemv"].startswith("on"), out["sgemv"]
    assert out["routed_on"] > 0 and out["routed_off"] == 0  # the switch really switches
    assert len(out["on"]) == 24
    assert out["on"] == out["off"]


def test_sgemv_can_be_turned_off(openblas, tmp_path):
    env = dict(os.environ, PERMEANT_BLAS_DIR=str(tmp_path), PERMEANT_SGEMV="0")
    blas.build_shim(tmp_path / blas.shim_path().name)
    code = ("from permeant_tui.engine import runtime\nruntime.prepare()\n"
            "print(runtime.kernel_labels()[1]); print(runtime._shim is None)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.stdout.split("\n")[:2] == ["off (PERMEANT_SGEMV=0)", "True"], r.stderr
