"""Sliding-window and plain-KV models through the Engine and the CLI, past the window: a restart
resumes from the snapshot (every cached token reused) and continues as a rebuild would; a
cancelled turn goes back to its boundary; a tampered snapshot is rebuilt, never attached; a
recurrent model is refused at load with one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from support.tiny_models import SLIDING, WINDOW, build_model_dir, tiny_model
from test_kvcache import ARCHS, cut, rewrite

from permeant_tui.engine import kvcache
from permeant_tui.engine import snapshot as snapmod
from permeant_tui.engine.errors import ModelLoadError, TurnCancelled
from permeant_tui.engine.events import AgentRestored, Tokens
from permeant_tui.engine.events import TurnCancelled as TurnCancelledEvent
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace

MSGS = ("Our payment API returns 502 errors under load.", "Which service should we look at first?",
        "What would you log to confirm it?", "And after the fix?")
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


def session(folder: Path, lm, msgs, *, rebuild: bool = False, on_event=None):
    """A fresh Engine (a restart) on `folder`: run `msgs` on technical -> (results, events)."""
    events: list = []

    def sink(ev):
        events.append(ev)
        if on_event:
            on_event(engine, ev)

    engine = Engine(folder, loaded=lm, eager_restore=False, on_event=sink, rebuild=rebuild)
    engine.start()
    try:
        engine.wait_ready(60)
        results = [engine.submit_future("technical", m, max_tokens=MAX_TOKENS)[1].result(300)
                   for m in msgs]
    finally:
        engine.shutdown()
    return results, events


def saved_logits(folder: Path, lm) -> np.ndarray:
    """Next-token logits of the agent's saved snapshot (verified and attached here)."""
    agent = Workspace.open(folder).agent("technical")
    states, ids, _ = snapmod.read_snapshot(folder / "agents/technical/kv.safetensors",
                                           lm.identity, agent.expected_ids(lm.tokenizer))
    out = lm.model(mx.array([[198]]), cache=snapmod.attach(lm.model, states))
    return np.array(out[0, -1])


@pytest.fixture(scope="module")
def histories(tmp_path_factory, tok):
    """Per architecture, a workspace whose technical agent has 3 turns past the window."""
    root = tmp_path_factory.mktemp("sw")
    made = {}

    def get(arch):
        if arch not in made:
            lm = tiny_model(arch, tok)[1]
            results, _ = session(root / arch, lm, MSGS[:3])
            assert results[-1].in_cache > 2 * WINDOW
            made[arch] = root / arch
        return made[arch]

    return get


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("arch", ARCHS)
def test_restart_resumes_from_the_snapshot_and_equals_a_rebuild(tok, histories, tmp_path, arch):
    lm = tiny_model(arch, tok)[1]
    a, b = copy(histories(arch), tmp_path / "a"), copy(histories(arch), tmp_path / "b")
    n = Workspace.open(a).agent("technical").tokens_on_disk
    [r], events = session(a, lm, MSGS[3:])
    restored = [e for e in events if isinstance(e, AgentRestored)]
    assert [(e.source, e.reason) for e in restored] == [("snapshot", None)]
    assert r.source == "snapshot" and r.cached == n and r.rewind is None  # nothing re-read

    [ref], events = session(b, lm, MSGS[3:], rebuild=True)
    assert ref.source == "prefill" and ref.cached == n
    assert r.generated_ids == ref.generated_ids
    np.testing.assert_allclose(saved_logits(a, lm), saved_logits(b, lm), atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "llama_swa"])
def test_snapshot_behind_the_transcript_restores_its_prefix_and_prefills_the_rest(
        tok, histories, tmp_path, arch):
    """A crash after a turn is recorded but before its snapshot is durable leaves a snapshot one
    turn behind: the restart attaches it and prefills only the last turn, then continues exactly
    as the agent whose snapshot kept up (and as a rebuild)."""
    lm = tiny_model(arch, tok)[1]
    a, b = copy(histories(arch), tmp_path / "a"), copy(histories(arch), tmp_path / "b")
    n = Workspace.open(a).agent("technical").tokens_on_disk
    session(b, lm, MSGS[3:])  # b: a 4th turn, saved
    d = "agents/technical/transcript.jsonl"
    shutil.copyfile(b / d, a / d)  # a: the same transcript, the 3-turn snapshot
    want = len(Workspace.open(a).agent("technical").expected_ids(tok))
    assert want > n
    last = "Summarise what we found."
    [r], events = session(a, lm, [last])
    restored = [e for e in events if isinstance(e, AgentRestored)]
    assert [(e.source, e.reason, e.tokens, e.prefilled) for e in restored] == \
        [("snapshot", None, want, want - n)]
    assert r.source == "snapshot" and r.cached == want

    [ref], _ = session(b, lm, [last])  # b restores an up-to-date snapshot
    assert ref.source == "snapshot" and ref.cached == want
    assert r.generated_ids == ref.generated_ids
    np.testing.assert_allclose(saved_logits(a, lm), saved_logits(b, lm), atol=1e-4)
    # Against a rebuild of the same 4-turn conversation by prefill (one pass, so float noise,
    # not equality): the next-token logits of the state the restart attached.
    got, rebuilt = (copy(histories(arch), tmp_path / x) for x in ("got", "rebuilt"))
    for f in (got, rebuilt):
        shutil.copyfile(b / d, f / d)
    src, logits = restored_logits(got, lm)
    ref_src, ref_logits = restored_logits(rebuilt, lm, rebuild=True)
    assert (src, ref_src) == ("snapshot", "prefill")
    assert int(np.argmax(logits)) == int(np.argmax(ref_logits))
    np.testing.assert_allclose(logits, ref_logits, atol=1e-3)


def restored_logits(folder: Path, lm, rebuild: bool = False) -> tuple[str, np.ndarray]:
    """(source, next-token logits) of the technical agent right after a restart restores it."""
    engine = Engine(folder, loaded=lm, eager_restore=False, rebuild=rebuild, autosave=False)
    engine.start()
    try:
        engine.wait_ready(60)
        r = engine.restore("technical").result(300)

        def logits(ctx):
            agent = ctx.workspace.agent("technical")
            out = lm.model(mx.array([[198]]), cache=agent.cache)
            agent.cache, agent.cache_ids, agent.dirty = None, [], False  # not saved: moved on
            return np.array(out[0, -1])

        return r.source, engine.call(logits).result(60)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("arch", ["gemma3_text", "llama_swa", "llama"])
def test_cancel_past_the_window_then_continue(tok, histories, tmp_path, arch):
    lm = tiny_model(arch, tok)[1]
    a, b = copy(histories(arch), tmp_path / "a"), copy(histories(arch), tmp_path / "b")

    first: list = []

    def cancel_on_first_tokens(engine, ev):
        if isinstance(ev, Tokens) and not first:
            first.append(ev.turn_id)
            engine.cancel("technical")

    events: list = []
    engine = Engine(a, loaded=lm, eager_restore=False,
                    on_event=lambda ev: (events.append(ev), cancel_on_first_tokens(engine, ev)))
    engine.start()
    try:
        engine.wait_ready(60)
        _, fut = engine.submit_future("technical", "Write it all down, at length.",
                                      max_tokens=3000)
        with pytest.raises(TurnCancelled):
            fut.result(300)
        r = engine.submit_future("technical", MSGS[3], max_tokens=MAX_TOKENS)[1].result(300)
    finally:
        engine.shutdown()
    [cancelled] = [e for e in events if isinstance(e, TurnCancelledEvent)]
    assert cancelled.rewind == ("checkpoint" if arch in SLIDING else "trim")

    [ref], _ = session(b, lm, MSGS[3:])  # the same history, never cancelled
    assert r.generated_ids == ref.generated_ids and r.cached == ref.cached
    np.testing.assert_array_equal(saved_logits(a, lm), saved_logits(b, lm))


@pytest.mark.parametrize("arch", ["gemma3_text", "llama_swa"])
def test_tampered_per_layer_length_is_rebuilt_never_attached(tok, histories, tmp_path, arch):
    lm = tiny_model(arch, tok)[1]
    a, b = copy(histories(arch), tmp_path / "a"), copy(histories(arch), tmp_path / "b")
    sliding = lm.identity.layer_windows().index(WINDOW)
    rewrite(a / "agents/technical/kv.safetensors", cut(sliding, WINDOW - 1))
    [r], events = session(a, lm, MSGS[3:])
    [restored] = [e for e in events if isinstance(e, AgentRestored)]
    assert restored.source == "prefill" and r.source == "prefill"
    assert restored.reason.startswith("layout check failed"), restored.reason
    assert f"layer {sliding} stores {WINDOW - 1} tokens" in restored.reason
    [ref], _ = session(b, lm, MSGS[3:])
    assert r.generated_ids == ref.generated_ids


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "permeant_tui.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_cli_second_process_resumes_and_matches_rebuild(tok, histories, tmp_path):
    folder = tiny_model("gemma3_text", tok)[0]
    a, b = copy(histories("gemma3_text"), tmp_path / "a"), copy(histories("gemma3_text"),
                                                                 tmp_path / "b")
    n = Workspace.open(a).agent("technical").tokens_on_disk
    runs = []
    for ws, extra in ((a, []), (b, ["--rebuild"])):
        p = cli("chat", "technical", MSGS[3], "--json", "--max-tokens", MAX_TOKENS, "--model",
                folder, "--workspace", ws, *extra)
        assert p.returncode == 0, p.stderr
        runs.append(json.loads(p.stdout))
    resumed, rebuilt = runs
    assert resumed["source"] == "snapshot" and resumed["tokens"]["cached"] == n
    assert resumed["rewind"] is None
    assert rebuilt["source"] == "prefill"
    assert resumed["generated_ids"] == rebuilt["generated_ids"]


def test_recurrent_model_is_refused_with_one_line(tok, tmp_path):
    folder = build_model_dir(tmp_path / "mamba", "mamba", tok)
    from permeant_tui.engine.models import load_model

    with pytest.raises(kvcache.UnsupportedModel) as ei:
        load_model(str(folder))
    assert isinstance(ei.value, ModelLoadError) and ei.value.exit_code == 3
    assert "\n" not in str(ei.value) and "ArraysCache" in str(ei.value)
    # An engine that fails to load it stops cleanly (no abort at exit, exit 134 before).
    code = ("import sys\nfrom permeant_tui.engine import runtime\nruntime.prepare()\n"
            "from permeant_tui.engine.worker import Engine\n"
            f"e = Engine({str(tmp_path / 'ws')!r}, {str(folder)!r}, eager_restore=False)\n"
            "e.start()\ntry:\n    e.wait_ready(120)\nexcept Exception as exc:\n"
            "    print(exc, file=sys.stderr)\n    e.shutdown()\n    sys.exit(exc.exit_code)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, (p.returncode, p.stderr)
    assert "not supported" in p.stderr and "Traceback" not in p.stderr


def test_export_within_the_window_imports_and_continues(tok, tmp_path):
    """A sliding-window agent still inside its window exports (every layer holds every token),
    and the import continues as the source does (past the window: test_usxf_sliding.py)."""
    from permeant_tui.engine.usxf.keys import WorkspaceKeys

    lm = tiny_model("gemma3_text", tok)[1]
    src = Engine(tmp_path / "src", loaded=lm, eager_restore=False)
    dst = Engine(tmp_path / "dst", loaded=lm, eager_restore=False)
    for e in (src, dst):
        e.start()
        e.wait_ready(60)
    try:
        r = src.submit_future("technical", "We have a critical API bug.", max_tokens=8)[1]
        assert r.result(300).in_cache < WINDOW
        out = tmp_path / "tech.usxf"
        src.export("technical", str(out)).result(300)
        ref = src.submit_future("technical", MSGS[1], max_tokens=MAX_TOKENS)[1].result(300)
        keys = WorkspaceKeys(tmp_path / "dst/keys")
        keys.ensure()
        keys.trust(WorkspaceKeys(tmp_path / "src/keys").public_key_text)
        dst.import_usxf(str(out), "migrated").result(300)
        got = dst.submit_future("migrated", MSGS[1], max_tokens=MAX_TOKENS)[1].result(300)
    finally:
        src.shutdown()
        dst.shutdown()
    assert got.source == "usxf" and got.cached == ref.cached
    assert got.in_cache > WINDOW and got.generated_ids == ref.generated_ids
