"""Saves made durable off the worker thread (engine/durable.py): a save returns once its files
are written and the old snapshot stands until the new one has landed; two saves of one agent in
flight land in order; a block a landing save names is never collected; a background save that
fails is said, and the agent saved again; a process killed while a save lands restarts from the
previous snapshot and prefills only the missing turn. On llama, qwen3 and a sliding-window
gemma3, with restored logits bit-equal to the live cache's."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from support.tiny_models import tiny_model

from permeant_tui.engine import kvcache, snapshot_write
from permeant_tui.engine import snapshot as snapmod
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.blockstore import BlockStore
from permeant_tui.engine.durable import Flusher
from permeant_tui.engine.events import AgentRestored, Notice
from permeant_tui.engine.generation import prefill
from permeant_tui.engine.snapshot import attach, read_snapshot, write_snapshot
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace

ARCHS = ["llama", "qwen3", "gemma3_text"]
TEXT = "The payment API returns 502 on retries; the queue backs up and the workers stall. " * 24
MSGS = ("Our payment API returns 502 errors under load.", "Which service should we look at first?",
        "What would you log to confirm it?")
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


@pytest.fixture
def gate(monkeypatch):
    """Commits wait until the event is set (the flusher's thread stands still)."""
    ev = threading.Event()
    commit = snapmod.PendingSave.commit

    def gated(self):
        assert ev.wait(60)
        commit(self)

    monkeypatch.setattr(snapmod.PendingSave, "commit", gated)
    return ev


def logits(lm, cache) -> np.ndarray:
    out = lm.model(mx.array([[198]]), cache=kvcache.copy_cache(cache))
    return np.array(out[0, -1].astype(mx.float32))


def temps(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*") if p.is_file())


def setup(tok, arch, tmp_path, n: int):
    lm = tiny_model(arch, tok)[1]
    ids = tok.encode(TEXT)
    assert len(ids) > n + 80
    agent = Agent("a", "technical", "A", "system")
    prefill(lm.model, agent, ids[:n])
    path = tmp_path / "agents" / "a" / "kv.safetensors"
    return lm, ids, agent, path, BlockStore(snapmod.default_store(path))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_save_returns_before_it_is_durable_and_the_old_snapshot_stands_until_then(
        tok, tmp_path, gate, arch):
    lm, ids, agent, path, store = setup(tok, arch, tmp_path, 150)
    flusher = Flusher()
    gate.set()
    write_snapshot(path, agent.cache, agent.cache_ids, lm.identity, "a", store, flusher=flusher)
    assert flusher.wait(60)
    gate.clear()
    prefill(lm.model, agent, ids[150:260])
    info = write_snapshot(path, agent.cache, agent.cache_ids, lm.identity, "a", store,
                          flusher=flusher)
    assert info.new_blocks >= 1 and flusher.pending("a") == flusher.pending() == 1
    # Not yet durable: the manifest on disk is the old one, which still verifies.
    assert read_snapshot(path, lm.identity, None, store)[1] == ids[:150]
    assert any(name.endswith(".tmp") for name in temps(store.folder))
    gate.set()
    assert flusher.wait(60)
    assert flusher.take_failed() == {}
    states, got, _ = read_snapshot(path, lm.identity, ids[:260], store)
    assert got == ids[:260]
    np.testing.assert_array_equal(logits(lm, attach(lm.model, states)), logits(lm, agent.cache))
    assert temps(tmp_path) == []
    flusher.close(10)


def test_two_saves_of_one_agent_in_flight_land_in_order(tok, tmp_path, gate):
    lm, ids, agent, path, store = setup(tok, "llama", tmp_path, 100)
    flusher = Flusher()
    write_snapshot(path, agent.cache, agent.cache_ids, lm.identity, "a", store, flusher=flusher)
    prefill(lm.model, agent, ids[100:230])
    write_snapshot(path, agent.cache, agent.cache_ids, lm.identity, "a", store, flusher=flusher)
    assert flusher.pending("a") >= 1 and not path.exists()
    manifests = [n for n in temps(path.parent) if n.startswith(".kv.safetensors.")]
    assert len(manifests) == 2, manifests  # one temp name per save: neither overwrote the other
    gate.set()
    assert flusher.wait(60) and flusher.take_failed() == {}
    states, got, _ = read_snapshot(path, lm.identity, ids[:230], store)
    np.testing.assert_array_equal(logits(lm, attach(lm.model, states)), logits(lm, agent.cache))
    assert temps(tmp_path) == []
    flusher.close(10)


def test_blocks_a_landing_save_names_are_not_collected(tok, tmp_path, gate):
    """Agent b forks a: its save reuses a's blocks. a's manifest goes while b's save is still
    landing: a collection asked for then deletes nothing, and the one after b lands keeps them."""
    lm, ids, agent, _, _ = setup(tok, "llama", tmp_path, 200)
    ws = Workspace.open(tmp_path / "ws")
    ws.background_saves()
    a, b = ws.agent("technical"), ws.agent("business")
    for x in (a, b):
        x.cache, x.cache_ids, x.dirty = kvcache.copy_cache(agent.cache), list(ids[:200]), True
    gate.set()
    ws.save_agent(a, lm)
    assert ws.flush() == {}
    blocks = ws.blocks.names()
    assert len(blocks) == 200 // snapmod.BLOCK_TOKENS
    gate.clear()
    ws.save_agent(b, lm)  # reuses a's blocks: nothing new staged
    ws.snapshot_path("technical").unlink()  # a's manifest gone: only b's landing save names them
    assert ws.collect_blocks() == [] and ws.blocks.names() == blocks
    gate.set()
    assert ws.flush() == {}
    assert ws.blocks.names() == blocks
    states, got, _ = read_snapshot(ws.snapshot_path("business"), lm.identity, ids[:200],
                                   ws.blocks)
    np.testing.assert_array_equal(logits(lm, attach(lm.model, states)), logits(lm, agent.cache))
    ws.close()


def session(folder: Path, lm, msgs, events: list | None = None):
    events = [] if events is None else events
    engine = Engine(folder, loaded=lm, eager_restore=False, on_event=events.append)
    engine.start()
    try:
        engine.wait_ready(60)
        return [engine.submit_future("technical", m, max_tokens=MAX_TOKENS)[1].result(300)
                for m in msgs], engine
    finally:
        engine.shutdown()


def test_a_background_save_that_fails_is_said_and_the_agent_saved_again(tok, tmp_path,
                                                                         monkeypatch):
    lm = tiny_model("llama", tok)[1]
    commit_file, calls = snapshot_write.commit_file, []

    def full_once(tmp, path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return commit_file(tmp, path)

    monkeypatch.setattr(snapshot_write, "commit_file", full_once)
    events: list = []
    folder = tmp_path / "ws"
    engine = Engine(folder, loaded=lm, eager_restore=False, on_event=events.append)
    engine.start()
    try:
        engine.wait_ready(60)
        first = engine.submit_future("technical", MSGS[0], max_tokens=MAX_TOKENS)[1].result(300)

        def look(ctx):  # a job: the failed save has been taken, the agent is dirty again
            return ctx.workspace.agent("technical").dirty
        assert engine.call(look).result(60) is True
        warned = [e for e in events if isinstance(e, Notice) and e.level == "warning"]
        assert len(warned) == 1 and "No space left" in warned[0].message, warned
        assert "\n" not in warned[0].message
        assert not (folder / "agents/technical/kv.safetensors").exists()  # nothing half-made
        second = engine.submit_future("technical", MSGS[1], max_tokens=MAX_TOKENS)[1].result(300)
    finally:
        engine.shutdown()
    assert len(calls) >= 2
    ws = Workspace.open(folder)
    agent = ws.agent("technical")
    assert [t.generated_ids for t in agent.turns] == [first.generated_ids, second.generated_ids]
    read_snapshot(ws.snapshot_path("technical"), lm.identity, agent.expected_ids(tok))
    assert temps(folder / "agents") == []


CHILD = r"""
import sys, threading
sys.path[:0] = sys.argv[1:3]
from permeant_tui.engine import runtime
runtime.prepare()
from permeant_tui.engine import snapshot as snapmod
from permeant_tui.engine.worker import Engine
folder, model, msgs = sys.argv[3], sys.argv[4], sys.argv[5:]
commit, saves = snapmod.PendingSave.commit, []
def stuck(self):  # the last turn's save never lands: the process is killed meanwhile
    saves.append(self)
    if len(saves) >= len(msgs):
        threading.Event().wait()
    commit(self)
snapmod.PendingSave.commit = stuck
engine = Engine(folder, model=model, eager_restore=False)
engine.start()
engine.wait_ready(120)
for m in msgs:
    engine.submit_future("technical", m, max_tokens=MAX_TOKENS)[1].result(300)
print("answered", flush=True)
threading.Event().wait()
""".replace("MAX_TOKENS", str(MAX_TOKENS))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_killed_while_a_save_lands_restarts_from_the_previous_snapshot(tok, tmp_path, arch):
    model_dir, lm = tiny_model(arch, tok)
    root = Path(__file__).resolve().parents[2]
    folder = tmp_path / "ws"
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(root / "tests"),
                          str(folder), str(model_dir), *MSGS[:2]],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        line = ""
        while time.monotonic() < deadline and "answered" not in line:
            line = p.stdout.readline() if p.stdout else ""
            if not line and p.poll() is not None:
                break
        assert "answered" in line, p.stderr.read() if p.stderr else ""
        time.sleep(0.2)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    ws = Workspace.open(folder)
    agent = ws.agent("technical")
    assert len(agent.turns) == 2  # both turns recorded: the transcript is written first
    held = read_snapshot(ws.snapshot_path("technical"), lm.identity, None)[1]
    want = agent.expected_ids(tok)
    assert 0 < len(held) < len(want) and want[:len(held)] == held  # one save behind

    events: list = []
    [r], _ = session(folder, lm, MSGS[2:], events)
    [restored] = [e for e in events if isinstance(e, AgentRestored)]
    assert (restored.source, restored.reason, restored.prefilled) == \
        ("snapshot", None, len(want) - len(held))
    ref, _ = session(tmp_path / "ref", lm, MSGS)  # never interrupted
    assert r.generated_ids == ref[2].generated_ids
    assert not list(folder.rglob(".*.tmp")) and not list(folder.rglob(".kv.safetensors.*"))
