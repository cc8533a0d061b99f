"""`permeant agents` (list, add, rename, remove) and `permeant workspaces` (issue 15), through
the real CLI in subprocesses. The roster commands never load the model; a rename keeps the KV
snapshot valid; a removal archives the transcript and asks for --yes first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = 600


def run(args, home: Path, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PERMEANT_HOME=str(home), HF_HUB_OFFLINE="1")
    if cache is not None:
        env["PERMEANT_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "permeant_tui.cli", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=env, stdin=subprocess.DEVNULL)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr
    assert "loading model" not in r.stderr
    return r.stdout


def error(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, (r.returncode, lines)
    assert len(lines) == 1 and lines[0].startswith("permeant: error: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "loading model" not in r.stderr
    return lines[0]


def roster(home: Path) -> dict[str, dict]:
    out = json.loads(ok(run(["agents", "--json"], home)))
    return {a["id"]: a for a in out["agents"]}


def test_add_rename_remove_without_the_model(tmp_path):
    home = tmp_path / "ws"
    assert list(roster(home)) == ["technical", "business", "coordinator"]
    ok(run(["agents", "add", "security", "--role", "security", "--system",
            "You review code for vulnerabilities.", "-v"], home))
    a = roster(home)["security"]
    assert a["role"] == "security" and a["system"] == "You review code for vulnerabilities."
    settings = json.loads((home / "workspace.json").read_text())
    assert "security" in [s["id"] for s in settings["agents"]]

    error(run(["agents", "add", "Security", "--role", "x", "--system", "y"], home), 1, "exists")
    error(run(["agents", "add", "../x", "--role", "x", "--system", "y"], home), 2,
          "invalid agent name")
    error(run(["agents", "add", "ok1", "--role", " ", "--system", "y"], home), 1, "role")
    (home / "agents" / "stray").mkdir(parents=True)  # a folder no agent owns: never adopted
    error(run(["agents", "add", "stray", "--role", "x", "--system", "y"], home), 1,
          "move it away")

    error(run(["agents", "rename", "nobody", "x"], home), 2, "no agent 'nobody'")
    error(run(["agents", "rename", "security", "technical"], home), 1, "exists")
    error(run(["agents", "rename", "security", "a/b"], home), 2, "invalid agent name")
    ok(run(["agents", "rename", "security", "sec"], home))
    assert "sec" in roster(home) and "security" not in roster(home)
    assert roster(home)["sec"]["title"] == "Sec"  # the default title follows the name

    before = sorted(p.name for p in home.rglob("*"))
    error(run(["agents", "remove", "sec"], home), 2, "--yes")  # stdin is not a terminal
    assert sorted(p.name for p in home.rglob("*")) == before
    out = ok(run(["agents", "remove", "sec", "--yes"], home))
    archived = [p for p in (home / "archive").iterdir() if p.name.startswith("sec-")]
    assert len(archived) == 1 and str(archived[0]) in out
    spec = json.loads((archived[0] / "agent.json").read_text())
    assert spec["role"] == "security" and spec["id"] == "sec"
    assert "sec" not in roster(home)
    # a reset conversation lies beside the live one
    (home / "agents" / "business").mkdir(parents=True)
    (home / "agents" / "business" / "transcript.20261130-080000.jsonl").write_text(
        '{"user": "u", "reply": "r", "generated_ids": [1], "ts": 1}\n' * 3)
    arch = json.loads(ok(run(["agents", "--archived", "--json"], home)))["archived"]
    assert [(a["kind"], a["agent"], a["turns"]) for a in arch] == \
        [("removed", "sec", 0), ("reset", "business", 3)]
    assert "removed" in ok(run(["agents", "--archived"], home))

    for name in ("technical", "business"):
        ok(run(["agents", "remove", name, "--yes"], home))
    error(run(["agents", "remove", "coordinator", "--yes"], home), 1, "only agent")
    assert list(roster(home)) == ["coordinator"]


@pytest.mark.real_model
def test_rename_keeps_the_snapshot_and_remove_archives_the_transcript(tmp_path):
    home = tmp_path / "ws"
    r = run(["chat", "technical", "Name one HTTP status code.", "--max-tokens", "6",
             "--temp", "0", "--json"], home)
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)["reply"]
    ok(run(["agents", "rename", "technical", "tech"], home))
    r = run(["chat", "tech", "And another?", "--max-tokens", "4", "--temp", "0", "--json"], home)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["source"] == "snapshot" and res["tokens"]["cached"] > 0, res  # no rebuild
    assert "snapshot not used" not in r.stderr

    ok(run(["agents", "remove", "tech", "--yes"], home))
    (archive,) = [p for p in (home / "archive").iterdir() if p.name.startswith("tech-")]
    turns = [json.loads(ln) for ln in (archive / "transcript.jsonl").read_text().splitlines()]
    assert [t["reply"] for t in turns][0] == first and len(turns) == 2
    assert (archive / "kv.safetensors").exists()
    assert not (home / "agents" / "tech").exists()

    # an added agent takes turns with its own system prompt
    ok(run(["agents", "add", "poet", "--role", "writer", "--system", "You answer in verse."],
           home))
    r = run(["chat", "poet", "Hello.", "--max-tokens", "4", "--temp", "0", "--json"], home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == "new"


def test_workspaces_lists_the_ones_you_opened_with_sizes(tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a", tmp_path / "b"
    ok(run(["status"], a, cache))
    ok(run(["--workspace", str(b), "agents", "add", "extra", "--role", "r", "--system", "s"],
           a, cache))
    rows = json.loads(ok(run(["workspaces", "--json"], a, cache)))
    assert [r["path"] for r in rows] == [str(a.resolve()), str(b.resolve())]
    assert rows[0]["default"] and not rows[1]["default"]
    assert all(r["exists"] and r["bytes"] > 0 for r in rows)
    assert rows[1]["agents"] == ["technical", "business", "coordinator", "extra"]
    text = ok(run(["workspaces"], a, cache))
    assert str(b.resolve()) in text and "MB" in text

    shutil.rmtree(b)  # gone (an unplugged disk): shown as gone, not dropped
    rows = json.loads(ok(run(["workspaces", "--json"], a, cache)))
    assert rows[1]["path"] == str(b.resolve()) and rows[1]["exists"] is False
    assert "(gone)" in ok(run(["workspaces"], a, cache))


def _on_terminal(args, home: Path, answer: bytes) -> tuple[int, str]:
    """Run with stdin, stdout and stderr on a pty; answer the first [y/N] question."""
    import pty
    import select

    master, slave = pty.openpty()
    env = dict(os.environ, PERMEANT_HOME=str(home), HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-m", "permeant_tui.cli", *args], stdin=slave,
                         stdout=slave, stderr=slave, env=env)
    os.close(slave)
    seen, answered = b"", False
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    break
                if not data:
                    break
                seen += data
                if not answered and b"[y/N]" in seen:
                    os.write(master, answer)
                    answered = True
            elif p.poll() is not None:
                break
        p.wait(timeout=TIMEOUT)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
    assert answered, seen
    return p.returncode, seen.decode(errors="replace")


def test_remove_asks_on_a_terminal(tmp_path):
    home = tmp_path / "ws"
    ok(run(["agents", "add", "sec", "--role", "r", "--system", "s"], home))
    code, screen = _on_terminal(["agents", "remove", "sec"], home, b"n\n")
    assert code == 2 and "not done" in screen, screen
    assert "sec" in roster(home)
    code, screen = _on_terminal(["agents", "remove", "sec"], home, b"y\n")
    assert code == 0 and "archived in" in screen, screen
    assert "sec" not in roster(home)
