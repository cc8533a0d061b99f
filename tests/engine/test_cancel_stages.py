"""Cancel a turn at every stage, then save, export, shut down, reopen and resume (issue 15).

The real Engine on tiny random-weight models. Each stage is reached by a deterministic hook,
never a sleep: the engine's sink runs on the worker thread, so cancelling from the sink when an
event arrives cancels at exactly that point (queued: the worker is held by a `call` job;
started: at TurnStarted, before any prefill; prefilling: at the first PrefillProgress of a
prompt longer than one chunk; first token: at the first Tokens event, which carries one token;
mid-reply: once a few tokens have streamed). After the cancel, the save, the export and the
shutdown, the transcript and the KV ids agree; the shutdown returns without waiting for its
timeout (the worker thread has ended when it returns); a reopened engine restores the agent and
its next greedy reply equals a rebuild's.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from support.tiny_models import tiny_model

from permeant_tui.engine import kvcache
from permeant_tui.engine.errors import PermeantError, TurnCancelled
from permeant_tui.engine.events import PrefillProgress, Stopped, Tokens, TurnStarted
from permeant_tui.engine.events import TurnCancelled as TurnCancelledEvent
from permeant_tui.engine.generation import TurnParams
from permeant_tui.engine.snapshot import read_snapshot
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace

AGENT = "technical"
GREEDY = TurnParams(max_tokens=12)
HISTORY = "Our payment API returns 502 errors under load."
NEXT = "Which service should we look at first?"
LONG = " ".join(["the gateway retries every request twice before it gives up"] * 120)
STAGES = ("queued", "started", "prefilling", "first_token", "mid_reply")
MID_REPLY = 5  # tokens streamed before the mid-reply cancel


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


def agrees(engine: Engine) -> tuple[int, int]:
    """On the worker: the agent's KV ids equal what its transcript renders to, and the cache
    holds exactly that many tokens. -> (tokens, turns)."""

    def check(ctx):
        agent = ctx.workspace.agent(AGENT)
        expected = agent.expected_ids(ctx.model.tokenizer)
        if agent.cache is not None:
            assert agent.cache_ids == expected
            assert kvcache.cache_offset(agent.cache) == len(expected)
        return len(expected), len(agent.turns)

    return engine.call(check).result(60)


def shut(engine: Engine, events: list) -> None:
    """Shut down; the worker has ended when shutdown() returns (it did not give up on a
    timeout) and said so."""
    thread = engine._thread
    assert thread is not None
    engine.shutdown(timeout=120)
    assert not thread.is_alive()
    assert any(isinstance(e, Stopped) for e in events)


class Canceller:
    """The sink: records events and cancels the agent's turn when `stage` is reached."""

    def __init__(self, stage: str) -> None:
        self.stage, self.events = stage, []
        self.engine: Engine | None = None
        self.streamed = 0
        self.fired = False
        self.armed = False  # set once the history (if any) is in place

    def __call__(self, ev) -> None:
        self.events.append(ev)
        if not self.armed or self.fired or getattr(ev, "agent_id", None) != AGENT:
            return
        hit = {"started": isinstance(ev, TurnStarted),
               "prefilling": isinstance(ev, PrefillProgress),
               "first_token": isinstance(ev, Tokens)}.get(self.stage, False)
        if self.stage == "first_token" and hit:
            assert len(ev.ids) == 1, "the first Tokens event carries the first token alone"
        if isinstance(ev, Tokens):
            self.streamed += len(ev.ids)
            hit = hit or (self.stage == "mid_reply" and self.streamed >= MID_REPLY)
        if hit and self.engine is not None:
            self.fired = True
            self.engine.cancel(AGENT)


def cancelled_turn(folder: Path, lm, stage: str, history: bool) -> tuple[int, int]:
    """One session: (a finished turn), a turn cancelled at `stage`, save, export, shutdown."""
    sink = Canceller(stage)
    engine = Engine(folder, loaded=lm, eager_restore=False, on_event=sink, autosave=False)
    sink.engine = engine
    engine.start()
    try:
        engine.wait_ready(60)
        if history:
            engine.submit_future(AGENT, HISTORY, params=GREEDY)[1].result(300)
        before = agrees(engine)
        sink.armed = True
        text = LONG if stage == "prefilling" else NEXT
        if stage == "queued":
            gate = threading.Event()
            held = engine.call(lambda ctx: gate.wait(60))
            turn_id, future = engine.submit_future(AGENT, text, params=GREEDY)
            engine.cancel(AGENT)
            gate.set()
            held.result(60)
        else:
            turn_id, future = engine.submit_future(AGENT, text, params=GREEDY)
        with pytest.raises(TurnCancelled):
            future.result(300)
        assert stage == "queued" or sink.fired, f"the turn never reached {stage}"
        assert [e.turn_id for e in sink.events if isinstance(e, TurnCancelledEvent)] == [turn_id]
        assert agrees(engine) == before  # nothing recorded, the cache back where it was
        engine.save().result(60)
        assert agrees(engine) == before
        if history:
            info = engine.export(AGENT).result(120)
            assert list(info.token_ids) == engine.call(
                lambda ctx: ctx.workspace.agent(AGENT).expected_ids(ctx.model.tokenizer)
            ).result(60)
        else:  # nothing to export yet: one clear error, and the workspace unharmed
            with pytest.raises(PermeantError, match="no conversation"):
                engine.export(AGENT).result(120)
        assert agrees(engine) == before
    finally:
        shut(engine, sink.events)
    return before


def next_reply(folder: Path, lm, *, rebuild: bool) -> tuple[tuple[int, ...], str]:
    events: list = []
    engine = Engine(folder, loaded=lm, eager_restore=False, on_event=events.append,
                    rebuild=rebuild)
    engine.start()
    try:
        engine.wait_ready(60)
        source = engine.restore(AGENT).result(120).source
        agrees(engine)
        result = engine.submit_future(AGENT, "And after the fix?", params=GREEDY)[1].result(300)
        agrees(engine)
    finally:
        shut(engine, events)
    return result.generated_ids, source


def check_snapshot(folder: Path, lm, tokens: int) -> None:
    """What the shutdown left on disk agrees with the transcript."""
    agent = Workspace.open(folder).agent(AGENT)
    expected = agent.expected_ids(lm.tokenizer)
    assert len(expected) == tokens
    snap = folder / "agents" / AGENT / "kv.safetensors"
    if tokens:
        _, ids, _ = read_snapshot(snap, lm.identity, expected)
        assert ids == expected


def run_stage(tmp_path: Path, tok, arch: str, stage: str, history: bool) -> None:
    lm = tiny_model(arch, tok)[1]
    folder = tmp_path / "ws"
    tokens, turns = cancelled_turn(folder, lm, stage, history)
    assert turns == (1 if history else 0)
    check_snapshot(folder, lm, tokens)
    twin = tmp_path / "rebuilt"
    shutil.copytree(folder, twin)
    resumed, source = next_reply(folder, lm, rebuild=False)
    assert source == ("snapshot" if history else "new")
    rebuilt, rebuilt_source = next_reply(twin, lm, rebuild=True)
    assert rebuilt_source == ("prefill" if history else "new")
    assert resumed == rebuilt and resumed


@pytest.mark.parametrize("history", [False, True], ids=["fresh", "history"])
@pytest.mark.parametrize("stage", STAGES)
def test_cancel_then_save_export_quit_resume(tmp_path, tok, stage, history, token_by_token):
    run_stage(tmp_path, tok, "llama", stage, history)


@pytest.mark.parametrize("stage", ["prefilling", "mid_reply"])
def test_cancel_on_a_sliding_window_model(tmp_path, tok, stage, token_by_token):
    """Gemma 3's sliding layers past their window: the cancel goes back by checkpoint or
    rebuild, never a trim the ring cannot undo."""
    run_stage(tmp_path, tok, "gemma3_text", stage, True)


def test_cancel_a_queued_turn_is_reported_at_once(tmp_path, tok):
    """A queued turn behind another job is dropped when cancelled, not when the worker gets to
    it: its event and its Future come at once, and the agent's state says cancelled."""
    lm = tiny_model("llama", tok)[1]
    events: list = []
    engine = Engine(tmp_path / "ws", loaded=lm, eager_restore=False, on_event=events.append)
    engine.start()
    gate = threading.Event()
    try:
        engine.wait_ready(60)
        held = engine.call(lambda ctx: gate.wait(60))
        turn_id, future = engine.submit_future(AGENT, NEXT, params=GREEDY)
        engine.cancel(AGENT)
        assert future.done() and isinstance(future.exception(), TurnCancelled)
        assert any(isinstance(e, TurnCancelledEvent) and e.turn_id == turn_id for e in events)
        assert next(a.state for a in engine.stats().agents if a.agent_id == AGENT) == "cancelled"
        gate.set()
        held.result(60)
        result = engine.submit_future(AGENT, NEXT, params=GREEDY)[1].result(300)
        assert result.generated == GREEDY.max_tokens
        assert next(a.state for a in engine.stats().agents if a.agent_id == AGENT) == "done"
    finally:
        gate.set()
        shut(engine, events)


def test_a_failed_save_at_shutdown_still_stops_the_worker(tmp_path, tok, monkeypatch):
    """Whatever the last save raises, the worker ends and says so (issue 15: a save error left
    the stop unfinished and shutdown() waited 65 s for its timeout)."""
    lm = tiny_model("llama", tok)[1]
    events: list = []
    engine = Engine(tmp_path / "ws", loaded=lm, eager_restore=False, on_event=events.append,
                    autosave=False)
    engine.start()
    engine.wait_ready(60)
    engine.submit_future(AGENT, NEXT, params=GREEDY)[1].result(300)

    def broken(*args, **kwargs):
        raise TypeError("memoryview: cannot cast view with zeros in shape or strides")

    monkeypatch.setattr(Workspace, "save_agent", broken)
    with pytest.raises(PermeantError, match="could not save technical"):
        engine.save().result(60)
    shut(engine, events)
    assert any(getattr(e, "level", "") == "error" and "save at shutdown failed" in e.message
               for e in events)
