"""The probe length as the user sets it through the real CLI (docs/USXF.md 7): `export --probe
N` records N tokens (128 by default), `usxf verify --fidelity --probe N` replays the first N, a
length that is not a positive number is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from permeant_tui.engine.usxf import PROBE_N

pytestmark = pytest.mark.real_model

TIMEOUT = 300


def run(args, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PERMEANT_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "permeant_tui.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("probe") / "ws"
    r = run(["chat", "technical", "Name one HTTP status code.", "--max-tokens", "6"], home)
    assert r.returncode == 0, r.stderr
    return home


def test_export_and_verify_honour_the_probe_length(home, tmp_path):
    short = tmp_path / "short.usxf"
    r = run(["export", "technical", "-o", short, "--probe", "12"], home)
    assert r.returncode == 0, r.stderr
    assert "probe of 12 tokens" in run(["usxf", "inspect", short], home).stdout
    r = run(["usxf", "verify", short, "--fidelity"], home)
    assert r.returncode == 0, r.stderr
    assert "fidelity: exact 12/12" in r.stdout
    r = run(["usxf", "verify", short, "--fidelity", "--probe", "5"], home)
    assert "fidelity: exact 5/5" in r.stdout, r.stdout + r.stderr


def test_the_default_probe_length_is_128_tokens():
    """What a plain `export` records (the engine test checks the file: test_fidelity_probe)."""
    from permeant_tui.cli import build_parser

    assert build_parser().parse_args(["export", "technical"]).probe == PROBE_N == 128
    verify = build_parser().parse_args(["usxf", "verify", "f.usxf", "--fidelity"])
    assert verify.probe is None  # replay everything the file recorded


@pytest.mark.parametrize("bad", ["0", "-3", "many"])
def test_a_probe_length_that_is_not_a_positive_number_is_refused(home, tmp_path, bad):
    out = tmp_path / "x.usxf"
    r = run(["export", "technical", "-o", out, "--probe", bad], home)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("permeant: error: ")
    assert f"argument --probe: {bad!r}: a probe length from 1 to 65536 tokens" in lines[0]
    assert not out.exists()
