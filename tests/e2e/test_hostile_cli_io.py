"""Hostile conditions through the real CLI, in subprocesses (issue 14): a second writer on one
workspace, transcript token ids outside the vocabulary, a full then read-only disk, hostile text
and size in `usxf inspect`, a closed stdout pipe. Each: a documented exit code, one line on
stderr, no traceback, nothing hangs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_hostile_cli import TIMEOUT, one_line_error, run, tree

from permeant_tui.engine.errors import WorkspaceBusy

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def chatted(tmp_path_factory):
    """A workspace whose technical agent has one turn, and a file of it from an unknown key."""
    base = tmp_path_factory.mktemp("hostile_io")
    home = base / "ws"
    r = run(["chat", "technical", "Name one HTTP status code.", "--max-tokens", "6"], home)
    assert r.returncode == 0, r.stderr
    usxf = base / "technical.usxf"
    r = run(["export", "technical", "-o", str(usxf)], home)
    assert r.returncode == 0, r.stderr
    return home, usxf


HOLD = ("import sys, time; from permeant_tui.engine.worker import Engine; "
        "e = Engine(sys.argv[1], purpose='holder test'); print('held', flush=True); "
        "time.sleep(300)")


def test_a_second_writer_is_refused_and_status_still_works(chatted, tmp_path):
    home, usxf = chatted
    ws = tmp_path / "ws"
    shutil.copytree(home, ws)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(ws)], stdout=subprocess.PIPE, text=True,
                         env=env)
    try:
        assert p.stdout.readline().strip() == "held"
        before = tree(ws)
        for args in (["chat", "technical", "Hi?", "--max-tokens", "3"],
                     ["export", "technical", "-o", str(tmp_path / "x.usxf")],
                     ["import", str(usxf), "--as", "other"]):
            line = one_line_error(run(args, ws), WorkspaceBusy.exit_code)
            assert f"pid {p.pid}" in line and "holder test" in line, line
        assert tree(ws) == before and not (tmp_path / "x.usxf").exists()
        r = run(["status", "--json"], ws)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["agents"][0]["turns"] == 1
    finally:
        p.kill()
        p.wait()
    r = run(["chat", "technical", "Hi?", "--max-tokens", "3"], ws)  # the lock died with it
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("bad", ["[99999999]", f"[{2**40}]", "[1e20]", "[-1]"])
def test_transcript_ids_outside_the_vocabulary(chatted, tmp_path, bad):
    home, _ = chatted
    ws = tmp_path / "ws"
    shutil.copytree(home, ws)
    agent = ws / "agents" / "technical"
    line = json.loads((agent / "transcript.jsonl").read_text())
    text = json.dumps(line).replace(json.dumps(line["generated_ids"]), bad)
    (agent / "transcript.jsonl").write_text(text + "\n")
    (agent / "kv.safetensors").unlink()
    line = one_line_error(run(["chat", "technical", "Again?", "--max-tokens", "3"], ws), 5)
    assert "agent 'technical' turn 1" in line, line


def _mount(where: Path, size: str) -> bool:
    where.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True)
    return r.returncode == 0


def test_full_then_read_only_disk(chatted, tmp_path):
    _, usxf = chatted
    mnt = tmp_path / "small"
    if not _mount(mnt, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        ws = mnt / "ws"
        r = run(["chat", "technical", "Name one HTTP status code.", "--max-tokens", "6"], ws)
        assert r.returncode == 0, r.stderr  # the turn is recorded: success, with a warning
        assert r.stdout.strip()  # the reply is printed
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(err) == 1 and "snapshot could not be written" in err[0], err
        assert "Traceback" not in r.stderr
        transcript = ws / "agents" / "technical" / "transcript.jsonl"
        assert len(transcript.read_text().splitlines()) == 1
        assert not (ws / "agents" / "technical" / "kv.safetensors").exists()
        assert not [p for p in (ws / "agents" / "technical").iterdir() if p.name.startswith(".")]

        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        before = tree(ws)
        for args in (["chat", "technical", "Again?", "--max-tokens", "3"],
                     ["export", "technical", "--no-fidelity"],
                     ["import", str(usxf), "--as", "other"]):
            one_line_error(run(args, ws))
        assert tree(ws) == before
        r = run(["status"], ws)
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


HOSTILE = "x\x1b]0;pwned\x07\x1b[2J\rok: forged\nline\u202e"


def _hostile_file(src: Path, dst: Path, keys_dir: Path, system: str = HOSTILE) -> None:
    from permeant_tui.engine.usxf import AgentRecord, Fidelity, read_usxf, write_usxf
    from permeant_tui.engine.usxf.keys import WorkspaceKeys

    f = read_usxf(src, trusted=None)
    a = f.agent
    agent = AgentRecord(a.agent_id, HOSTILE, HOSTILE, system, a.turns)
    write_usxf(dst, identity=f.identity, token_ids=f.token_ids, kv=f.load_kv(), agent=agent,
               keys=WorkspaceKeys(keys_dir).ensure(), fidelity=Fidelity([1], [2], 1, 5, HOSTILE))


def test_inspect_of_an_unknown_signer_escapes_its_text(chatted, tmp_path):
    home, usxf = chatted
    hostile = tmp_path / "hostile.usxf"
    _hostile_file(usxf, hostile, tmp_path / "stranger")
    r = run(["usxf", "inspect", str(hostile)], home)
    assert r.returncode == 0, r.stderr
    for ch in "\x1b\x07\r\u202e":
        assert ch not in r.stdout
    assert not any(ln.startswith("ok:") for ln in r.stdout.splitlines())
    assert "\\x1b]0;pwned" in r.stdout
    r = run(["usxf", "inspect", str(hostile), "--json"], home)
    assert r.returncode == 0 and "\x1b" not in r.stdout


def test_inspect_piped_into_head_exits_quietly(chatted, tmp_path):
    home, usxf = chatted
    big = tmp_path / "big.usxf"  # its JSON is larger than a pipe's buffer: the write must fail
    _hostile_file(usxf, big, tmp_path / "stranger", system="s" * 300_000)
    env = dict(os.environ, PERMEANT_HOME=str(home), HF_HUB_OFFLINE="1")
    cmd = f"{sys.executable} -m permeant_tui.cli usxf inspect {big} --json | head -c 1"
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True,
                       text=True, timeout=TIMEOUT, env=env)
    assert r.stdout == "{"
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert r.stderr.strip() == ""
    assert r.returncode in (0, 141), r.returncode


LIMITED = ("import sys; import permeant_tui.cli.exchange as x; x.INSPECT_LIMIT = 1024; "
           "from permeant_tui.cli import main; sys.exit(main(sys.argv[1:]))")


def test_inspect_bounds_a_large_manifest_from_an_untrusted_signer(chatted, tmp_path):
    home, usxf = chatted
    env = dict(os.environ, PERMEANT_HOME=str(home), HF_HUB_OFFLINE="1")

    def inspect(*extra):
        return subprocess.run([sys.executable, "-c", LIMITED, "usxf", "inspect", *extra],
                              capture_output=True, text=True, timeout=TIMEOUT, env=env)

    stranger = tmp_path / "stranger.usxf"
    _hostile_file(usxf, stranger, tmp_path / "stranger")
    line = one_line_error(inspect(str(stranger)), 5)
    assert "does not trust" in line and "--full" in line, line
    assert inspect(str(stranger), "--full").returncode == 0
    assert inspect(str(usxf)).returncode == 0  # signed by this workspace's own key
