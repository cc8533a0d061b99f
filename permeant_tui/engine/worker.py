"""Engine: the one worker thread that owns every MLX call, its job queue, and events out.

Front ends (the TUI, the CLI, the demo, benchmarks) call Engine methods from any thread; each
returns at once (or hands back a Future) and the outcome arrives as events through the sink
given to `connect`. The worker never touches a widget; the TUI's sink only posts messages.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..paths import cache_dir, resolve_workspace
from . import runtime
from .agent import Agent
from .client import AgentView, EventSink, TurnView
from .errors import PermeantError, TurnCancelled
from .events import (
    AgentReset,
    AgentRestored,
    AgentStats,
    EngineStats,
    Event,
    ExportDone,
    ExportFailed,
    ExportProgress,
    ModelFailed,
    ModelLoading,
    ModelReady,
    Notice,
    PrefillProgress,
    Saved,
    Stopped,
    Tokens,
    TurnDone,
    TurnFailed,
    TurnQueued,
    TurnStarted,
)
from .events import (
    TurnCancelled as TurnCancelledEvent,
)
from .generation import TurnParams, run_turn
from .workspace import Workspace

TEAM_BRIEF = (
    "The team was asked: {question}\n\n"
    "Technical expert's answer:\n{technical}\n\n"
    "Business analyst's answer:\n{business}\n\n"
    "Synthesize both perspectives into one prioritized action plan."
)


@dataclass
class _Job:
    kind: str
    agent_id: str | None = None
    payload: dict = field(default_factory=dict)
    future: Future = field(default_factory=Future)
    turn_id: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)


class Engine:
    def __init__(self, workspace: str | Path | None = None, model: str | None = None,
                 on_event: EventSink | None = None, max_resident: int | None = None,
                 memory_budget_mb: int | None = None, eager_restore: bool = True,
                 rebuild: bool = False, context_limit: int | None = None,
                 loaded=None):
        self.folder = resolve_workspace(workspace)
        self.ws = Workspace.open(self.folder)
        if max_resident is not None:
            self.ws.settings.max_resident = max_resident
        if memory_budget_mb is not None:
            self.ws.settings.memory_budget_mb = memory_budget_mb
        self.model_spec = model if model is not None else self.ws.settings.model
        self.loaded = None
        self._preloaded = loaded  # a LoadedModel to use instead of loading (tests, benchmarks)
        self._sink = on_event
        self._eager = eager_restore
        self._rebuild = rebuild
        self._context_limit = context_limit
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._queued: list[_Job] = []  # turn jobs not yet started (for cancel)
        self._running: _Job | None = None
        self._lock = threading.Lock()
        self._turn_seq = 0
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: str | None = None
        self._mem = runtime.MemoryFigures(0, 0, 0)
        self._last_mem = 0.0
        self._device = ""  # runtime.device_label(), once the model is loaded
        self.autosave = True  # tests turn it off: then only eviction and shutdown write snapshots
        self._first_turn = True  # the first turn's timing_ms reports the model load
        self.timings: dict[str, float] = {}
        self._stats = self._make_stats()

    # ---- front-end API (any thread) --------------------------------------------------------
    def connect(self, sink: EventSink) -> None:
        self._sink = sink

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="permeant-engine", daemon=True)
        self._thread.start()
        self._put(_Job("load"))

    def agents(self) -> list[AgentView]:
        out = []
        for a in self.ws.agents.values():
            turns = tuple(TurnView(t.user, t.reply) for t in a.turns)  # the UI shows the last 20
            out.append(AgentView(a.agent_id, a.role, a.title, a.system, turns))
        return out

    def load_more(self, agent_id: str, before: int, count: int = 20) -> list[TurnView]:
        turns = self.ws.agent(agent_id).turns
        lo = max(0, before - count)
        return [TurnView(t.user, t.reply) for t in turns[lo:before]]

    def submit(self, agent_id: str, text: str, max_tokens: int | None = None,
               params: TurnParams | None = None) -> int:
        return self.submit_future(agent_id, text, max_tokens, params)[0]

    def submit_future(self, agent_id: str, text: str, max_tokens: int | None = None,
                      params: TurnParams | None = None) -> tuple[int, Future]:
        self.ws.agent(agent_id)  # unknown agents fail here, in the caller's thread
        p = params or TurnParams(max_tokens=max_tokens or self.ws.settings.max_tokens)
        if max_tokens is not None:
            p = replace(p, max_tokens=max_tokens)
        job = self._turn_job(agent_id, {"text": text, "params": p})
        self._emit(TurnQueued(agent_id, job.turn_id, text))
        self._put(job)
        return job.turn_id, job.future

    def ask_team(self, question: str, max_tokens: int | None = None) -> Future:
        """Technical and business answer; then the coordinator synthesises both. The returned
        Future resolves to {agent_id: TurnResult}."""
        _, f_tech = self.submit_future("technical", question, max_tokens)
        _, f_biz = self.submit_future("business", question, max_tokens)
        job = self._turn_job("coordinator", {"team": (question, f_tech, f_biz),
                                             "max_tokens": max_tokens})
        self._emit(TurnQueued("coordinator", job.turn_id, ""))
        self._put(job)
        team: Future = Future()

        def collect(_):
            try:
                team.set_result({"technical": f_tech.result(), "business": f_biz.result(),
                                 "coordinator": job.future.result()})
            except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
                team.set_exception(exc)

        job.future.add_done_callback(collect)
        return team

    def cancel(self, agent_id: str) -> None:
        with self._lock:
            for job in self._queued:
                if job.agent_id == agent_id:
                    job.cancel.set()
            if self._running is not None and self._running.agent_id == agent_id:
                self._running.cancel.set()

    def export(self, agent_id: str, path: str | None = None, quant: str = "none",
               fidelity: bool = True) -> Future:
        job = _Job("export", agent_id, {"path": path, "quant": quant, "fidelity": fidelity})
        self._put(job)
        return job.future

    def import_usxf(self, path: str, name: str | None = None) -> Future:
        job = _Job("import", None, {"path": path, "name": name})
        self._put(job)
        return job.future

    def migrate(self, agent_id: str, target: str, pin: str | None = None,
                quant: str = "none", move: bool = False) -> None:
        """Run a live migration on its own thread (it waits on the network and on this
        engine's worker for the export, so it must not run on the worker)."""
        from .events import MigrationDone, MigrationFailed, MigrationProgress

        def progress(stage: str, info: dict) -> None:
            if stage == "transfer":
                return  # per chunk: too chatty for notifications
            detail = ", ".join(f"{k} {v}" for k, v in info.items() if not isinstance(v, dict))
            self._emit(MigrationProgress(agent_id, stage, detail[:300]))

        def run() -> None:
            from ..migrate import migrate_agent

            try:
                report = migrate_agent(self, agent_id, target, pin, quant, move, progress)
                self._emit(MigrationDone(agent_id, target, str(getattr(report, "fidelity", ""))
                                         or "committed"))
            except Exception as exc:  # noqa: BLE001 - reported to the person
                self._emit(MigrationFailed(agent_id, str(exc) or type(exc).__name__))

        threading.Thread(target=run, name=f"migrate-{agent_id}", daemon=True).start()

    def save(self) -> Future:
        job = _Job("save")
        self._put(job)
        return job.future

    def reset(self, agent_id: str) -> Future:
        job = _Job("reset", agent_id)
        self._put(job)
        return job.future

    def call(self, fn) -> Future:
        """Run fn(engine) on the worker (benchmarks, tests, advanced commands)."""
        job = _Job("call", None, {"fn": fn})
        self._put(job)
        return job.future

    # TEMP shim for migrate (lead: drop at merge): engine/api.py's contract names, minimal.
    def on_worker_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def model_info(self):
        lm = self.loaded
        return None if lm is None else _ShimModelInfo(lm.identity.name, lm.identity,
                                                      lm.context_limit, lm.weights_mode)

    def agent(self, agent_id: str) -> AgentView:
        a = self.ws.agent(agent_id)
        return AgentView(a.agent_id, a.role, a.title, a.system,
                         tuple(TurnView(t.user, t.reply) for t in a.turns))

    def restore(self, agent_id: str) -> Future:
        """Make the agent's KV state resident (memory, USXF import, snapshot or prefill)."""
        return self.call(lambda e: e._restore(e.ws.agent(agent_id)))

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self._ready.wait(timeout):
            raise TimeoutError("model did not load in time")
        if self._load_error:
            from .errors import ModelLoadError

            raise ModelLoadError(self._load_error)

    def stats(self) -> EngineStats:
        import psutil

        s = self._stats
        try:
            rss = psutil.Process().memory_info().rss
        except psutil.Error:
            rss = s.rss_bytes
        return replace(s, rss_bytes=rss)

    def shutdown(self, cancel_running: bool = True, timeout: float = 60.0) -> None:
        if self._thread is None:
            return
        with self._lock:
            for job in self._queued:
                job.cancel.set()
            if cancel_running and self._running is not None:
                self._running.cancel.set()
        self._put(_Job("stop"))
        tid = self._thread.native_id
        self._thread.join(timeout)
        self._thread = None
        _wait_native_exit(tid)

    # ---- worker thread -------------------------------------------------------------------
    def _put(self, job: _Job) -> None:
        self._jobs.put(job)

    def _turn_job(self, agent_id: str, payload: dict) -> _Job:
        with self._lock:
            self._turn_seq += 1
            job = _Job("turn", agent_id, payload, turn_id=self._turn_seq)
            self._queued.append(job)
            self.ws.agent(agent_id).state = "queued"
        return job

    def _emit(self, event: Event) -> None:
        if isinstance(event, (PrefillProgress, Tokens)):
            now = time.perf_counter()
            if now - self._last_mem > 0.5:  # refresh gauges while decoding
                self._last_mem = now
                self._refresh_stats(memory=True)
        sink = self._sink
        if sink is not None:
            try:
                sink(event)
            except Exception:  # a broken sink must not kill the worker
                traceback.print_exc()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job.kind == "stop":
                    try:
                        self._do_save(_Job("save"))
                    finally:
                        self._emit(Stopped())
                        job.future.set_result(None)
                    return
                getattr(self, f"_do_{job.kind}")(job)
            except BaseException as exc:  # noqa: BLE001 - the worker must survive everything
                if not job.future.done():
                    job.future.set_exception(exc)
                if job.kind != "turn":
                    self._emit(Notice("error", f"{job.kind} failed: {exc}", job.agent_id))
            finally:
                self._refresh_stats(memory=True)

    def _do_call(self, job: _Job) -> None:
        job.future.set_result(job.payload["fn"](_ShimWorkerContext(self)))

    def _do_load(self, job: _Job) -> None:
        from .models import load_model

        t0 = time.perf_counter()
        try:
            self.loaded = self._preloaded or load_model(
                self.model_spec, digest_cache=cache_dir() / "digests",
                context_limit=self._context_limit,
                progress=lambda stage, f: self._emit(ModelLoading(stage, f)))
        except BaseException as exc:
            self._load_error = str(exc)
            self._ready.set()
            self._emit(ModelFailed(str(exc)))
            raise
        self.timings["model_load"] = (time.perf_counter() - t0) * 1000
        lm = self.loaded
        self._device = runtime.device_label()
        self._emit(ModelReady(lm.identity.name, self._device, runtime.blas_label(),
                              lm.weights_mode, lm.context_limit, self.timings["model_load"]))
        for w in self.ws.warnings:
            self._emit(Notice("warning", w))
        self._ready.set()
        job.future.set_result(lm)
        if self._eager:
            self._emit(ModelLoading("agents", 0.95))
            by_recent = sorted(self.ws.agents.values(), key=lambda a: -a.last_used)
            for agent in by_recent[: self.ws.settings.max_resident]:
                self._restore(agent)

    def _restore(self, agent: Agent):
        was_resident = agent.resident
        r = self.ws.ensure_resident(agent, self.loaded, rebuild=self._rebuild and not was_resident)
        self.timings["restore"] = r.ms
        if not was_resident:
            self._emit(AgentRestored(agent.agent_id, r.source, r.ms, r.tokens, r.reason))
        return r

    def _need_model(self) -> None:
        if self.loaded is None:
            from .errors import ModelLoadError

            raise ModelLoadError(f"model not loaded: {self._load_error or 'still loading'}")

    def _do_turn(self, job: _Job) -> None:
        agent = self.ws.agent(job.agent_id)
        with self._lock:
            if job in self._queued:
                self._queued.remove(job)
            self._running = job
        try:
            if job.cancel.is_set():
                raise TurnCancelled("cancelled before it started")
            self._need_model()
            payload = job.payload
            if "team" in payload:
                question, f_tech, f_biz = payload["team"]
                try:
                    tech, biz = f_tech.result(), f_biz.result()
                except BaseException as exc:
                    raise PermeantError(f"team: the coordinator needs both answers ({exc})") \
                        from None
                text = TEAM_BRIEF.format(question=question, technical=tech.reply,
                                         business=biz.reply)
                params = TurnParams(max_tokens=payload.get("max_tokens")
                                    or self.ws.settings.max_tokens)
            else:
                text, params = payload["text"], payload["params"]
            agent.state = "prefilling"
            restore = self._restore(agent)
            source = restore.source

            def on_start(cached, todo):
                self._emit(TurnStarted(agent.agent_id, job.turn_id, source, cached, todo, text))

            def emit(ev):
                if isinstance(ev, Tokens):
                    agent.state = "generating"
                self._emit(ev)

            result = run_turn(self.loaded.model, self.loaded.tokenizer, agent, text, params,
                              context_limit=self.loaded.context_limit, turn_id=job.turn_id,
                              emit=emit, cancel=job.cancel, source=source, on_start=on_start)
            # Durable first: the transcript line, then the snapshot.
            self.ws.append_turn(agent, agent.turns[-1])
            t = time.perf_counter()
            self.ws.enforce_residency(self.loaded, keep=agent)
            if self.autosave:
                self.ws.save_agent(agent, self.loaded)
            timing = dict(result.timing_ms)
            timing["model_load"] = self.timings.get("model_load", 0.0) if self._first_turn else 0.0
            timing["restore"] = restore.ms
            timing["save"] = (time.perf_counter() - t) * 1000  # this agent's and any evictee's
            self._first_turn = False
            result = replace(result, timing_ms=timing)
            agent.state = "done"
            agent.attach_used = True
            self._emit(TurnDone(agent.agent_id, job.turn_id, result))
            job.future.set_result(result)
        except TurnCancelled as exc:
            agent.state = "idle"
            self._emit(TurnCancelledEvent(agent.agent_id, job.turn_id))
            job.future.set_exception(exc)
        except BaseException as exc:
            agent.state = "failed"
            self._emit(TurnFailed(agent.agent_id, job.turn_id, type(exc).__name__, str(exc)))
            job.future.set_exception(exc)
        finally:
            with self._lock:
                self._running = None

    def _do_save(self, job: _Job) -> None:
        if self.loaded is None:
            job.future.set_result(())
            return
        t = time.perf_counter()
        saved = []
        for agent in self.ws.agents.values():
            if self.ws.save_agent(agent, self.loaded) is not None:
                saved.append(agent.agent_id)
        self._emit(Saved(tuple(saved), (time.perf_counter() - t) * 1000))
        job.future.set_result(tuple(saved))

    def _do_reset(self, job: _Job) -> None:
        agent = self.ws.agent(job.agent_id)
        self.ws.reset(agent)
        agent.state = "idle"
        self._emit(AgentReset(agent.agent_id))
        job.future.set_result(None)

    def _do_export(self, job: _Job) -> None:
        from .exchange import export_agent

        agent = self.ws.agent(job.agent_id)
        try:
            self._need_model()
            self._restore(agent)
            t = time.perf_counter()
            info = export_agent(self, agent, job.payload["path"], job.payload["quant"],
                                fidelity=job.payload["fidelity"],
                                progress=lambda f: self._emit(ExportProgress(agent.agent_id, f)))
            ms = (time.perf_counter() - t) * 1000
            self._emit(ExportDone(agent.agent_id, str(info.path), info.size, info.digest, ms))
            job.future.set_result(info)
        except BaseException as exc:
            self._emit(ExportFailed(agent.agent_id, str(exc)))
            raise

    def _do_import(self, job: _Job) -> None:
        from .exchange import import_usxf

        self._need_model()
        job.future.set_result(import_usxf(self, job.payload["path"], job.payload["name"]))

    # ---- stats -----------------------------------------------------------------------------
    def _refresh_stats(self, memory: bool = False) -> None:
        if memory:
            self._mem = runtime.memory_figures()
        self._stats = self._make_stats()

    def _make_stats(self) -> EngineStats:
        lm = self.loaded
        limit = lm.context_limit if lm else 0
        agents = tuple(
            AgentStats(a.agent_id, a.role, a.title, len(a.cache_ids) if a.resident
                       else a.tokens_on_disk, a.cache_bytes(), a.resident, a.state, limit,
                       a.last_used, a.last_tok_s, a.last_ttft_ms, tuple(a.tok_s_history))
            for a in self.ws.agents.values())
        return EngineStats(
            ready=lm is not None, model=lm.identity.name if lm else "loading...",
            device=self._device, blas=runtime.blas_label(),
            weights_dtype=lm.weights_mode if lm else "", workspace=str(self.folder),
            rss_bytes=self._mem.rss_bytes, mlx_active_bytes=self._mem.mlx_active_bytes,
            mlx_peak_bytes=self._mem.mlx_peak_bytes, agents=agents)


@dataclass(frozen=True)
class _ShimModelInfo:  # TEMP shim for migrate (lead: drop at merge)
    name: str
    identity: object
    context_limit: int
    weights_mode: str


class _ShimWorkerContext:
    """TEMP shim for migrate (lead: drop at merge): api.py's WorkerContext. Other attributes
    fall through to the engine so today's fn(engine) callers keep working."""

    def __init__(self, engine: Engine):
        self._engine = engine

    @property
    def model(self):
        self._engine._need_model()
        return self._engine.loaded

    @property
    def workspace(self) -> Workspace:
        return self._engine.ws

    def restore(self, agent_id: str):
        self._engine._need_model()
        return self._engine._restore(self._engine.ws.agent(agent_id))

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def _wait_native_exit(tid: int | None, timeout: float = 5.0) -> None:
    """Thread.join() returns before the C runtime runs the thread's TLS destructors; MLX's take
    the GIL there, and if the interpreter is finalizing by then the process aborts ("terminate
    called without an active exception", exit 134, seen in about half of quick CLI exits on
    Linux). Waiting for the OS thread to vanish (a few ms) avoids it."""
    import os

    if tid is None:
        return
    deadline = time.monotonic() + timeout
    if os.path.isdir("/proc/self/task"):
        while os.path.exists(f"/proc/self/task/{tid}") and time.monotonic() < deadline:
            time.sleep(0.005)
    else:
        time.sleep(0.05)

