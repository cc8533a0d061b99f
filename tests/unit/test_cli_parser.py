"""The CLI's parser (no model, no subprocess): options before or after the subcommand, the
quantization choices it spells itself, and that building it imports no heavy module."""

from __future__ import annotations

import subprocess
import sys

from permeant_tui.cli import build_parser
from permeant_tui.cli.common import PROBE_N, QUANTS


def test_quant_choices_and_probe_length_match_the_format():
    from permeant_tui.engine.usxf import PROBE_N as FORMAT_PROBE_N
    from permeant_tui.engine.usxf import QUANTS as FORMAT_QUANTS

    assert tuple(QUANTS) == tuple(FORMAT_QUANTS)
    assert PROBE_N == FORMAT_PROBE_N


def test_workspace_and_verbose_before_or_after_the_subcommand():
    p = build_parser()
    a = p.parse_args(["--workspace", "/w", "-v", "status"])
    assert a.workspace == "/w" and a.verbose is True
    a = p.parse_args(["status", "--workspace", "/w"])
    assert a.workspace == "/w" and a.verbose is False
    a = p.parse_args(["chat", "technical", "hi"])
    assert a.workspace is None and a.model is None and a.temp is None and a.top_p is None
    a = p.parse_args(["--model", "m.gguf", "export", "technical", "--quant", "int8"])
    assert a.model == "m.gguf" and a.quant == "int8"
    a = p.parse_args(["agents", "--workspace", "/w"])
    assert a.workspace == "/w" and a.agents_cmd is None


def test_building_the_parser_imports_neither_mlx_nor_the_usxf_format():
    code = ("import sys; from permeant_tui.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('mlx', 'mlx_lm', 'numpy', 'permeant_tui.engine.usxf', "
            "'rich', 'textual') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
