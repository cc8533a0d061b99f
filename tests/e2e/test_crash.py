"""Crash safety: a process killed with SIGKILL at any moment (mid-turn, mid-append, mid-save)
leaves a workspace that opens, keeps every finished turn, and restores each agent either from a
valid snapshot or by prefill from the transcript; never from a half-written snapshot."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import make_tiny_model

from permeant_tui.engine.agent import Turn
from permeant_tui.engine.errors import WorkspaceError
from permeant_tui.engine.events import AgentRestored, Notice
from permeant_tui.engine.snapshot import read_snapshot
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace

TESTS = Path(__file__).resolve().parents[1]
AGENTS = ("technical", "business", "coordinator")
LAYERS = 4  # a few more layers than tiny_model: saves take long enough to be hit by a kill

# The child: a tiny model (same identity as make_tiny_model(tok, 0, LAYERS) here), turns on the
# three agents in turn with two agents resident (so evictions save too), and forced re-saves in
# between. It reports each turn once its future resolved: by then the line is fsynced.
# A slow disk is simulated in the safetensors write: SLOW seconds before it (the transcript line
# is durable, the snapshot not yet written), between its two halves (a half-written file), and
# after it (a whole file not yet renamed), so that kills land in each of those windows often.
SLOW = 0.03
CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[2])
from permeant_tui.engine import runtime
runtime.prepare()
import mlx.core as mx
_save = mx.save_safetensors
def slow_save(path, arrays, metadata=None):
    slow = float(sys.argv[5])
    time.sleep(slow)
    _save(path + ".whole.safetensors", arrays, metadata=metadata)
    data = open(path + ".whole.safetensors", "rb").read()
    os.unlink(path + ".whole.safetensors")
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(slow)
        f.write(data[len(data) // 2:])
    time.sleep(slow)
mx.save_safetensors = slow_save
from conftest import make_tiny_model
from permeant_tui.engine.gguf import read_gguf
from permeant_tui.engine.gguf_tokenizer import tokenizer_from_gguf
from permeant_tui.engine.models import default_model_path
from permeant_tui.engine.worker import Engine

path = default_model_path()
_, meta = read_gguf(path)
tiny = make_tiny_model(tokenizer_from_gguf(meta, path), 0, int(sys.argv[3]))
engine = Engine(sys.argv[1], loaded=tiny, eager_restore=False, max_resident=2)
engine.start()
engine.wait_ready(60)
print(json.dumps({"ready": True}), flush=True)
it = int(sys.argv[4])
while True:
    for a in ("technical", "business", "coordinator"):
        msg = f"Round {it}: status of the payment API fix, {a}?"
        r = engine.submit_future(a, msg, max_tokens=6)[1].result()
        print(json.dumps({"agent": a, "user": msg, "ids": list(r.generated_ids)}), flush=True)
    for n in range(3):
        def touch(ctx):
            for x in ctx.workspace.agents.values():
                x.dirty = x.resident
        engine.call(touch).result()
        print(json.dumps({"saving": n}), flush=True)
        engine.save().result()
    it += 1
"""


def run_child_and_kill(folder: Path, rng: random.Random, it: int, when: str) -> list[dict]:
    """Run the child on `folder` and SIGKILL it: `when` is "save" (a few ms after it starts a
    save of every resident agent), "turn" (just after a turn finished: the next one is in
    flight) or "time" (any moment)."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(TESTS), str(LAYERS),
                          str(it), str(SLOW)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    watchdog = threading.Timer(120, p.kill)  # a hung child must not hang the test run
    watchdog.start()
    try:
        ready = p.stdout.readline()
        assert b"ready" in ready, p.stderr.read().decode()[-2000:]
        if when == "time":
            time.sleep(rng.uniform(0.05, 0.8))
        else:
            target, skip = ('"saving"', rng.randint(0, 2)) if when == "save" \
                else ('"agent"', rng.randint(0, 3))
            while True:
                line = p.stdout.readline()
                assert line, p.stderr.read().decode()[-2000:]
                seen.append(line)
                if target.encode() in line:
                    if skip == 0:
                        break
                    skip -= 1
            time.sleep(rng.uniform(0.0, 5 * SLOW))
        os.kill(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=30)
        out = b"".join(seen) + out
    finally:
        watchdog.cancel()
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL, err.decode()[-2000:]
    done = []
    for line in out.splitlines():
        try:
            done.append(json.loads(line))
        except ValueError:
            assert line is out.splitlines()[-1]  # only the very last line can be cut short
    return done


def verify(folder: Path, loaded, reported: dict[str, list[tuple[str, tuple]]]):
    """The checks after a crash. Returns (restore sources, unreported turns). A turn that was
    durable but not reported (killed between the append and the print) counts as done from
    here on: the transcript keeps it."""
    ws = Workspace.open(folder)  # opens: nothing half-written can stop it
    extra = 0
    for a in AGENTS:
        turns = ws.agent(a).turns
        got = [(t.user, t.generated_ids) for t in turns]
        want = reported[a]
        assert got[: len(want)] == want, f"{a}: a finished turn is missing or changed"
        extra += len(got) - len(want)
    assert 0 <= extra <= 1, "more than the one turn in flight is unaccounted for"
    for a in AGENTS:
        reported[a] = [(t.user, t.generated_ids) for t in ws.agent(a).turns]

    events: list = []
    engine = Engine(folder, loaded=loaded, on_event=events.append, eager_restore=False)
    engine.start()
    sources = []
    try:
        engine.wait_ready(60)
        for a in AGENTS:
            def restore(ctx, a=a):
                agent = ctx.workspace.agent(a)
                r = ctx.restore(a)
                ok = agent.cache_ids == agent.expected_ids(ctx.model.tokenizer)
                agent.dirty = False  # look, don't write: the next child meets the crash as is
                return r, ok

            r, ok = engine.call(restore).result(60)
            assert ok, f"{a}: attached state differs from the transcript"
            assert r.source in ("snapshot", "prefill", "new"), r
            if r.source == "prefill":
                # Allowed: no snapshot yet, or one that a later turn made stale. Never a torn
                # or corrupt one: snapshot writes are atomic.
                assert r.reason == "no snapshot on disk" or "stale" in (r.reason or ""), r.reason
            sources.append(r.source)
    finally:
        engine.shutdown()
    notices = [e for e in events if isinstance(e, Notice) and e.level == "error"]
    assert not notices, notices
    return sources, extra


@pytest.fixture(scope="module")
def tiny4(tiny_model):
    return make_tiny_model(tiny_model.tokenizer, 0, LAYERS)


def test_sigkill_at_random_moments_never_loses_a_finished_turn(tmp_path, tiny4):
    folder = tmp_path / "ws"
    rng = random.Random(1234)
    reported: dict[str, list] = {a: [] for a in AGENTS}
    history = []
    for it, when in enumerate(("save", "turn", "time")):
        done = run_child_and_kill(folder, rng, it, when)
        for d in done:
            if "agent" in d:
                reported[d["agent"]].append((d["user"], tuple(d["ids"])))
        temps = sorted(p.name for p in folder.glob("agents/*/.kv.safetensors.*"))
        history.append((len(done), temps, verify(folder, tiny4, reported)))
    assert sum(len(v) for v in reported.values()) >= 3, history  # the children did work
    # A save after all this leaves no temp file of a killed writer behind, and a valid snapshot.
    engine = Engine(folder, loaded=tiny4, eager_restore=True)
    engine.start()
    engine.wait_ready(60)
    engine.call(lambda ctx: [setattr(a, "dirty", True)
                             for a in ctx.workspace.agents.values()]).result()
    engine.shutdown()
    assert not list(folder.glob("agents/*/.kv.safetensors.*")), history
    ws = Workspace.open(folder)
    for a in AGENTS:
        read_snapshot(ws.snapshot_path(a), tiny4.identity,
                      ws.agent(a).expected_ids(tiny4.tokenizer))


# ---- a torn last transcript line ------------------------------------------------------------------
def two_turns(folder: Path, loaded) -> None:
    engine = Engine(folder, loaded=loaded, eager_restore=False)
    engine.start()
    engine.wait_ready(60)
    for m in ("First question about the API?", "Second question?"):
        engine.submit_future("technical", m, max_tokens=6)[1].result(60)
    engine.shutdown()


def test_torn_last_line_is_ignored_with_a_warning_and_healed(tmp_path, tiny_model):
    folder = tmp_path / "ws"
    two_turns(folder, tiny_model)
    transcript = folder / "agents/technical/transcript.jsonl"
    good = transcript.read_bytes()
    fragment = b'{"user": "Third question?", "reply": "It dep'
    with open(transcript, "ab") as f:
        f.write(fragment)  # what a kill in the middle of an append leaves

    ws = Workspace.open(folder)
    assert len(ws.agent("technical").turns) == 2
    assert any("technical" in w and "unfinished last line" in w for w in ws.warnings)

    events: list = []
    engine = Engine(folder, loaded=tiny_model, on_event=events.append, eager_restore=False)
    engine.start()
    engine.wait_ready(60)
    r = engine.submit_future("technical", "Third question?", max_tokens=6)[1].result(60)
    engine.shutdown()
    assert any(isinstance(e, Notice) and e.level == "warning" and "unfinished last line"
               in e.message for e in events)
    # The snapshot still matched the two whole turns: no rebuild because of the torn line.
    assert [e.source for e in events if isinstance(e, AgentRestored)
            and e.agent_id == "technical"] == ["snapshot"]
    assert r.source == "snapshot"

    # The new turn was appended after the whole lines, not glued onto the fragment.
    ws = Workspace.open(folder)
    assert ws.warnings == []
    assert [t.user for t in ws.agent("technical").turns][-1] == "Third question?"
    assert len(ws.agent("technical").turns) == 3
    assert transcript.read_bytes().startswith(good)
    assert (folder / "agents/technical/transcript.torn").read_bytes() == fragment + b"\n"


def test_whole_last_line_without_newline_is_kept(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    agent = ws.agent("business")
    ws.append_turn(agent, Turn("q1", "a1", (1, 2), 1.0))
    transcript = ws.agent_dir("business") / "transcript.jsonl"
    with open(transcript, "ab") as f:  # a crash between the JSON and its newline
        f.write(json.dumps(Turn("q2", "a2", (3,), 2.0).to_json()).encode())
    ws = Workspace.open(tmp_path / "ws")
    assert [t.user for t in ws.agent("business").turns] == ["q1", "q2"] and not ws.warnings
    ws.append_turn(ws.agent("business"), Turn("q3", "a3", (4,), 3.0))
    assert [t.user for t in Workspace.open(tmp_path / "ws").agent("business").turns] == \
        ["q1", "q2", "q3"]


def test_damaged_line_in_the_middle_is_an_error_naming_the_line(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    agent = ws.agent("coordinator")
    for i in range(3):
        ws.append_turn(agent, Turn(f"q{i}", f"a{i}", (i,), float(i)))
    transcript = ws.agent_dir("coordinator") / "transcript.jsonl"
    lines = transcript.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1][:10] + b"\n"
    transcript.write_bytes(b"".join(lines))
    with pytest.raises(WorkspaceError, match=r"transcript.jsonl:2: unreadable transcript line"):
        Workspace.open(tmp_path / "ws")
