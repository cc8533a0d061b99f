"""`status` shows imported (and migrated) agents with their tokens, size and time, not
"0 tokens, 0.0 MB, 1970-01-01"; `usxf verify FILE` without --workspace trusts a file signed by
one of your own workspaces, or names the flag to add (issue 15). No model needed: the files
are synthetic USXF files signed by the workspaces' keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from support.usxf_files import N
from support.usxf_files import export as write_synthetic

from permeant_tui.engine.usxf import WorkspaceKeys

TIMEOUT = 120


def run(args, home: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PERMEANT_HOME=str(home), PERMEANT_CACHE=str(cache),
               HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "permeant_tui.cli", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=env, stdin=subprocess.DEVNULL)


def test_status_of_an_imported_agent_not_yet_attached(tmp_path):
    home, cache = tmp_path / "ws", tmp_path / "cache"
    assert run(["status"], home, cache).returncode == 0  # creates the workspace
    d = home / "agents" / "technical"
    d.mkdir(parents=True)
    f = write_synthetic(tmp_path, WorkspaceKeys(home / "keys").ensure()).path
    shutil.copy(f, d / "import.usxf")
    when = time.time() - 3600
    os.utime(d / "import.usxf", (when, when))
    # as an import writes it: the file's turns, without times
    (d / "transcript.jsonl").write_text("".join(json.dumps(
        {"user": u, "reply": "r", "generated_ids": [1, 2], "ts": 0.0}) + "\n" for u in "ab"))
    r = run(["status", "--json"], home, cache)
    assert r.returncode == 0, r.stderr
    a = next(a for a in json.loads(r.stdout)["agents"] if a["id"] == "technical")
    assert a["tokens"] == N and a["bytes"] == (d / "import.usxf").stat().st_size
    assert a["state"] == "imported" and a["turns"] == 2
    assert a["last_used"] == time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when))
    text = run(["status"], home, cache).stdout
    line = next(ln for ln in text.splitlines() if ln.startswith("technical"))
    assert f" {N} " in line and "imported" in line and "1970" not in line, line

    # a transcript of timeless turns with no state file (a migration whose snapshot is not
    # written yet): the transcript's time, never 1970
    (d / "import.usxf").unlink()
    r = run(["status", "--json"], home, cache)
    a = next(a for a in json.loads(r.stdout)["agents"] if a["id"] == "technical")
    assert a["state"] == "transcript" and not a["last_used"].startswith("1970"), a


def test_verify_without_workspace_finds_your_own(tmp_path):
    cache = tmp_path / "cache"
    default, mine, stranger_ws = tmp_path / "default", tmp_path / "mine", tmp_path / "found"
    for ws in (default, mine, stranger_ws):
        (ws / "exports").mkdir(parents=True)
    # the default workspace's own export: trusted as it always was
    f0 = write_synthetic(default / "exports", WorkspaceKeys(default / "keys").ensure()).path
    r = run(["usxf", "verify", str(f0)], default, cache)
    assert r.returncode == 0 and r.stdout.startswith("ok: "), r.stderr

    # another workspace you opened (it is in `permeant workspaces`): found and trusted
    assert run(["--workspace", str(mine), "status"], default, cache).returncode == 0
    f1 = write_synthetic(mine / "exports", WorkspaceKeys(mine / "keys").ensure()).path
    r = run(["usxf", "verify", str(f1)], default, cache)
    assert r.returncode == 0, r.stderr
    assert f"the own key of your workspace {mine}" in r.stdout, r.stdout
    # an explicit --workspace is taken at its word: untrusted there
    r = run(["usxf", "verify", str(f1), "--workspace", str(default)], default, cache)
    assert r.returncode == 6, r.stdout

    # a workspace folder you never opened, beside the file: named, not trusted
    (stranger_ws / "workspace.json").write_text("{}")
    f2 = write_synthetic(stranger_ws / "exports",
                         WorkspaceKeys(stranger_ws / "keys").ensure()).path
    r = run(["usxf", "verify", str(f2)], default, cache)
    assert r.returncode == 6 and r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"add --workspace {stranger_ws}" in lines[0], lines
