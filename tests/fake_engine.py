"""A scripted `EngineClient` for UI tests: no model, deterministic events, every call recorded.

Like the real engine, jobs run one at a time on a worker thread and events reach the app only
through the sink. With `manual=True` each turn job waits for `release()`, so a test can look at
the panes between "queued" and "done". Tests can also `emit()` any event directly.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import pytest
from textual.widgets import Input

from permeant_tui.engine.client import AgentView, EventSink, TurnView
from permeant_tui.engine.events import (
    AgentReset,
    AgentRestored,
    AgentStats,
    EngineStats,
    Event,
    ExportDone,
    ExportFailed,
    ExportProgress,
    MigrationDone,
    MigrationFailed,
    MigrationProgress,
    ModelLoading,
    ModelReady,
    PrefillProgress,
    Saved,
    Stopped,
    Tokens,
    TurnCancelled,
    TurnDone,
    TurnFailed,
    TurnQueued,
    TurnResult,
    TurnStarted,
)

AGENTS = (("technical", "Technical"), ("business", "Business"), ("coordinator", "Coordinator"))
CONTEXT_LIMIT = 8192
MB = 1 << 20
DIGEST = "sha256:9f2c4e1ab07d63c58e2f01d4b6a9c3e7f5d8b2a1c0e9f8d7c6b5a4f3e2d1c0b9"


# The engine's agent state after each event (worker.py sets `agent.state` the same way); the
# fake's stats report it, as the real engine's do.
STATE_AFTER = {TurnQueued: "queued", TurnStarted: "prefilling", Tokens: "generating",
               TurnDone: "done", TurnFailed: "failed", TurnCancelled: "idle", AgentReset: "idle"}


def views(turns_per_agent: int = 0) -> list[AgentView]:
    """The three default agents, each with `turns_per_agent` scripted past turns."""
    return [
        AgentView(
            agent_id,
            agent_id,
            title,
            f"You are the {agent_id} agent.",
            tuple(
                TurnView(f"{title} question {i}", f"{title} answer **{i}**: noted.")
                for i in range(turns_per_agent)
            ),
        )
        for agent_id, title in AGENTS
    ]


def reply_for(agent_id: str, text: str) -> str:
    return f"**{agent_id.title()}** view on *{text}*:\n\n- first point\n- second point"


@dataclass
class Job:
    run: Callable[[], None]
    gated: bool = False
    agent_id: str | None = None
    turn_id: int | None = None
    cancelled: bool = False


@dataclass
class Calls:
    submits: list[tuple[str, str]] = field(default_factory=list)
    asks: list[str] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    saves: int = 0
    resets: list[str] = field(default_factory=list)
    load_more: list[tuple[str, int, int]] = field(default_factory=list)
    shutdowns: int = 0
    started: int = 0


class FakeEngine:
    def __init__(
        self,
        agent_views: list[AgentView] | None = None,
        *,
        manual: bool = False,
        restored: Iterable[AgentRestored] = (),
        chunk_words: int = 3,
        export_error: str | None = None,
        fail_next: dict[str, tuple[str, str]] | None = None,
        ready: bool = True,
        autostart: bool = True,
    ) -> None:
        self.views = agent_views if agent_views is not None else views()
        self.manual = manual
        self.restored = list(restored)
        self.chunk_words = chunk_words
        self.export_error = export_error
        self.fail_next = dict(fail_next or {})
        self.ready = ready
        self.autostart = autostart
        self.calls = Calls()
        self.events: list[Event] = []  # everything sent to the sink, in order
        self.sink: EventSink | None = None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._pending: list[Job] = []
        self._gate = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._next_turn = 1
        self._tokens = {view.agent_id: 150 * len(view.turns) for view in self.views}
        self._thread = threading.Thread(target=self._work, name="fake-engine", daemon=True)
        self.agent_stats: dict[str, AgentStats] = {}
        self.states: dict[str, str] = {}
        self.replies: dict[int, str] = {}
        self.migrations: list[tuple] = []

    # EngineClient

    def connect(self, sink: EventSink) -> None:
        assert self.sink is None, "connect() is called once"
        self.sink = sink

    def start(self) -> None:
        self.calls.started += 1
        self._thread.start()
        if self.autostart:
            self._queue(Job(self._start_job))

    def agents(self) -> list[AgentView]:
        return list(self.views)

    def submit(self, agent_id: str, text: str, max_tokens: int | None = None) -> int:
        self.calls.submits.append((agent_id, text))
        turn_id = self._turn_id()
        self.emit(TurnQueued(agent_id, turn_id, text))
        self._queue(Job(lambda: self._turn(agent_id, turn_id, text), True, agent_id, turn_id))
        return turn_id

    def ask_team(self, question: str, max_tokens: int | None = None) -> None:
        self.calls.asks.append(question)
        ids = {agent: self._turn_id() for agent in ("technical", "business", "coordinator")}
        self.emit(TurnQueued("technical", ids["technical"], question))
        self.emit(TurnQueued("business", ids["business"], question))
        self.emit(TurnQueued("coordinator", ids["coordinator"], ""))
        for agent in ("technical", "business"):
            self._queue(
                Job(lambda a=agent: self._turn(a, ids[a], question), True, agent, ids[agent])
            )

        def coordinator() -> None:
            brief = (
                f"Question: {question}\n\nTechnical said: {self.replies.get(ids['technical'], '')}"
                f"\n\nBusiness said: {self.replies.get(ids['business'], '')}"
            )
            self._turn("coordinator", ids["coordinator"], brief)

        self._queue(Job(coordinator, True, "coordinator", ids["coordinator"]))

    def cancel(self, agent_id: str) -> None:
        self.calls.cancels.append(agent_id)
        with self._lock:
            for job in self._pending:
                if job.agent_id == agent_id and not job.cancelled:
                    job.cancelled = True
                    if self.manual and job.gated:
                        self._gate.release()  # the skipped job still takes its permit
                    self.emit(TurnCancelled(agent_id, job.turn_id or 0))

    def export(self, agent_id: str, path: str | None = None, quant: str = "none") -> None:
        self.calls.exports.append(agent_id)
        target = path or f"/tmp/permeant-test/exports/{agent_id}.usxf"

        def job() -> None:
            self.emit(ExportProgress(agent_id, 0.5))
            if self.export_error:
                self.emit(ExportFailed(agent_id, self.export_error))
            else:
                self.emit(ExportProgress(agent_id, 1.0))
                self.emit(ExportDone(agent_id, target, 3_355_443, DIGEST, 42.0))

        self._queue(Job(job))

    def migrate(self, agent_id: str, target: str, pin: str | None = None,
                quant: str = "none", move: bool = False) -> None:
        self.migrations.append((agent_id, target, pin, quant, move))

        def job() -> None:
            self.emit(MigrationProgress(agent_id, "decision", "migrate 0.4 s vs re-prefill 6.1 s"))
            if target.startswith("bad"):
                self.emit(MigrationFailed(agent_id, "certificate fingerprint mismatch"))
            else:
                self.emit(MigrationDone(agent_id, target, "exact 16/16"))

        self._queue(Job(job))

    def save(self) -> None:
        self.calls.saves += 1
        self._queue(Job(lambda: self.emit(Saved(("technical", "business"), 7.0))))

    def reset(self, agent_id: str) -> None:
        self.calls.resets.append(agent_id)
        self._tokens[agent_id] = 0
        self._queue(Job(lambda: self.emit(AgentReset(agent_id))))

    def load_more(self, agent_id: str, before: int, count: int = 20) -> list[TurnView]:
        self.calls.load_more.append((agent_id, before, count))
        view = next(v for v in self.views if v.agent_id == agent_id)
        return list(view.turns[max(before - count, 0) : before])

    def stats(self) -> EngineStats:
        agents = tuple(
            self.agent_stats.get(view.agent_id) or self._agent_stats(view) for view in self.views
        )
        return EngineStats(
            ready=self.ready,
            model="SmolLM2-135M-Instruct" if self.ready else "",
            device="cpu",
            blas="OpenBLAS",
            weights_dtype="float32",
            workspace="/tmp/permeant-test",
            rss_bytes=412 * MB,
            mlx_active_bytes=96 * MB,
            mlx_peak_bytes=180 * MB,
            agents=agents,
        )

    def shutdown(self, cancel_running: bool = True, timeout: float = 30.0) -> None:
        self.calls.shutdowns += 1
        with self._lock:
            for job in self._pending:
                job.cancelled = True
        self._gate.release(1000)
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)
        self.emit(Saved(("technical",), 5.0))
        self.emit(Stopped())

    # test controls

    def emit(self, event: Event) -> None:
        self.events.append(event)
        if type(event) in STATE_AFTER:
            self.states[event.agent_id] = STATE_AFTER[type(event)]  # type: ignore[attr-defined]
        assert self.sink is not None, "connect() first"
        self.sink(event)

    def release(self, turns: int = 1) -> None:
        """Let `turns` gated turn jobs run (manual mode)."""
        self._gate.release(turns)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until every queued job that can run has run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                runnable = [j for j in self._pending if not (self.manual and j.gated)]
            if not runnable and self._jobs.unfinished_tasks == len(self._pending):
                return True
            time.sleep(0.005)
        return False

    # internals

    def _turn_id(self) -> int:
        with self._lock:
            turn_id, self._next_turn = self._next_turn, self._next_turn + 1
        return turn_id

    def _queue(self, job: Job) -> None:
        with self._lock:
            self._pending.append(job)
        self._jobs.put(job)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self.manual and job.gated:
                self._gate.acquire()
            with self._lock:
                self._pending.remove(job)
                cancelled = job.cancelled
            try:
                if not cancelled:
                    job.run()
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _start_job(self) -> None:
        for stage, fraction in (("imports", 0.1), ("weights", 0.5), ("tokenizer", 0.8)):
            self.emit(ModelLoading(stage, fraction))
        self.emit(ModelReady("SmolLM2-135M-Instruct", "cpu", "OpenBLAS", "float32",
                             CONTEXT_LIMIT, 850.0))
        for event in self.restored:
            self.emit(event)

    def _turn(self, agent_id: str, turn_id: int, text: str) -> None:
        cached = self._tokens.get(agent_id, 0)
        to_prefill = 24 + len(text.split())
        self.emit(TurnStarted(agent_id, turn_id, "snapshot", cached, to_prefill, text))
        self.emit(PrefillProgress(agent_id, turn_id, to_prefill // 2, to_prefill))
        self.emit(PrefillProgress(agent_id, turn_id, to_prefill, to_prefill))
        if agent_id in self.fail_next:
            kind, message = self.fail_next.pop(agent_id)
            self.emit(TurnFailed(agent_id, turn_id, kind, message))
            return
        reply = reply_for(agent_id, text.splitlines()[0] if text else "")
        words = reply.split(" ")
        for i in range(0, len(words), self.chunk_words):
            chunk = " ".join(words[i : i + self.chunk_words])
            self.emit(Tokens(agent_id, turn_id, chunk if i == 0 else " " + chunk, ()))
        self.replies[turn_id] = reply
        generated = len(words) * 2
        self._tokens[agent_id] = cached + to_prefill + generated
        self.emit(TurnDone(agent_id, turn_id, TurnResult(
            agent=agent_id, user=text, reply=reply, generated_ids=(), source="snapshot",
            cached=cached, prefilled=to_prefill, generated=generated,
            in_cache=self._tokens[agent_id], context_limit=CONTEXT_LIMIT,
            timing_ms={"ttft": 120.0}, decode_tok_s=18.9,
        )))

    def _agent_stats(self, view: AgentView) -> AgentStats:
        tokens = self._tokens.get(view.agent_id, 0)
        return AgentStats(
            agent_id=view.agent_id, role=view.role, title=view.title, tokens=tokens,
            bytes=tokens * 18_432, resident=view.agent_id != "coordinator",
            state=self.states.get(view.agent_id, "idle"),
            context_limit=CONTEXT_LIMIT, last_used=0.0,
            last_tok_s=18.9 if tokens else 0.0, last_ttft_ms=120.0 if tokens else 0.0,
            tok_s_history=(17.2, 18.1, 19.4, 18.6, 18.9) if tokens else (),
        )


async def settle(pilot, engine: FakeEngine, rounds: int = 3) -> None:
    """Let the fake finish what it can, then let the app handle the events it posted."""
    await asyncio.to_thread(engine.wait_idle)
    for _ in range(rounds):
        await pilot.pause()


async def wait_until(pilot, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await pilot.pause(0.01)


def with_stats(engine: FakeEngine, agent_id: str, **changes) -> None:
    view = next(v for v in engine.views if v.agent_id == agent_id)
    engine.agent_stats[agent_id] = replace(engine._agent_stats(view), **changes)


@pytest.fixture(autouse=True)
def no_cursor_blink(monkeypatch):
    """A steady cursor, so snapshots do not depend on when they are taken."""
    original = Input._on_mount

    def on_mount(self, event):
        self.cursor_blink = False
        return original(self, event)

    monkeypatch.setattr(Input, "_on_mount", on_mount)
