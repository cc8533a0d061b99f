"""`permeant doctor`: MLX version and device, BLAS (its core type, the sgemv shim), the AMX probe's build decision, the model's
dtype, the attention path and a quick speed figure."""

from __future__ import annotations

import argparse

from .common import add_common, reporter_for


def register(subparsers) -> None:
    p = subparsers.add_parser("doctor",
                              help="MLX version/device, BLAS, model dtype, a quick speed figure")
    add_common(p, workspace=False)
    p.set_defaults(func=doctor)


def doctor(args: argparse.Namespace) -> int:
    import platform

    import mlx.core as mx

    from ..engine import runtime
    from ..engine.models import load_model
    from ..engine.speed import quick_speed

    print(f"python     {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"mlx        {mx.__version__}  device {runtime.device_label()}")
    print(f"blas       {runtime.blas_label()}")
    core, sgemv = runtime.kernel_labels()
    print(f"blas core  {core}")
    print(f"sgemv      {sgemv}")
    from ..engine import mlx_imports

    print(f"imports    transformers, huggingface_hub: {mlx_imports.state()}")
    from ..engine import cpu

    print(f"llama.cpp  {cpu.probe().reason}")
    with reporter_for(args) as reporter:  # a progress line on a terminal, nothing when piped
        reporter.stage("loading model")
        lm = load_model(args.model, progress=lambda stage, f: reporter.stage(
            f"loading model ({stage})", f))
    print(f"model      {lm.identity.name}  ({lm.spec})")
    print(f"weights    {lm.weights_mode} in memory (chosen for {runtime.device_label()}); "
          f"kv dtype {lm.identity.kv_dtype}")
    print(f"identity   {lm.identity.fingerprint}")
    print(f"chat       {lm.chat_format}")
    for note in lm.notes:  # e.g. GGUF types MLX lacks, re-quantized for Metal (lossy)
        print(f"note       {note}")
    print("load ms    " + ", ".join(f"{k} {v:.0f}" for k, v in lm.timings_ms.items()))
    with reporter_for(args) as reporter:
        reporter.stage("measuring prefill and decode speed")
        pf, dec = quick_speed(lm)
    print(f"speed      prefill {pf:.0f} tok/s (256 tokens), decode {dec:.1f} tok/s (32 tokens)")
    from ..engine import cpu_attention

    print(f"attention  {cpu_attention.label()}")
    return 0
