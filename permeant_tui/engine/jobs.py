"""What the engine's worker thread does with each job: load, turn, save, reset, export, import,
fidelity replay, call. Runs on the worker only; the model work goes through the runner
(engine/runner.py), events out through `emit`, agent states through engine/states.py.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .agent import Agent
from .api import WorkerContext
from .batch import BatchTurn
from .drafts import enabled as drafts_enabled
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
    TurnResult,
    TurnStarted,
)
from .events import TurnCancelled as TurnCancelledEvent
from .generation import TurnParams
from .runner import ModelRunner
from .settings import save_settings
from .states import BUSY, AgentStates, Outcome
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
    # load | turn | prepare (a typed draft) | save | reset | export | import | replay | call |
    # settings | stop
    kind: str
    agent_id: str | None = None
    payload: dict = field(default_factory=dict)
    future: Future = field(default_factory=Future)
    turn_id: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)


class JobQueue:
    """The worker's FIFO. `put_all` enqueues several jobs at once (the team's two first turns
    arrive together); `group` hands the worker a turn job together with the turn jobs of other
    agents queued right behind it, which it may decode in one batch."""

    def __init__(self) -> None:
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        # Set when any job but a draft's arrives: a draft being prefilled stops for it.
        self.interrupt = threading.Event()

    def put(self, job: Job) -> None:
        self.put_all([job])

    def put_all(self, jobs: list[Job]) -> None:
        with self._cv:
            self._jobs.extend(jobs)
            if any(j.kind != "prepare" for j in jobs):
                self.interrupt.set()
            self._cv.notify()

    def waiting(self) -> bool:
        """A job other than a draft's is queued."""
        with self._cv:
            return any(j.kind != "prepare" for j in self._jobs)

    def get(self) -> Job:
        with self._cv:
            while not self._jobs:
                self._cv.wait()
            return self._jobs.popleft()

    def group(self, first: Job, limit: int) -> list[Job]:
        """`first` and the turn jobs right behind it, of other agents, up to `limit` in all.
        A coordinator's team turn waits for the others' answers and never joins a group."""
        group = [first]
        if not _groupable(first):
            return group
        with self._cv:
            while (self._jobs and len(group) < limit and _groupable(self._jobs[0])
                   and self._jobs[0].agent_id not in {j.agent_id for j in group}):
                group.append(self._jobs.popleft())
        return group


def _groupable(job: Job) -> bool:
    return (job.kind == "turn" and "team" not in job.payload and not job.cancel.is_set()
            and job.payload.get("kind", "new") == "new")


@dataclass(eq=False)
class _Begun:
    """A turn job between its start and its end (see Worker.turns)."""

    job: Job
    agent: Agent
    text: str = ""
    params: TurnParams = field(default_factory=TurnParams)
    started: bool = False
    restore: RestoreReport | None = None

    @property
    def source(self) -> str:
        return self.restore.source if self.restore is not None else "new"
    on_start: Callable[[int, int], None] = field(default=lambda cached, todo: None)
    emit: Callable[[Event], None] = field(default=lambda ev: None)
    outcome: TurnResult | BaseException | None = None

    @property
    def kind(self) -> str:
        """new | continue | regenerate (only new turns join a batch)."""
        return self.job.payload.get("kind", "new")


class Worker:
    """The worker thread's side of the engine. `Engine` (engine/worker.py) owns the queue and
    the thread and calls `handle(job)` for each job in order."""

    def __init__(self, ws: Workspace, runner: ModelRunner, states: AgentStates,
                 lock: threading.Lock, emit: Callable[[Event], None], *, eager: bool,
                 rebuild: bool, autosave: bool, batch: bool = True,
                 jobs: JobQueue | None = None) -> None:
        self.ws, self.runner, self.states, self.lock, self.emit = ws, runner, states, lock, emit
        self.jobs = jobs or JobQueue()
        # agent id -> (the newest text typed, its pending prepare job); under `lock`
        self.drafts: dict[str, tuple[str, Job]] = {}
        self.eager, self.rebuild, self.autosave, self.batch = eager, rebuild, autosave, batch
        self.loaded: LoadedModel | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.device = self.blas = ""
        self.timings: dict[str, float] = {}
        self._first_turn = True  # the first turn's timing_ms reports the model load
        self._handlers: dict[str, Callable[[Job], None]] = {
            "load": self.load, "turn": self.turn, "prepare": self.prepare, "save": self.save,
            "reset": self.reset, "export": self.export, "import": self.import_usxf, "replay": self.replay_fidelity,
            "call": self.call, "settings": self.agent_settings,
        }

    def handle(self, job: Job) -> None:
        if job.kind != "prepare":  # drafts of several agents (a team question) stay together
            self.drop_drafts()
            # Every job but a turn or a draft sees the snapshots durable (engine/durable.py):
            # what it reads, moves or reports is on disk. A failed one was said as a warning.
            self.ws.flush()
        self._handlers[job.kind](job)

    # ---- drafts: prefill as you type (engine/drafts.py) ---------------------------------------
    def prepare(self, job: Job) -> None:
        """Prefill the newest text typed for the agent into its cache, as Enter would send it;
        only while the agent is idle and no other job waits (a job that arrives meanwhile stops
        it between chunks). The future gets the tokens prefilled (0: nothing done)."""
        agent_id = job.agent_id or ""
        with self.lock:
            pending = self.drafts.pop(agent_id, None)
            busy = agent_id not in self.ws.agents or self.states[agent_id] in BUSY
        self.jobs.interrupt.clear()
        if pending is None or busy or self.loaded is None or self.jobs.waiting() or \
                not drafts_enabled():
            job.future.set_result(0)
            return
        try:
            agent = self.ws.agent(agent_id)
            self.restore(agent)
            job.future.set_result(self.runner.prepare(agent, pending[0], self.jobs.interrupt))
        except BaseException as exc:  # noqa: BLE001 - a draft is a guess: Enter reports errors
            job.future.set_exception(exc)

    def drop_drafts(self, keep: set[str | None] | None = None) -> None:
        """Take every typed draft out of its agent's cache but those of `keep` (the agents whose
        new turns are next): nothing saves or exports a draft (an agent evicted by a draft's
        restore drops its own in `Workspace.save_agent`, or loses its cache whole)."""
        for agent in list(self.ws.agents.values()):
            if agent.draft and agent.agent_id not in (keep or ()):
                try:
                    self.runner.drop_draft(agent)
                except BaseException as exc:  # noqa: BLE001 - the transcript rebuilds it
                    agent.cache, agent.cache_ids, agent.draft = None, [], False
                    self.emit(Notice("warning", f"{agent.agent_id}: a typed draft could not be "
                                     f"taken out of the cache ({exc}); it will be rebuilt",
                                     agent.agent_id))

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
                             lm.context_limit, self.timings["model_load"],
                             getattr(lm, "chat_format", "")))
        for w in self.ws.warnings:
            self.emit(Notice("warning", w))
        self.ready.set()
        job.future.set_result(lm)
        try:
            if self.eager:
                self.emit(ModelLoading("agents", 0.95))
                by_recent = sorted(self.ws.agents.values(), key=lambda a: -a.last_used)
                for agent in by_recent[: self.ws.settings.max_resident]:
                    self.restore(agent)
        finally:  # start-up's own work is over: a front end may do what it put off
            self.emit(ModelLoading("settled", 1.0))

    def restore(self, agent: Agent) -> RestoreReport:
        """Make the agent resident within the residency limits: the least recently used agents
        it displaces are evicted before it is restored, then the limits are applied again (its
        cache can come out larger than its snapshot said, e.g. after a prefill)."""
        self.need_model()
        was_resident = agent.resident
        if not was_resident:  # room first: the limits hold during the restore too
            self.enforce_residency(keep=agent, incoming=agent)
        try:
            r = self.runner.ensure_resident(self.ws, agent,
                                            rebuild=self.rebuild and not was_resident)
        finally:
            self.ws.donors.clear()  # the evicted buffers it did not read into
        self.enforce_residency(keep=agent)
        self.timings["restore"] = r.ms
        if not was_resident:
            self.emit(AgentRestored(agent.agent_id, r.source, r.ms, r.tokens, r.reason,
                                      r.prefilled))
        return r

    def enforce_residency(self, keep: Agent | None = None,
                          incoming: Agent | None = None) -> list[str]:
        return self.ws.enforce_residency(self.save_agent, keep, incoming)

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
        self.turns([job])

    def max_batch(self) -> int:
        """How many queued turns of different agents may run together (1 before the model
        loads, and for models whose caches cannot batch)."""
        return self.runner.max_batch() if self.loaded is not None and self.batch else 1

    def turns(self, jobs: list[Job]) -> None:
        """Turn jobs of distinct agents. Two or more whose agents are resident together are
        prefilled one by one and decoded in one batch (engine/batch.py); any other runs alone."""
        self.drop_drafts({j.agent_id for j in jobs if _groupable(j)})
        begun = [b for b in map(self._begin, jobs) if b is not None]
        batch = [b for b in begun if b.agent.resident] if len(begun) > 1 else []
        if len(batch) > 1:
            specs = [BatchTurn(b.agent, b.text, b.params, b.job.turn_id, b.emit, b.job.cancel,
                               b.source, b.on_start) for b in batch]
            outcomes = self.runner.run_turns(specs)
            for b, out in zip(batch, outcomes, strict=True):  # durable first: every transcript line
                b.outcome = self._record(b, out)
            for b in batch:  # then snapshots, events and futures
                self._end(b)
        for b in begun:
            if b.outcome is not None or b in batch:
                continue
            try:
                if not b.agent.resident:  # evicted by a later agent's restore in this group
                    b.restore = self.restore(b.agent)
                one: TurnResult | BaseException = self.runner.run_turn(
                    b.agent, b.text, b.params, turn_id=b.job.turn_id, emit=b.emit,
                    cancel=b.job.cancel, source=b.source, on_start=b.on_start, kind=b.kind)
            except BaseException as exc:  # noqa: BLE001 - reported by _end
                one = exc
            b.outcome = self._record(b, one)
            self._end(b)

    def _begin(self, job: Job) -> _Begun | None:
        """A turn up to its model work: input, state, residency. None when it ended here (the
        outcome is already reported)."""
        assert job.agent_id is not None
        agent_id = job.agent_id
        b = _Begun(job, self.ws.agent(agent_id))
        try:
            if job.cancel.is_set():
                raise TurnCancelled("cancelled before it started")
            self.need_model()
            b.text, b.params = self._turn_input(job)
            with self.lock:
                self.states.started(agent_id)
            b.started = True
            b.restore = self.restore(b.agent)
        except BaseException as exc:  # noqa: BLE001 - reported by _end
            b.outcome = exc
            self._end(b)
            return None
        source, text = b.source, b.text

        kind = b.kind

        def on_start(cached: int, todo: int) -> None:
            self.emit(TurnStarted(agent_id, job.turn_id, source, cached, todo, text, kind))

        def emit(ev: Event) -> None:
            if isinstance(ev, Tokens) and self.states[agent_id] == "prefilling":
                with self.lock:
                    self.states.generating(agent_id)
            self.emit(ev)

        b.on_start, b.emit = on_start, emit
        return b

    def _record(self, b: _Begun, out: TurnResult | BaseException) -> TurnResult | BaseException:
        """Durable first: the transcript line of a completed turn (before any snapshot)."""
        if isinstance(out, BaseException):
            return out
        try:
            self.ws.append_turn(b.agent, b.agent.turns[-1], replaces_last=b.kind != "new")
        except BaseException as exc:  # noqa: BLE001 - reported by _end
            return exc
        return out

    def _end(self, b: _Begun) -> None:
        """Snapshot, events and the future of a turn whose outcome is known."""
        job, agent, agent_id, out = b.job, b.agent, b.agent.agent_id, b.outcome
        try:
            if isinstance(out, BaseException):
                raise out
            assert out is not None and b.restore is not None
            t = time.perf_counter()
            self.enforce_residency(keep=agent)
            if self.autosave:
                self.save_agent(agent)
            timing = dict(out.timing_ms)
            timing["model_load"] = self.timings.get("model_load", 0.0) if self._first_turn else 0.0
            timing["restore"] = b.restore.ms
            timing["save"] = (time.perf_counter() - t) * 1000  # this agent's and any evictee's
            self._first_turn = False
            result = replace(out, timing_ms=timing)
            agent.attach_used = True
            self._finished(agent_id, "done", b.started)
            self.emit(TurnDone(agent_id, job.turn_id, result))
            job.future.set_result(result)
        except TurnCancelled as exc:
            self._finished(agent_id, "cancelled", b.started)
            rewind = getattr(exc, "rewind", None)  # how the cache went back (generation.py)
            self.emit(TurnCancelledEvent(agent_id, job.turn_id, rewind))
            job.future.set_exception(exc)
        except BaseException as exc:
            self._finished(agent_id, "failed", b.started)
            self.emit(TurnFailed(agent_id, job.turn_id, type(exc).__name__, str(exc)))
            job.future.set_exception(exc)

    # ---- the other jobs ----------------------------------------------------------------------
    def save(self, job: Job) -> None:
        if self.loaded is None:
            job.future.set_result(())
            return
        self.drop_drafts()  # the final save at shutdown comes here without `handle`
        self.ws.flush()  # a failed background save marks its agent dirty: saved again below
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
        # The future resolves, and Saved is said, once the snapshots are durable.
        late = self.ws.flush()
        failed += [f"{agent_id}: {exc}" for agent_id, exc in late.items()]
        saved = [a for a in saved if a not in late]
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
