"""A model that fails to load ends the CLI with one clear line and its documented exit code
(ModelLoadError: 3), never a traceback or an abort (issue 10: the engine's worker thread was
never shut down after a load failure, so every such exit was 134 'terminate called ...')."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from permeant_tui.engine.errors import ModelLoadError


def _bad_models(tmp_path) -> dict[str, str]:
    gguf_v3_empty = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)  # valid header, no metadata
    (tmp_path / "empty.gguf").write_bytes(gguf_v3_empty)
    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf file at all" * 10)
    d = tmp_path / "mlxdir"
    d.mkdir()
    (d / "config.json").write_text("{ this is not json")
    e = tmp_path / "emptydir"
    e.mkdir()
    return {
        "missing file": str(tmp_path / "nope.gguf"),
        "gguf without metadata": str(tmp_path / "empty.gguf"),
        "not a gguf": str(tmp_path / "garbage.gguf"),
        "directory with broken config": str(d),
        "directory without a model": str(e),
    }


def _run(args, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PERMEANT_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "permeant_tui.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.parametrize("command", [
    ["chat", "technical", "hi"],
    ["export", "technical"],
    ["tokenize", "hello"],
])
def test_failing_model_load_is_one_line_and_exit_3(tmp_path, command):
    # export refuses an agent with no conversation before the model loads (exit 1): give it
    # one turn, so that the model load is what fails
    d = tmp_path / "home" / "agents" / "technical"
    d.mkdir(parents=True)
    (d / "transcript.jsonl").write_text(json.dumps(
        {"user": "hi", "reply": "hello", "generated_ids": [1, 2], "ts": 1.0}) + "\n")
    for case, model in _bad_models(tmp_path).items():
        r = _run([*command, "--model", model], tmp_path)
        err = r.stderr.strip()
        assert r.returncode == ModelLoadError.exit_code, (case, r.returncode, err[-800:])
        assert "Traceback" not in err and "terminate called" not in err, (case, err[-800:])
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("permeant: error: "), (case, lines)
