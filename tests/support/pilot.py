"""Pilot helpers for UI tests: the real `Engine` on the scripted FakeRunner, in a workspace of
its own, recording what the app asks of it; plus waits and fixtures.

`ScriptedEngine` wraps a real Engine (its queue, worker thread, agent states and events) and
records each call the app makes; events reach the app only through the sink, as in the real
program. Tests can also `emit()` an event the runner cannot produce on its own (a mid-stream
screen, a notice), `release()` turns held in manual mode, and `settle()` until the engine has
done what it can and the app shows it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from textual.widgets import Input, TextArea

from permeant_tui.engine.agent import DEFAULT_AGENTS, Turn
from permeant_tui.engine.api import AgentView, EventSink, TurnView, WorkerContext
from permeant_tui.engine.events import (
    AgentRestored,
    EngineStats,
    Event,
    MigrationDone,
    MigrationFailed,
    MigrationProgress,
    RestoreReport,
)
from permeant_tui.engine.settings import AgentSpec, WorkspaceSettings, save_settings
from permeant_tui.engine.worker import Engine

from .fake_runner import (
    CONTEXT_LIMIT,
    DIGEST,
    FakeLayer,
    FakeRunner,
    on_disk,
    reply_for,
    scripted_error,
)

__all__ = ["CONTEXT_LIMIT", "DIGEST", "ScriptedEngine", "close_engines", "fake_migrations",
           "no_cursor_blink", "reply_for", "settle", "views", "wait_until", "with_stats"]


def views(turns_per_agent: int = 0) -> list[AgentView]:
    """The three default agents, each with `turns_per_agent` scripted past turns."""
    return [
        AgentView(
            agent_id, agent_id, title, f"You are the {agent_id} agent.",
            tuple(TurnView(f"{title} question {i}", f"{title} answer **{i}**: noted.")
                  for i in range(turns_per_agent)),
        )
        for agent_id, _, title, _ in DEFAULT_AGENTS
    ]


def write_workspace(folder: Path, agent_views: list[AgentView]) -> None:
    """A workspace holding these agents and transcripts (as an earlier session leaves it)."""
    specs = [AgentSpec(v.agent_id, v.role, v.title, v.system) for v in agent_views]
    save_settings(folder, WorkspaceSettings(agents=specs))
    # each agent's turns carry a time (the first agent the most recent), so the
    # engine's least-recently-used order does not hang on file times written in one instant
    for k, v in enumerate(agent_views):
        if v.turns:
            d = folder / "agents" / v.agent_id
            d.mkdir(parents=True, exist_ok=True)
            (d / "transcript.jsonl").write_text("".join(
                json.dumps(Turn(t.user, t.reply, (), 1.7e9 - 60.0 * k + i, t.stats).to_json())
                + "\n" for i, t in enumerate(v.turns)))


@dataclass
class Calls:
    submits: list[tuple[str, str]] = field(default_factory=list)
    drafts: list[tuple[str, str]] = field(default_factory=list)  # engine.prepare's (agent, text)
    asks: list[str] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    saves: int = 0
    resets: list[str] = field(default_factory=list)
    load_more: list[tuple[str, int, int]] = field(default_factory=list)
    shutdowns: int = 0
    continues: list[str] = field(default_factory=list)
    regenerates: list[str] = field(default_factory=list)
    started: int = 0


_OPEN: list[ScriptedEngine] = []


class ScriptedEngine:
    """A real Engine on a FakeRunner, recording the app's calls (see the module docstring).

    `restored`: what the engine reports at start-up for these agents (the agents it restores
    eagerly report it through the runner; the others' events are emitted after the load).
    `max_resident=2`: the coordinator stays on disk at start, as in the snapshots.
    `hold_load`: the model load waits (the panes stay "waiting for the model").

    Start-up is made deterministic for snapshots: start() returns once the workspace's
    on-disk figures are in the stats, and the model loads only after the app has sampled the
    stats once (gauges first show the workspace, then the loaded model's figures).
    """

    def __init__(self, agent_views: list[AgentView] | None = None, *, manual: bool = False,
                 restored: Iterable[AgentRestored] = (), chunk_words: int = 3,
                 export_error: str | None = None,
                 fail_next: dict[str, tuple[str, str]] | None = None, hold_load: bool = False,
                 max_resident: int = 2) -> None:
        self.views = agent_views if agent_views is not None else views()
        self.restored_events = list(restored)
        self.runner = FakeRunner(
            restores={e.agent_id: RestoreReport(e.source, e.ms, e.tokens, e.reason)
                      for e in self.restored_events},
            manual=manual, hold_load=True, chunk_words=chunk_words,
            export_error=OSError(export_error) if export_error else None,
            fail_next={a: scripted_error(kind, msg) for a, (kind, msg) in
                       (fail_next or {}).items()})
        self.dir = Path(tempfile.mkdtemp(prefix="permeant-ui-"))
        write_workspace(self.dir, self.views)
        self.engine = Engine(self.dir, runner=self.runner, max_resident=max_resident)
        self.folder = self.engine.folder
        self.calls = Calls()
        self.events: list[Event] = []  # everything sent to the sink, in order
        self.migrations: list[tuple] = []  # filled by the fake_migrations fixture
        self.sink: EventSink | None = None
        self._overrides: dict[str, dict] = {}
        self._states: dict[str, str] = {}
        self._shown: EngineStats | None = None  # the stats the app was last handed
        self._hold_load = hold_load
        self.engine.call(self._earlier_session)
        _OPEN.append(self)

    # ---- EngineAPI, recorded and passed on -----------------------------------------------
    def connect(self, sink: EventSink) -> None:
        assert self.sink is None, "connect() is called once"
        self.sink = sink
        self.engine.connect(self._tee)

    def start(self) -> None:
        self.calls.started += 1
        self.engine.start()
        self.engine.call(self._after_load)
        # The worker reaches the (held) load after the prelude job and its stats refresh.
        deadline = time.monotonic() + 30
        while not self.runner.blocked and time.monotonic() < deadline:
            time.sleep(0.002)

    def wait_ready(self, timeout: float | None = None) -> None:
        self.engine.wait_ready(timeout)

    def on_worker_thread(self) -> bool:
        return self.engine.on_worker_thread()

    def model_info(self):
        return self.engine.model_info()

    def agents(self) -> list[AgentView]:
        return self.engine.agents()

    def agent(self, agent_id: str) -> AgentView:
        return self.engine.agent(agent_id)

    def settings(self) -> WorkspaceSettings:
        return self.engine.settings()

    def load_more(self, agent_id: str, before: int, count: int = 20) -> list[TurnView]:
        self.calls.load_more.append((agent_id, before, count))
        return self.engine.load_more(agent_id, before, count)

    def submit(self, agent_id: str, text: str, max_tokens: int | None = None,
               params=None) -> int:
        self.calls.submits.append((agent_id, text))
        return self.engine.submit(agent_id, text, max_tokens, params)

    def submit_future(self, agent_id: str, text: str, max_tokens: int | None = None,
                      params=None):
        self.calls.submits.append((agent_id, text))
        return self.engine.submit_future(agent_id, text, max_tokens, params)

    def prepare(self, agent_id: str, text: str) -> Future:
        self.calls.drafts.append((agent_id, text))
        return self.engine.prepare(agent_id, text)

    def continue_reply(self, agent_id: str, max_tokens: int | None = None, params=None):
        self.calls.continues.append(agent_id)
        return self.engine.continue_reply(agent_id, max_tokens, params)

    def regenerate(self, agent_id: str, max_tokens: int | None = None, params=None):
        self.calls.regenerates.append(agent_id)
        return self.engine.regenerate(agent_id, max_tokens, params)

    def update_agent_settings(self, agent_id: str, **changes):
        return self.engine.update_agent_settings(agent_id, **changes)

    def turn_params(self, agent_id: str, max_tokens: int | None = None, params=None):
        return self.engine.turn_params(agent_id, max_tokens, params)

    def ask_team(self, question: str, max_tokens: int | None = None) -> Future:
        self.calls.asks.append(question)
        return self.engine.ask_team(question, max_tokens)

    def cancel(self, agent_id: str) -> None:
        self.calls.cancels.append(agent_id)
        self.engine.cancel(agent_id)

    def export(self, agent_id: str, path: str | None = None, quant: str = "none",
               fidelity: bool = True) -> Future:
        self.calls.exports.append(agent_id)
        return self.engine.export(agent_id, path, quant, fidelity)

    def import_usxf(self, path: str, name: str | None = None) -> Future:
        return self.engine.import_usxf(path, name)

    def replay_fidelity(self, agent_id: str) -> Future:
        return self.engine.replay_fidelity(agent_id)

    def save(self) -> Future:
        self.calls.saves += 1
        return self.engine.save()

    def reset(self, agent_id: str) -> Future:
        self.calls.resets.append(agent_id)
        return self.engine.reset(agent_id)

    def restore(self, agent_id: str) -> Future:
        return self.engine.restore(agent_id)

    def call(self, fn: Callable[[WorkerContext], object]) -> Future:
        return self.engine.call(fn)

    def stats(self) -> EngineStats:
        self._shown = self.engine.stats()
        if not self._hold_load:
            self.runner.release_load()
        if not self._states:
            return self._shown
        # a state the test sets stands in for the worker's (screens the runner cannot produce)
        return replace(self._shown, agents=tuple(
            replace(a, state=self._states.get(a.agent_id, a.state)) for a in self._shown.agents))

    def shutdown(self, cancel_running: bool = True, timeout: float = 60.0) -> None:
        self.calls.shutdowns += 1
        self.engine.shutdown(cancel_running, timeout)

    # ---- test controls ---------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Send an event to the app as the engine would (for screens the runner cannot
        produce on its own)."""
        self._tee(event)

    def release(self, turns: int = 1) -> None:
        """Let `turns` held turns run (manual mode)."""
        self.runner.release(turns)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every queued job that can run has run (a held turn cannot)."""
        deadline = time.monotonic() + timeout
        barrier = self.engine.call(lambda ctx: None)
        while not barrier.done():
            if self.runner.blocked:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def override_stats(self, agent_id: str, changes: dict) -> None:
        """Apply these AgentStats fields to the agent once the model is loaded (`state` at once,
        from the next stats sample on)."""
        changes = dict(changes)
        if "state" in changes:
            self._states[agent_id] = changes.pop("state")
        self._overrides[agent_id] = changes
        if changes and self.engine.model_info() is not None:  # loaded: apply now, on the worker
            self.engine.call(self._apply_overrides).result(timeout=30)
        self._shown = None  # settle() waits until the app has sampled the new figures

    def shows_current_stats(self) -> bool:
        """The app was last handed the engine's current stats."""
        return self._shown is not None and self._shown == self.engine.stats()

    def close(self) -> None:
        self.runner.close()
        self.engine.shutdown(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- internals -----------------------------------------------------------------------
    def _tee(self, event: Event) -> None:
        self.events.append(event)
        if self.sink is not None:
            self.sink(event)

    def _apply_overrides(self, ctx: WorkerContext) -> None:
        for agent_id, changes in list(self._overrides.items()):
            if not changes:
                continue
            agent = ctx.workspace.agent(agent_id)
            if changes.pop("resident", True) is False and agent.resident:
                agent.release()
            tokens, nbytes = changes.pop("tokens", None), changes.pop("bytes", None)
            if agent.resident:
                if tokens is not None:
                    agent.cache_ids = [0] * tokens
                if nbytes is not None:
                    agent.cache = [FakeLayer(agent, nbytes)]
            else:
                agent.tokens_on_disk = agent.tokens_on_disk if tokens is None else tokens
                agent.bytes_on_disk = agent.bytes_on_disk if nbytes is None else nbytes
            if "tok_s_history" in changes:
                changes["tok_s_history"] = list(changes["tok_s_history"])
            for name, value in changes.items():
                setattr(agent, name, value)
            self._overrides[agent_id] = {}

    def _earlier_session(self, ctx: WorkerContext) -> None:
        for agent in ctx.workspace.agents.values():
            on_disk(agent)

    def _after_load(self, ctx: WorkerContext) -> None:
        for event in self.restored_events:  # scripted for an agent the engine did not restore
            if self.runner.restores.pop(event.agent_id, None) is not None:
                self.emit(event)
        self._apply_overrides(ctx)


def with_stats(engine: ScriptedEngine, agent_id: str, **changes) -> None:
    """Make the agent's gauges show these AgentStats fields once the model is loaded."""
    engine.override_stats(agent_id, changes)


async def settle(pilot, engine: ScriptedEngine, rounds: int = 3) -> None:
    """Let the engine finish what it can, then let the app handle the events it posted and
    sample the stats it now has."""
    await asyncio.to_thread(engine.wait_idle)
    await wait_until(pilot, engine.shows_current_stats)
    if any(getattr(e, "stage", None) == "settled" for e in engine.events):
        # the panes mount their earlier initial turns then (widgets/agent_pane.py)
        screen = pilot.app.screen_stack[0] if pilot.app.screen_stack else None
        panes = getattr(screen, "panes", ())
        await wait_until(pilot, lambda: all(not p._deferred for p in panes))
    for _ in range(rounds):
        await pilot.pause()


async def wait_until(pilot, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await pilot.pause(0.01)


@pytest.fixture(autouse=True)
def no_cursor_blink(monkeypatch):
    """A steady cursor, so snapshots do not depend on when they are taken."""
    original = Input._on_mount

    def on_mount(self, event):
        self.cursor_blink = False
        return original(self, event)

    monkeypatch.setattr(Input, "_on_mount", on_mount)
    original_text_area = TextArea._on_mount

    def text_area_on_mount(self, event):
        self.cursor_blink = False
        return original_text_area(self, event)

    monkeypatch.setattr(TextArea, "_on_mount", text_area_on_mount)


@pytest.fixture(autouse=True)
def close_engines():
    """Stop every ScriptedEngine a test made (held gates opened) and remove its workspace."""
    yield
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture(autouse=True)
def fake_migrations(monkeypatch):
    """`permeant_tui.migrate.start_migration` without a network: records the request on the
    engine and reports a decision, then success (or failure for a target starting "bad")."""

    def start_migration(engine, agent_id, target, pin=None, quant="none", move=False,
                        on_event=None) -> threading.Thread:
        engine.migrations.append((agent_id, target, pin, quant, move))

        def run() -> None:
            on_event(MigrationProgress(agent_id, "decision", "migrate 0.4 s vs re-prefill 6.1 s"))
            if target.startswith("bad"):
                on_event(MigrationFailed(agent_id, "certificate fingerprint mismatch"))
            else:
                on_event(MigrationDone(agent_id, target, "exact 16/16"))

        thread = threading.Thread(target=run, name=f"migrate-{agent_id}", daemon=True)
        thread.start()
        return thread

    monkeypatch.setattr("permeant_tui.migrate.start_migration", start_migration, raising=False)
