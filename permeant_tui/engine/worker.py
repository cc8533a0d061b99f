"""Engine: the one worker thread that owns every MLX call, its job queue, and events out.

Front ends (the TUI, the CLI, the demo, benchmarks) call Engine methods from any thread; each
returns at once (or hands back a Future) and the outcome arrives as events through the sink
given to `connect`. The worker never touches a widget; the TUI's sink only posts messages.
The methods are the public API (engine/api.py `EngineAPI`); what the worker does with each job
is engine/jobs.py; the model work behind it is the runner (engine/runner.py).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..paths import cache_dir, resolve_workspace
from .api import AgentView, EngineAPI, EventSink, ModelInfo, TurnView, WorkerContext
from .errors import ModelLoadError, NothingToDo, TurnCancelled
from .events import (
    AgentStats,
    EngineStats,
    Event,
    Notice,
    PrefillProgress,
    RestoreReport,
    Stopped,
    Tokens,
    TurnQueued,
    TurnResult,
)
from .events import TurnCancelled as TurnCancelledEvent
from .generation import TurnParams
from .jobs import Job, JobQueue, Worker, snapshot_warning
from .lock import WorkspaceLock
from .runner import MlxRunner, ModelRunner
from .runtime import MemoryFigures
from .settings import AgentSpec, WorkspaceSettings, check_generation
from .states import AgentStates
from .workspace import Workspace

if TYPE_CHECKING:
    from .models import LoadedModel
    from .usxf.reader import UsxfFile

T = TypeVar("T")


class Engine:
    def __init__(self, workspace: str | Path | None = None, model: str | None = None,
                 on_event: EventSink | None = None, max_resident: int | None = None,
                 memory_budget_mb: int | None = None, eager_restore: bool = True,
                 rebuild: bool = False, context_limit: int | None = None,
                 loaded: LoadedModel | None = None, runner: ModelRunner | None = None,
                 autosave: bool = True, purpose: str = "permeant",
                 workspace_lock: WorkspaceLock | None = None, batch: bool = True):
        """`loaded`: a model to use instead of loading one (tests, benchmarks). `runner`: the
        model runner (default: MLX; UI tests pass a scripted one). `autosave=False`: only
        eviction, save() and shutdown write snapshots, not every turn (tests). `purpose`: how
        the workspace lock names this process to a second writer (engine/lock.py);
        `workspace_lock`: that lock, already held by the caller (serve takes it before it
        recovers staging), released at shutdown like the engine's own. `batch=False`: turns
        of different agents queued together run one after another instead of in one batched
        decode (engine/batch.py; bench/team.py compares the two).

        The engine is the workspace's one writer: it takes the workspace lock before anything
        is read or written and holds it until `shutdown()` (WorkspaceBusy, exit 9, if another
        process holds it)."""
        self.folder = resolve_workspace(workspace)
        self._wlock = (workspace_lock or WorkspaceLock(self.folder, purpose)).acquire()
        try:
            ws = Workspace.open(self.folder)
        except BaseException:
            self._wlock.release()
            raise
        if max_resident is not None:
            ws.settings.max_resident = max_resident
        if memory_budget_mb is not None:
            ws.settings.memory_budget_mb = memory_budget_mb
        self._ws = ws
        self._runner = runner or MlxRunner(model if model is not None else ws.settings.model,
                                           context_limit=context_limit, preloaded=loaded,
                                           digest_cache=cache_dir() / "digests")
        self._sink = on_event
        self._lock = threading.Lock()  # guards the turn bookkeeping and the agent states
        self._states = AgentStates(ws.agents)
        self._jobs = JobQueue()
        self._worker = Worker(ws, self._runner, self._states, self._lock, self._emit,
                              eager=eager_restore, rebuild=rebuild, autosave=autosave,
                              batch=batch, jobs=self._jobs)
        ws.background_saves(lambda agent_id, exc: self._emit(  # saves land off the worker
            Notice("warning", snapshot_warning(agent_id, exc), agent_id)))  # (durable.py)
        self._queued: list[Job] = []  # turn jobs not yet started (for cancel)
        self._running: list[Job] = []  # the turn jobs in flight (several when batched)
        self._turn_seq = 0
        self._thread: threading.Thread | None = None
        self._mem = MemoryFigures(0, 0, 0)
        self._last_mem = 0.0
        self._stats = self._make_stats()

    # ---- front-end API (any thread) --------------------------------------------------------
    def connect(self, sink: EventSink) -> None:
        self._sink = sink

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="permeant-engine", daemon=True)
        self._thread.start()
        self._put(Job("load"))

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self._worker.ready.wait(timeout):
            raise TimeoutError("model did not load in time")
        if self._worker.load_error:
            raise ModelLoadError(self._worker.load_error)

    def on_worker_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def model_info(self) -> ModelInfo | None:
        w = self._worker
        lm = w.loaded
        if lm is None:
            return None
        return ModelInfo(lm.identity.name, lm.identity.fingerprint, str(lm.spec), w.device,
                         w.blas, lm.weights_mode, lm.context_limit,
                         w.timings.get("model_load", 0.0), lm.identity,
                         chat_format=lm.chat_format, base_model=lm.is_base_model)

    def agents(self) -> list[AgentView]:
        return [self._view(a.agent_id) for a in list(self._ws.agents.values())]

    def agent(self, agent_id: str) -> AgentView:
        return self._view(agent_id)

    def _view(self, agent_id: str) -> AgentView:
        a = self._ws.agent(agent_id)
        turns = tuple(TurnView(t.user, t.reply, t.stats) for t in list(a.turns))
        return AgentView(a.agent_id, a.role, a.title, a.system, turns)

    def settings(self) -> WorkspaceSettings:
        return self._ws.settings.copy()

    def load_more(self, agent_id: str, before: int, count: int = 20) -> list[TurnView]:
        turns = self._ws.agent(agent_id).turns
        lo = max(0, before - count)
        return [TurnView(t.user, t.reply, t.stats) for t in turns[lo:before]]

    def submit(self, agent_id: str, text: str, max_tokens: int | None = None,
               params: TurnParams | None = None) -> int:
        return self.submit_future(agent_id, text, max_tokens, params)[0]

    def submit_future(self, agent_id: str, text: str, max_tokens: int | None = None,
                      params: TurnParams | None = None) -> tuple[int, Future[TurnResult]]:
        job = self._queue_turn(agent_id, text, max_tokens, params)
        return job.turn_id, job.future

    def _queue_turn(self, agent_id: str, text: str, max_tokens: int | None,
                    params: TurnParams | None, put: bool = True) -> Job:
        self._ws.agent(agent_id)  # unknown agents fail here, in the caller's thread
        p = self.turn_params(agent_id, max_tokens, params)
        job = self._turn_job(agent_id, {"text": text, "params": p})
        self._emit(TurnQueued(agent_id, job.turn_id, text))
        if put:
            self._put(job)
        return job

    def prepare(self, agent_id: str, text: str) -> Future[int]:
        """The message box's text so far: the worker prefills it, as Enter would send it, into
        the agent's cache while it is idle, so Enter finds it cached (engine/drafts.py). Returns at once a
        Future of the tokens prefilled; only the newest text of an agent counts (one pending
        draft job per agent takes it), and any other job goes first."""
        self._ws.agent(agent_id)
        with self._lock:
            pending = self._worker.drafts.get(agent_id)
            job = pending[1] if pending else Job("prepare", agent_id)
            self._worker.drafts[agent_id] = (text, job)
        return job.future if pending else self._put(job)

    def turn_params(self, agent_id: str, max_tokens: int | None = None,
                    params: TurnParams | None = None) -> TurnParams:
        """What a turn of the agent samples with: `params`, else the agent's settings (greedy
        under PERMEANT_GREEDY=1: tests and benchmarks); `max_tokens` overrides either."""
        p = params or agent_params(self._ws.settings, agent_id)
        return replace(p, max_tokens=max_tokens) if max_tokens is not None else p

    def update_agent_settings(self, agent_id: str, **changes) -> Future[AgentSpec]:
        """Change the agent's generation settings (temp, top_p, repetition_penalty,
        max_tokens) and save them in workspace.json. Bad values raise WorkspaceError here, in
        the caller's thread, naming the field; nothing is changed then."""
        self._ws.agent(agent_id)
        checked = check_generation(changes)
        return self._put(Job("settings", agent_id, {"changes": checked}))

    def continue_reply(self, agent_id: str, max_tokens: int | None = None,
                       params: TurnParams | None = None) -> tuple[int, Future[TurnResult]]:
        return self._redo(agent_id, "continue", max_tokens, params)

    def regenerate(self, agent_id: str, max_tokens: int | None = None,
                   params: TurnParams | None = None) -> tuple[int, Future[TurnResult]]:
        return self._redo(agent_id, "regenerate", max_tokens, params)

    def _redo(self, agent_id: str, kind: str, max_tokens: int | None,
              params: TurnParams | None) -> tuple[int, Future[TurnResult]]:
        turns = self._ws.agent(agent_id).turns
        if not turns:
            raise NothingToDo(f"{agent_id} has no reply to {kind} yet")
        p = self.turn_params(agent_id, max_tokens, params)
        job = self._turn_job(agent_id, {"kind": kind, "params": p})
        self._emit(TurnQueued(agent_id, job.turn_id, turns[-1].user, kind))
        self._put(job)
        return job.turn_id, job.future

    def ask_team(self, question: str,
                 max_tokens: int | None = None) -> Future[dict[str, TurnResult]]:
        """Technical and business answer; then the coordinator synthesises both. The returned
        Future resolves to {agent_id: TurnResult}."""
        # The two answers are queued together so the worker can decode them in one batch.
        tech, biz = (self._queue_turn(a, question, max_tokens, None, put=False)
                     for a in ("technical", "business"))
        f_tech, f_biz = tech.future, biz.future
        job = self._turn_job("coordinator", {"team": (question, f_tech, f_biz),
                                             "params": self.turn_params("coordinator",
                                                                        max_tokens)})
        self._emit(TurnQueued("coordinator", job.turn_id, ""))
        self._jobs.put_all([tech, biz, job])
        team: Future[dict[str, TurnResult]] = Future()

        def collect(_) -> None:
            try:
                team.set_result({"technical": f_tech.result(), "business": f_biz.result(),
                                 "coordinator": job.future.result()})
            except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
                team.set_exception(exc)

        job.future.add_done_callback(collect)
        return team

    def cancel(self, agent_id: str) -> None:
        dropped: list[Job] = []
        with self._lock:
            running = any(j.agent_id == agent_id for j in self._running)
            for job in list(self._queued):
                if job.agent_id == agent_id:
                    job.cancel.set()
                    if not running:  # dropped now, not when the worker reaches it
                        self._queued.remove(job)
                        self._states.finished(agent_id, "cancelled", started=False)
                        dropped.append(job)
            for job in self._running:
                if job.agent_id == agent_id:
                    job.cancel.set()
        for job in dropped:
            self._emit(TurnCancelledEvent(agent_id, job.turn_id, None))
            job.future.set_exception(TurnCancelled("cancelled before it started"))

    def export(self, agent_id: str, path: str | None = None, quant: str = "none",
               fidelity: bool | int = True) -> Future[UsxfFile]:
        return self._put(Job("export", agent_id, {"path": path, "quant": quant,
                                                  "fidelity": fidelity}))

    def import_usxf(self, path: str, name: str | None = None) -> Future[dict]:
        return self._put(Job("import", None, {"path": path, "name": name}))

    def replay_fidelity(self, agent_id: str) -> Future[str]:
        self._ws.agent(agent_id)
        return self._put(Job("replay", agent_id))

    def save(self) -> Future[tuple[str, ...]]:
        return self._put(Job("save"))

    def reset(self, agent_id: str) -> Future[None]:
        self._ws.agent(agent_id)
        return self._put(Job("reset", agent_id))

    # roster (engine/roster.py): on the worker once it runs, else here (nothing to race with)
    def add_agent(self, agent_id: str, role: str, system: str,
                  title: str | None = None) -> Future[AgentView]:
        from . import roster

        return self._roster(lambda: self._view(
            roster.add_agent(self._ws, agent_id, role, system, title).agent_id))

    def rename_agent(self, old: str, new: str) -> Future[AgentView]:
        from . import roster

        self._ws.agent(old)
        return self._roster(lambda: self._view(
            roster.rename_agent(self._ws, *self._idle(old, new)).agent_id), idle=old)

    def remove_agent(self, agent_id: str) -> Future[Path]:
        from . import roster

        self._ws.agent(agent_id)
        return self._roster(lambda: roster.remove_agent(self._ws, self._idle(agent_id)[0]),
                            idle=agent_id)

    def _idle(self, agent_id: str, *rest: str) -> tuple[str, ...]:
        from .errors import WorkspaceError
        from .states import BUSY

        with self._lock:
            if self._states[agent_id] in BUSY:
                raise WorkspaceError(f"agent '{agent_id}' has a turn queued or running; "
                                     f"cancel it or wait")
        return (agent_id, *rest)

    def _roster(self, fn: Callable[[], T], idle: str | None = None) -> Future[T]:
        """Run fn on the worker once it runs (else here). `idle`: an agent that must have no
        turn queued or running, checked now (the worker may be busy with that very turn) and
        again when fn runs."""
        fut: Future[T] = Future()
        try:
            if idle is not None:
                self._idle(idle)
            if self._thread is not None:
                return self.call(lambda _ctx: fn())
            fut.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            fut.set_exception(exc)
        return fut

    def restore(self, agent_id: str) -> Future[RestoreReport]:
        """Make the agent's KV state resident (memory, USXF import, snapshot or prefill)."""
        self._ws.agent(agent_id)
        return self.call(lambda ctx: ctx.restore(agent_id))

    def call(self, fn: Callable[[WorkerContext], T]) -> Future[T]:
        """Run fn(ctx) on the worker (benchmarks, tests, advanced commands)."""
        return self._put(Job("call", None, {"fn": fn}))

    def stats(self) -> EngineStats:
        """The figures of the last refresh (after each job, twice a second while decoding),
        with the agents' turn states as of now."""
        s = self._stats
        with self._lock:
            agents = tuple(a if a.state == self._states[a.agent_id]
                           else replace(a, state=self._states[a.agent_id]) for a in s.agents)
        return replace(s, agents=agents, rss_bytes=self._runner.rss() or s.rss_bytes)

    def shutdown(self, cancel_running: bool = True, timeout: float = 60.0) -> None:
        if self._thread is None:
            self._wlock.release()
            return
        try:
            self._stop(cancel_running, timeout)
        finally:
            self._wlock.release()

    def _stop(self, cancel_running: bool, timeout: float) -> None:
        with self._lock:
            for job in self._queued:
                job.cancel.set()
            for job in self._running if cancel_running else ():
                job.cancel.set()
        self._put(Job("stop"))
        thread = self._thread
        assert thread is not None
        tid = thread.native_id
        thread.join(timeout)
        self._thread = None
        _wait_native_exit(tid)

    # ---- the queue and the worker thread ---------------------------------------------------
    def _put(self, job: Job) -> Future:
        self._jobs.put(job)
        return job.future

    def _turn_job(self, agent_id: str, payload: dict) -> Job:
        self._ws.agent(agent_id)
        with self._lock:
            self._turn_seq += 1
            job = Job("turn", agent_id, payload, turn_id=self._turn_seq)
            self._queued.append(job)
            self._states.submitted(agent_id)
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
            group = [job]
            try:
                if job.kind == "stop":
                    self._final_save()
                    self._ws.close()  # every save durable (a failure was said), the thread ends
                    self._emit(Stopped())
                    job.future.set_result(None)
                    return
                if job.kind == "turn":
                    with self._lock:
                        if job not in self._queued:  # dropped by cancel() while queued
                            continue
                    group = self._jobs.group(job, self._worker.max_batch())
                    with self._lock:  # a follower may have been dropped meanwhile too
                        group = [j for j in group if j in self._queued]
                        for j in group:
                            self._queued.remove(j)
                        self._running = group
                    self._worker.turns(group)
                else:
                    self._worker.handle(job)
            except BaseException as exc:  # noqa: BLE001 - the worker must survive everything
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(exc)
                if job.kind != "turn":
                    self._emit(Notice("error", f"{job.kind} failed: {exc}", job.agent_id))
            finally:
                if job.kind == "turn":
                    with self._lock:
                        self._running = []
                self._refresh_stats(memory=True)

    def _final_save(self) -> None:
        """The last save before the worker exits. Whatever fails here is reported and the
        worker still stops: a stop that cannot finish would keep `shutdown()` waiting for its
        whole timeout (issue 15: 65 s after a save error)."""
        try:
            self._worker.save(Job("save"))
        except BaseException as exc:  # noqa: BLE001 - reported; the transcripts are durable
            self._emit(Notice("error", f"save at shutdown failed: {exc}; the agents will be "
                                       "rebuilt from their transcripts"))

    # ---- stats -----------------------------------------------------------------------------
    def _refresh_stats(self, memory: bool = False) -> None:
        if memory:
            self._mem = self._runner.memory()
        self._stats = self._make_stats()

    def _make_stats(self) -> EngineStats:
        w = self._worker
        lm = w.loaded
        limit = lm.context_limit if lm else 0
        with self._lock:
            states = {a: self._states[a] for a in list(self._ws.agents)}
        agents = tuple(
            AgentStats(a.agent_id, a.role, a.title,
                       len(a.cache_ids) if a.resident else a.tokens_on_disk,
                       a.cache_bytes() if a.resident else a.bytes_on_disk, a.resident,
                       states[a.agent_id], limit, a.last_used, a.last_tok_s, a.last_ttft_ms,
                       tuple(a.tok_s_history))
            for a in list(self._ws.agents.values()) if a.agent_id in states)
        return EngineStats(
            ready=lm is not None, model=lm.identity.name if lm else "loading...",
            device=w.device, blas=w.blas or self._runner.blas(),
            weights_dtype=lm.weights_mode if lm else "", workspace=str(self.folder),
            rss_bytes=self._mem.rss_bytes, mlx_active_bytes=self._mem.mlx_active_bytes,
            mlx_peak_bytes=self._mem.mlx_peak_bytes, agents=agents)


def agent_params(settings: WorkspaceSettings, agent_id: str) -> TurnParams:
    """The agent's own sampling settings as TurnParams. PERMEANT_GREEDY=1 makes every such
    turn greedy and unpenalised (the test suite sets it; `--temp` passes explicit params)."""
    spec = settings.agent(agent_id)
    max_tokens = (spec.max_tokens if spec else None) or settings.max_tokens
    restates = spec is not None and spec.role == "coordinator"  # drafts from its context
    if spec is None or os.environ.get("PERMEANT_GREEDY") == "1":
        return TurnParams(max_tokens=max_tokens, lookup=restates)
    return TurnParams(max_tokens=max_tokens, temp=spec.temp, top_p=spec.top_p,
                      repetition_penalty=spec.repetition_penalty, lookup=restates)


if TYPE_CHECKING:
    _implements_the_api: type[EngineAPI] = Engine  # mypy checks Engine against EngineAPI


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
