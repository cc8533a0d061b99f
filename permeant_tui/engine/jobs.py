"""What the engine's worker thread does with each job: load, turn, save, reset, export, import,
fidelity replay, call. Runs on the worker only; the model work goes through the runner
(engine/runner.py), events out through `emit`, agent states through engine/states.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .agent import Agent
from .api import WorkerContext
from .errors import ModelLoadError, PermeantError, TurnCancelled
from .events import (
    AgentReset,
    AgentRestored,
    Event,
    ExportDone,
    ExportFailed,
    ExportProgress,
    ModelFailed,
    ModelLoading,
    ModelReady,
    Notice,
    RestoreReport,
    Saved,
    Tokens,
    TurnDone,
    TurnFailed,
    TurnStarted,
)
from .events import TurnCancelled as TurnCancelledEvent
from .generation import TurnParams
from .runner import ModelRunner
from .settings import save_settings
from .states import AgentStates, Outcome
from .workspace import Workspace

if TYPE_CHECKING:
    from .models import LoadedModel

TEAM_BRIEF = (
    "The team was asked: {question}\n\n"
    "Technical expert's answer:\n{technical}\n\n"
    "Business analyst's answer:\n{business}\n\n"
    "Synthesize both perspectives into one prioritized action plan."
)


def snapshot_warning(agent_id: str, exc: BaseException) -> str:
    why = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:160] or type(exc).__name__
    return (f"{agent_id}: the turn is recorded, but its KV snapshot could not be written "
            f"({why}); it will be rebuilt from the transcript")


@dataclass
class Job:
    kind: str  # load | turn | save | reset | export | import | replay | call | settings | stop
    agent_id: str | None = None
    payload: dict = field(default_factory=dict)
    future: Future = field(default_factory=Future)
    turn_id: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)


class Worker:
    """The worker thread's side of the engine. `Engine` (engine/worker.py) owns the queue and
    the thread and calls `handle(job)` for each job in order."""

    def __init__(self, ws: Workspace, runner: ModelRunner, states: AgentStates,
                 lock: threading.Lock, emit: Callable[[Event], None], *, eager: bool,
                 rebuild: bool, autosave: bool) -> None:
        self.ws, self.runner, self.states, self.lock, self.emit = ws, runner, states, lock, emit
        self.eager, self.rebuild, self.autosave = eager, rebuild, autosave
        self.loaded: LoadedModel | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.device = self.blas = ""
        self.timings: dict[str, float] = {}
        self._first_turn = True  # the first turn's timing_ms reports the model load
        self._handlers: dict[str, Callable[[Job], None]] = {
            "load": self.load, "turn": self.turn, "save": self.save, "reset": self.reset,
            "export": self.export, "import": self.import_usxf, "replay": self.replay_fidelity,
            "call": self.call, "settings": self.agent_settings,
        }

    def handle(self, job: Job) -> None:
        self._handlers[job.kind](job)

    # ---- model and residency ---------------------------------------------------------------
    def need_model(self) -> LoadedModel:
        if self.loaded is None:
            raise ModelLoadError(f"model not loaded: {self.load_error or 'still loading'}")
        return self.loaded

    def load(self, job: Job) -> None:
        t0 = time.perf_counter()
        try:
            lm = self.runner.load(lambda stage, f: self.emit(ModelLoading(stage, f)))
        except BaseException as exc:
            self.load_error = str(exc)
            with self.lock:
                self.states.model_failed()
            self.ready.set()
            self.emit(ModelFailed(str(exc)))
            raise
        self.timings["model_load"] = (time.perf_counter() - t0) * 1000
        self.device, self.blas = self.runner.device(), self.runner.blas()
        self.loaded = lm
        with self.lock:
            self.states.model_ready()
        self.emit(ModelReady(lm.identity.name, self.device, self.blas, lm.weights_mode,
                             lm.context_limit, self.timings["model_load"]))
        for w in self.ws.warnings:
            self.emit(Notice("warning", w))
        self.ready.set()
        job.future.set_result(lm)
        if self.eager:
            self.emit(ModelLoading("agents", 0.95))
            by_recent = sorted(self.ws.agents.values(), key=lambda a: -a.last_used)
            for agent in by_recent[: self.ws.settings.max_resident]:
                self.restore(agent)

    def restore(self, agent: Agent) -> RestoreReport:
        """Make the agent resident, then apply the residency limits (evicting others)."""
        self.need_model()
        was_resident = agent.resident
        r = self.runner.ensure_resident(self.ws, agent,
                                        rebuild=self.rebuild and not was_resident)
        self.enforce_residency(keep=agent)
        self.timings["restore"] = r.ms
        if not was_resident:
            self.emit(AgentRestored(agent.agent_id, r.source, r.ms, r.tokens, r.reason))
        return r

    def enforce_residency(self, keep: Agent | None = None) -> list[str]:
        return self.ws.enforce_residency(self.save_agent, keep)

    def save_agent(self, agent: Agent) -> float | None:
        """Write the agent's snapshot. A snapshot is a cache of the transcript: when it cannot
        be written (a full or read-only disk) the turn stays recorded, the agent stays dirty,
        and a warning says so; the next start rebuilds it from the transcript."""
        try:
            return self.runner.save_agent(self.ws, agent)
        except (OSError, RuntimeError) as exc:  # mlx reports a failed write as RuntimeError
            self.emit(Notice("warning", snapshot_warning(agent.agent_id, exc), agent.agent_id))
            return None

    # ---- a turn ----------------------------------------------------------------------------
    def _turn_input(self, job: Job) -> tuple[str, TurnParams]:
        payload = job.payload
        if payload.get("kind", "new") != "new":  # continue / regenerate: the last message
            turns = self.ws.agent(job.agent_id or "").turns
            return (turns[-1].user if turns else ""), payload["params"]
        if "team" not in payload:
            return payload["text"], payload["params"]
        question, f_tech, f_biz = payload["team"]
        try:
            tech, biz = f_tech.result(), f_biz.result()
        except BaseException as exc:
            raise PermeantError(f"team: the coordinator needs both answers ({exc})") from None
        text = TEAM_BRIEF.format(question=question, technical=tech.reply, business=biz.reply)
        return text, payload["params"]

    def _finished(self, agent_id: str, outcome: Outcome, started: bool) -> None:
        with self.lock:
            self.states.finished(agent_id, outcome, started)

    def turn(self, job: Job) -> None:
        assert job.agent_id is not None
        agent_id = job.agent_id
        agent = self.ws.agent(agent_id)
        started = False
        try:
            if job.cancel.is_set():
                raise TurnCancelled("cancelled before it started")
            self.need_model()
            text, params = self._turn_input(job)
            with self.lock:
                self.states.started(agent_id)
            started = True
            restore = self.restore(agent)
            source = restore.source

            kind = job.payload.get("kind", "new")

            def on_start(cached: int, todo: int) -> None:
                self.emit(TurnStarted(agent_id, job.turn_id, source, cached, todo, text, kind))

            def emit(ev: Event) -> None:
                if isinstance(ev, Tokens) and self.states[agent_id] == "prefilling":
                    with self.lock:
                        self.states.generating(agent_id)
                self.emit(ev)

            result = self.runner.run_turn(agent, text, params, turn_id=job.turn_id, emit=emit,
                                          cancel=job.cancel, source=source, on_start=on_start,
                                          kind=kind)
            # Durable first: the transcript line, then the snapshot.
            self.ws.append_turn(agent, agent.turns[-1], replaces_last=kind != "new")
            t = time.perf_counter()
            self.enforce_residency(keep=agent)
            if self.autosave:
                self.save_agent(agent)
            timing = dict(result.timing_ms)
            timing["model_load"] = self.timings.get("model_load", 0.0) if self._first_turn else 0.0
            timing["restore"] = restore.ms
            timing["save"] = (time.perf_counter() - t) * 1000  # this agent's and any evictee's
            self._first_turn = False
            result = replace(result, timing_ms=timing)
            agent.attach_used = True
            self._finished(agent_id, "done", started)
            self.emit(TurnDone(agent_id, job.turn_id, result))
            job.future.set_result(result)
        except TurnCancelled as exc:
            self._finished(agent_id, "cancelled", started)
            rewind = getattr(exc, "rewind", None)  # how the cache went back (generation.py)
            self.emit(TurnCancelledEvent(agent_id, job.turn_id, rewind))
            job.future.set_exception(exc)
        except BaseException as exc:
            self._finished(agent_id, "failed", started)
            self.emit(TurnFailed(agent_id, job.turn_id, type(exc).__name__, str(exc)))
            job.future.set_exception(exc)

    # ---- the other jobs ----------------------------------------------------------------------
    def save(self, job: Job) -> None:
        if self.loaded is None:
            job.future.set_result(())
            return
        saved, ms, failed = [], 0.0, []
        for agent in list(self.ws.agents.values()):
            try:
                took = self.save_agent(agent)
            except Exception as exc:  # noqa: BLE001 - one agent's failure must not stop the rest
                failed.append(f"{agent.agent_id}: {exc}")
                continue
            if took is not None:
                saved.append(agent.agent_id)
                ms += took
        self.emit(Saved(tuple(saved), ms))
        if failed:
            raise PermeantError("could not save " + "; ".join(failed))
        job.future.set_result(tuple(saved))

    def reset(self, job: Job) -> None:
        assert job.agent_id is not None
        agent = self.ws.agent(job.agent_id)
        self.ws.reset(agent)
        with self.lock:
            self.states.reset(agent.agent_id)
        self.emit(AgentReset(agent.agent_id))
        job.future.set_result(None)

    def export(self, job: Job) -> None:
        assert job.agent_id is not None
        agent_id = job.agent_id
        agent = self.ws.agent(agent_id)
        try:
            self.restore(agent)
            info, ms = self.runner.export(
                self.ws, agent, job.payload["path"], job.payload["quant"],
                fidelity=job.payload["fidelity"],
                progress=lambda f: self.emit(ExportProgress(agent_id, f)))
            self.emit(ExportDone(agent_id, str(info.path), info.size, info.digest, ms))
            job.future.set_result(info)
        except BaseException as exc:
            self.emit(ExportFailed(agent_id, str(exc)))
            raise

    def import_usxf(self, job: Job) -> None:
        self.need_model()
        job.future.set_result(self.runner.import_usxf(self.ws, job.payload["path"],
                                                      job.payload["name"]))

    def replay_fidelity(self, job: Job) -> None:
        assert job.agent_id is not None
        self.need_model()
        job.future.set_result(self.runner.replay_fidelity(self.ws, job.agent_id, self.restore))

    def agent_settings(self, job: Job) -> None:
        """Apply checked generation settings to the agent's spec and save workspace.json."""
        spec = self.ws.settings.agent(job.agent_id or "")
        if spec is None:
            raise PermeantError(f"no settings for agent {job.agent_id!r}")
        for key, value in job.payload["changes"].items():
            setattr(spec, key, value)
        save_settings(self.ws.folder, self.ws.settings)
        job.future.set_result(replace(spec))

    def context(self) -> WorkerContext:
        return WorkerContext(self.loaded, self.ws,
                             lambda agent_id: self.restore(self.ws.agent(agent_id)),
                             self.load_error)

    def call(self, job: Job) -> None:
        fn: Callable[[WorkerContext], Any] = job.payload["fn"]
        job.future.set_result(fn(self.context()))
