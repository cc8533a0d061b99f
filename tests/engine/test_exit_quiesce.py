"""A process must not exit while MLX still computes (runtime.quiesce).

mlx_lm's generate_step evaluates one step ahead, so after a reply's last token a forward pass
is still queued on its stream. When the CLI returned meanwhile, the exit handlers unloaded
OpenBLAS under that stream's thread: SIGSEGV in cblas_sgemv, or a deadlock in OpenBLAS's
thread shutdown (a CI run hung an hour on `usxf verify --fidelity`). Here the same state is
made on purpose, with 400 matrix-vector products left queued on mlx_lm's stream, and then the
CLI's `main` returns, or a script exits; each run must exit 0 promptly.

The race shows under load. Without the fix (2026-12-01, AMD EPYC, 2 cores): 6 of 12 such runs
hung beside a stress loop of `usxf verify --fidelity`, 3 of 4 during a CI run, 1 of 8 beside
two busy processes, 0 of 8 on a quiet machine. So this test catches a regression often, not
always; with the fix no run has hung or crashed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    from permeant_tui.engine import runtime
    runtime.prepare()
    import mlx.core as mx
    import mlx_lm.generate as gen
    from permeant_tui.cli import main
    a = mx.random.normal((4096, 4096))
    v = mx.random.normal((1, 4096))
    mx.eval(a, v)
    with mx.stream(gen.generation_stream):
        for _ in range(400):
            v = (v @ a) / 64
        mx.async_eval(v)  # as generate_step leaves its step ahead
    sys.exit(main(sys.argv[2:]) if sys.argv[1] == "main" else 0)
""")


@pytest.mark.parametrize("run", range(4))
@pytest.mark.parametrize("via", ["main", "exit"])
def test_a_process_exits_cleanly_with_mlx_work_still_queued(tmp_path, via, run):
    """`main`: the CLI returns; `exit`: a script that called only `prepare()` exits. Both rely
    on the atexit hook `prepare()` registers."""
    env = dict(os.environ, PERMEANT_HOME=str(tmp_path / "ws"), PYTHONPATH=str(ROOT))
    try:
        r = subprocess.run([sys.executable, "-c", SCRIPT, via, "workspaces"], capture_output=True,
                           text=True, timeout=90, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung at exit with MLX work queued (OpenBLAS shutdown)")
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
