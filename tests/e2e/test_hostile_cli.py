"""Hostile input through the real CLI, in subprocesses (issue 14): hostile agent names, corrupt
settings and snapshot metadata, odd output targets. Each case: a documented exit code, one line
on stderr, no traceback, nothing hangs, the workspace intact, nothing written outside it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

TIMEOUT = 240


def run(args, home: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PERMEANT_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "permeant_tui.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def one_line_error(r: subprocess.CompletedProcess, code: int | None = None) -> str:
    err = r.stderr.strip()
    assert "Traceback" not in err and "terminate called" not in err, err[-1500:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("permeant: error: "), lines
    if code is not None:
        assert r.returncode == code, (r.returncode, lines)
    else:
        assert r.returncode not in (0, 1 << 7) and r.returncode > 0, r.returncode
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every regular file under folder (relative path -> sha256), to prove nothing changed."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith(".lock"):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A workspace whose technical agent has one turn, and that agent exported."""
    base = tmp_path_factory.mktemp("hostile")
    home = base / "ws"
    r = run(["chat", "technical", "Name one HTTP status code.", "--max-tokens", "6"], home)
    assert r.returncode == 0, r.stderr
    usxf = base / "technical.usxf"
    r = run(["export", "technical", "-o", str(usxf), "--no-fidelity"], home)
    assert r.returncode == 0, r.stderr
    return home, usxf


HOSTILE_NAMES = ["technical/", "./technical", "technical/.", "../agents/technical",
                 "../../escaped", "/tmp/permeant-abs-escape", "..", ".", "x" * 300,
                 "a\x1b[2Jb", "", " technical", "tech\nnical", "con:name", "-rf"]


def test_hostile_import_names_are_refused_and_change_nothing(exported, tmp_path):
    home, usxf = exported
    before = tree(home)
    outside_before = sorted(p.name for p in home.parent.iterdir())
    for name in HOSTILE_NAMES:
        r = run(["import", str(usxf), "--as", name], home)
        line = one_line_error(r, 2)
        assert "\x1b" not in line, line
        assert tree(home) == before, name
    assert sorted(p.name for p in home.parent.iterdir()) == outside_before
    assert not Path("/tmp/permeant-abs-escape").exists()


def test_import_onto_an_agent_with_turns_is_refused_not_overwritten(exported):
    home, usxf = exported
    before = tree(home)
    r = run(["import", str(usxf), "--as", "technical"], home)
    one_line_error(r)
    assert tree(home) == before


BAD_SETTINGS = {
    "a string": '"hello"',
    "null": "null",
    "a number": "42",
    "a list": "[]",
    "agent id an int": json.dumps({"agents": [{"id": 5, "role": "r", "title": "t",
                                               "system": "s"}]}),
    "agent system null": json.dumps({"agents": [{"id": "a", "role": "r", "title": "t",
                                                 "system": None}]}),
    "hostile agent id": json.dumps({"agents": [{"id": "../../x", "role": "r", "title": "t",
                                                "system": "s"}]}),
    "max_resident a string": json.dumps({"max_resident": "3"}),
    "memory_budget_mb a string": json.dumps({"memory_budget_mb": "lots"}),
    "max_tokens a string": json.dumps({"max_tokens": "256"}),
    "max_tokens negative": json.dumps({"max_tokens": -5}),
    "max_tokens zero": json.dumps({"max_tokens": 0}),
    "not json": "{ nope",
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_corrupt_settings_give_one_line_naming_the_problem(tmp_path, case):
    home = tmp_path / "ws"
    home.mkdir()
    (home / "workspace.json").write_text(BAD_SETTINGS[case])
    before = tree(home)
    for args in (["status"], ["export", "technical"]):
        r = run(args, home)
        line = one_line_error(r, 1)
        assert "workspace.json" in line, line
        assert tree(home) == before, (case, args)


def test_settings_that_are_a_folder(tmp_path):
    home = tmp_path / "ws"
    (home / "workspace.json").mkdir(parents=True)
    one_line_error(run(["status"], home), 1)


def _snapshot_with_metadata(path: Path, metadata) -> None:
    header = json.dumps({"__metadata__": metadata}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)


@pytest.mark.parametrize("meta", [[1, 2], "text", {"format": 5}, None])
def test_snapshot_with_bad_metadata_is_rebuilt_not_fatal(exported, tmp_path, meta):
    home, _ = exported
    ws = tmp_path / "ws"
    import shutil

    shutil.copytree(home, ws)
    _snapshot_with_metadata(ws / "agents" / "technical" / "kv.safetensors", meta)
    r = run(["status", "--json"], ws)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["agents"]
    r = run(["chat", "technical", "And another?", "--max-tokens", "3", "--json"], ws)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == "prefill"


def test_fifo_in_place_of_a_snapshot_does_not_hang(exported, tmp_path):
    home, _ = exported
    ws = tmp_path / "ws"
    import shutil

    shutil.copytree(home, ws)
    snap = ws / "agents" / "technical" / "kv.safetensors"
    snap.unlink()
    os.mkfifo(snap)
    r = run(["status"], ws, timeout=60)
    assert r.returncode == 0, r.stderr
    r = run(["chat", "technical", "Again?", "--max-tokens", "3", "--json"], ws, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == "prefill"


def test_odd_output_targets(exported, tmp_path):
    home, _ = exported
    r = run(["export", "technical", "-o", ""], home)
    one_line_error(r)
    r = run(["export", "technical", "-o", "/dev/full", "--no-fidelity"], home)
    one_line_error(r)
    assert not Path("/dev/full").is_file()  # still the device, not replaced by a file
    r = run(["status", "--workspace", "/etc/hostname/sub"], home)
    one_line_error(r)
