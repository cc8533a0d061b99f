"""A restart resumes every agent from its snapshot, without prefill, and the conversation goes on
exactly as if the process had never stopped (same greedy tokens, same KV state)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from permeant_tui.engine import kvcache
from permeant_tui.engine.agent import Agent
from permeant_tui.engine.events import AgentRestored, Notice, Saved
from permeant_tui.engine.generation import common_prefix
from permeant_tui.engine.snapshot import read_header, read_snapshot
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace

MSGS = ("We have a critical API bug affecting payment processing. What do you check first?",
        "The logs show timeouts from the card network. Next step?",
        "What are the detailed steps to fix that API bug from our previous discussion?")
PERMEANT = [str(Path(sys.executable).with_name("permeant"))]  # the console script


def kv_now(engine: Engine, agent_id: str) -> tuple[list[int], list]:
    def grab(ctx):
        a = ctx.workspace.agent(agent_id)
        n = len(a.cache_ids)
        ks, vs, _ = kvcache.kv_arrays(a.cache, n)
        return list(a.cache_ids), list(zip(ks, vs, strict=True))

    return engine.call(grab).result(60)


def session(folder: Path, loaded, turns: list[tuple[str, str]], max_tokens: int = 10, **kw):
    """One process lifetime: a new Engine on `folder` runs `turns` ((agent, message) pairs) and
    shuts down (which saves). Returns (results, events, {agent: (ids, kv)} of the talked-to)."""
    events: list = []
    kw.setdefault("eager_restore", False)
    engine = Engine(folder, loaded=loaded, on_event=events.append, **kw)
    engine.start()
    try:
        engine.wait_ready(60)
        results = [engine.submit_future(a, m, max_tokens=max_tokens)[1].result(120)
                   for a, m in turns]
        kv = {a: kv_now(engine, a) for a in {a for a, _ in turns}}
    finally:
        engine.shutdown()
    return results, events, kv


def restored(events, agent_id: str) -> list[AgentRestored]:
    return [e for e in events if isinstance(e, AgentRestored) and e.agent_id == agent_id]


def expected_ids(folder: Path, agent_id: str, tokenizer) -> list[int]:
    return Workspace.open(folder).agent(agent_id).expected_ids(tokenizer)


def assert_kv_equal(a, b) -> None:
    (ids_a, kv_a), (ids_b, kv_b) = a, b
    assert ids_a == ids_b
    for (k, v), (rk, rv) in zip(kv_a, kv_b, strict=True):
        assert np.array_equal(k, rk) and np.array_equal(v, rv)


# ---- in-process restarts (tiny model) ---------------------------------------------------------
def test_resume_after_restart_equals_uninterrupted_run(tmp_path, tiny_model):
    tok = tiny_model.tokenizer
    turns = [("technical", m) for m in MSGS]
    ref, _, ref_kv = session(tmp_path / "ref", tiny_model, turns)  # never restarted

    folder = tmp_path / "ws"
    first, ev1, _ = session(folder, tiny_model, turns[:2])
    assert [r.generated_ids for r in first] == [r.generated_ids for r in ref[:2]]
    assert any(isinstance(e, Saved) for e in ev1)
    snap = folder / "agents/technical/kv.safetensors"
    before = expected_ids(folder, "technical", tok)
    _, ids, _ = read_snapshot(snap, tiny_model.identity, before)  # saved, and up to date
    assert len(ids) == len(before) > 0

    (r,), events, kv = session(folder, tiny_model, turns[2:])  # the restart
    (ev,) = restored(events, "technical")
    assert (ev.source, ev.tokens, ev.reason) == ("snapshot", len(before), None)
    assert r.source == "snapshot"
    prompt = Workspace.open(tmp_path / "ref").agent("technical")
    prompt = Agent(prompt.agent_id, prompt.role, prompt.title, prompt.system, prompt.turns[:2])
    cached = common_prefix(before, prompt.prompt_ids(tok, MSGS[2]))
    assert r.cached == cached == ref[2].cached and r.prefilled == ref[2].prefilled
    assert r.generated_ids == ref[2].generated_ids and r.reply == ref[2].reply
    assert_kv_equal(kv["technical"], ref_kv["technical"])  # bit-identical KV after the turn
    assert [t.user for t in Workspace.open(folder).agent("technical").turns] == list(MSGS)


def test_eager_restore_attaches_every_agent_without_prefill(tmp_path, tiny_model):
    tok = tiny_model.tokenizer
    folder = tmp_path / "ws"
    session(folder, tiny_model, [("technical", MSGS[0]), ("business", MSGS[0]),
                                 ("coordinator", MSGS[1])])
    want = {a: len(expected_ids(folder, a, tok)) for a in ("technical", "business", "coordinator")}
    events: list = []
    engine = Engine(folder, loaded=tiny_model, on_event=events.append, eager_restore=True)
    engine.start()
    try:
        engine.wait_ready(60)
        engine.call(lambda ctx: None).result(60)  # the eager restores run before this job
        got = {e.agent_id: (e.source, e.tokens) for e in events if isinstance(e, AgentRestored)}
        assert got == {a: ("snapshot", n) for a, n in want.items()}
        resident = engine.call(lambda ctx: {a.agent_id: len(a.cache_ids)
                                            for a in ctx.workspace.agents.values()
                                            if a.resident}).result()
        assert resident == want
        tech = Workspace.open(folder).agent("technical")
        r = engine.submit_future("technical", MSGS[2], max_tokens=4)[1].result(60)
        assert r.source == "snapshot"  # attached at start: the first turn says from where
        assert r.cached == common_prefix(tech.expected_ids(tok), tech.prompt_ids(tok, MSGS[2]))
    finally:
        engine.shutdown()
    assert not [e for e in events if isinstance(e, Notice) and e.level != "information"]


def test_shutdown_saves_and_a_clean_agent_is_not_rewritten(tmp_path, tiny_model):
    folder = tmp_path / "ws"
    session(folder, tiny_model, [("business", MSGS[0])])
    snap = folder / "agents/business/kv.safetensors"
    mtime = snap.stat().st_mtime_ns
    time.sleep(0.01)
    _, events, _ = session(folder, tiny_model, [], eager_restore=True)
    assert snap.stat().st_mtime_ns == mtime  # restored from it, unchanged: not written again
    saved = [e for e in events if isinstance(e, Saved)]
    assert saved and saved[-1].agent_ids == ()


# ---- a real restart: `permeant chat` in a new process, on the real model ------------------------
def chat(folder: Path, agent: str, msg: str, *extra: str) -> tuple[dict, str]:
    p = subprocess.run([*PERMEANT, "chat", agent, msg, "--workspace", str(folder), "--json",
                        "--max-tokens", "8", *extra],
                       capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, real_model):
    """Uninterrupted 3-turn run (reference) and a saved 2-turn workspace, on the real model."""
    root = tmp_path_factory.mktemp("real")
    engine = Engine(root / "ref", loaded=real_model, eager_restore=False)
    engine.start()
    try:
        engine.wait_ready(60)
        ref = [engine.submit_future("technical", MSGS[0], max_tokens=8)[1].result(300),
               engine.submit_future("technical", MSGS[1], max_tokens=8)[1].result(300)]
        # A turn's future resolves once its transcript line is durable and its snapshot
        # written; save() returns once the snapshot is durable too (engine/durable.py): this
        # copy is the workspace a process quitting here would leave.
        engine.save().result(60)
        shutil.copytree(root / "ref", root / "two")
        ref.append(engine.submit_future("technical", MSGS[2], max_tokens=8)[1].result(300))
    finally:
        engine.shutdown()
    return root, ref


@pytest.mark.real_model
def test_resume_in_a_new_process_on_the_real_model(real_runs, real_model, tmp_path):
    root, ref = real_runs
    folder = tmp_path / "ws"
    shutil.copytree(root / "two", folder)
    before = expected_ids(folder, "technical", real_model.tokenizer)
    out, stderr = chat(folder, "technical", MSGS[2])
    assert out["source"] == "snapshot", (out, stderr)
    assert out["tokens"]["cached"] == ref[2].cached
    assert out["tokens"]["cached"] == common_prefix(
        before, Workspace.open(root / "ref").agent("technical").expected_ids(
            real_model.tokenizer))
    assert out["tokens"]["cached"] >= len(before) - 8  # at most the last reply is re-read
    assert out["generated_ids"] == list(ref[2].generated_ids) and out["reply"] == ref[2].reply
    assert "snapshot not used" not in stderr


@pytest.mark.real_model
def test_rebuild_flag_prefills_and_answers_the_same(real_runs, real_model, tmp_path):
    root, ref = real_runs
    folder = tmp_path / "ws"
    shutil.copytree(root / "two", folder)
    out, stderr = chat(folder, "technical", MSGS[2], "--rebuild")
    assert out["source"] == "prefill", out
    assert "--rebuild asked for it" in stderr
    assert out["generated_ids"] == list(ref[2].generated_ids)
    # The rebuilt state was saved: the next process restores it from the snapshot.
    tokens = len(expected_ids(folder, "technical", real_model.tokenizer))
    _, ids, _ = read_snapshot(folder / "agents/technical/kv.safetensors", real_model.identity,
                              None)
    assert len(ids) == tokens


# ---- `permeant status --json` ---------------------------------------------------------------------
def test_status_json_lists_every_agent(tmp_path, tiny_model):
    folder = tmp_path / "ws"
    session(folder, tiny_model, [("technical", MSGS[0]), ("technical", MSGS[1]),
                                 ("coordinator", MSGS[0])])
    p = subprocess.run([*PERMEANT, "status", "--json", "--workspace", str(folder)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["workspace"] == str(folder.resolve())
    agents = {a["id"]: a for a in out["agents"]}
    assert list(agents) == ["technical", "business", "coordinator"]
    keys = {"id", "role", "turns", "tokens", "bytes", "resident", "snapshot", "last_used"}
    tok = tiny_model.tokenizer
    for aid, a in agents.items():
        assert keys <= set(a), (aid, a)
        assert a["role"] == aid and a["resident"] is False
    for aid, turns in (("technical", 2), ("coordinator", 1)):
        a = agents[aid]
        snap = folder / "agents" / aid / "kv.safetensors"
        assert a["turns"] == turns
        assert a["tokens"] == len(expected_ids(folder, aid, tok)) > 0
        blocks = json.loads(read_header(snap)["__metadata__"]["blocks"])
        assert a["bytes"] == snap.stat().st_size + sum(
            (folder / "kv-blocks" / f"{b}.kvb").stat().st_size for b in blocks) > 0
        assert a["snapshot"] == str(snap.resolve())
        assert time.strptime(a["last_used"], "%Y-%m-%dT%H:%M:%S")
    b = agents["business"]
    assert (b["turns"], b["tokens"], b["bytes"], b["snapshot"], b["last_used"]) == \
        (0, 0, 0, None, None)
