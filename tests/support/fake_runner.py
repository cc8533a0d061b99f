"""A scripted model runner for the real Engine: no MLX, no model, deterministic figures.

It sits at the engine's model-runner seam (permeant_tui/engine/runner.py `ModelRunner`), so the
queue, the worker thread, the agent states and the events under test are the engine's own.
What it scripts: the load (optionally held until `release_load()`), how each agent's state is
restored (`restores`; an agent without a script reports source "new", which front ends do not
announce), each turn's prefill progress and token batches (optionally held at a
gate until `release()`, optionally slowed by `delay`), failures (`fail_next`), exports and
saves, and the device and memory figures the gauges show.

Figures: each past turn stands for TOKENS_PER_TURN tokens of KV state, each token for
BYTES_PER_TOKEN bytes; an agent with a history shows the decode figures of RESUMED_FIGURES.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from permeant_tui.engine.agent import Agent, Turn
from permeant_tui.engine.errors import PermeantError, TurnCancelled
from permeant_tui.engine.events import PrefillProgress, RestoreReport, Tokens, TurnResult
from permeant_tui.engine.runtime import MemoryFigures

CONTEXT_LIMIT = 8192
MB = 1 << 20
TOKENS_PER_TURN = 150
BYTES_PER_TOKEN = 18_432
DIGEST = "sha256:9f2c4e1ab07d63c58e2f01d4b6a9c3e7f5d8b2a1c0e9f8d7c6b5a4f3e2d1c0b9"
MEMORY = MemoryFigures(412 * MB, 96 * MB, 180 * MB)  # RSS, MLX active, MLX peak
RESUMED_FIGURES = {"last_tok_s": 18.9, "last_ttft_ms": 120.0,
                   "tok_s_history": [17.2, 18.1, 19.4, 18.6, 18.9]}


CONTINUED = " and a third point."
REGENERATED = "\n\n(second take)"


def reply_for(agent_id: str, text: str) -> str:
    return f"**{agent_id.title()}** view on *{text}*:\n\n- first point\n- second point"


@dataclass(frozen=True)
class FakeIdentity:
    name: str = "SmolLM2-135M-Instruct"
    fingerprint: str = "fake-0000"
    kv_dtype: str = "float32"


@dataclass(frozen=True)
class FakeModel:
    """Shaped like engine.models.LoadedModel where the engine reads it."""

    identity: FakeIdentity = field(default_factory=FakeIdentity)
    spec: str = "fake"
    weights_mode: str = "float32"
    context_limit: int = CONTEXT_LIMIT
    model: object = None
    tokenizer: object = None
    chat_format: str = "gguf template"
    is_base_model: bool = False


class FakeLayer:
    """One layer of a fake KV cache: only its size is real (Agent.cache_bytes() reads it)."""

    def __init__(self, agent: Agent, nbytes: int | None = None) -> None:
        self.agent, self._nbytes = agent, nbytes

    @property
    def nbytes(self) -> int:
        if self._nbytes is not None:
            return self._nbytes
        return len(self.agent.cache_ids) * BYTES_PER_TOKEN


@dataclass(frozen=True)
class FakeExport:
    """What Engine.export resolves to (the fields front ends read of a UsxfFile)."""

    path: str
    size: int
    digest: str
    token_ids: tuple[int, ...] = ()

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def scripted_error(kind: str, message: str) -> PermeantError:
    """An error whose class name is `kind` (what TurnFailed.kind reports)."""
    return type(kind, (PermeantError,), {})(message)


def show_resumed(agent: Agent) -> None:
    """The gauge figures of an agent that talked in an earlier session."""
    if agent.turns:
        agent.last_tok_s = RESUMED_FIGURES["last_tok_s"]
        agent.last_ttft_ms = RESUMED_FIGURES["last_ttft_ms"]
        agent.tok_s_history = list(RESUMED_FIGURES["tok_s_history"])


def on_disk(agent: Agent) -> None:
    """What an earlier session left on disk for `agent`: a snapshot of its whole history."""
    agent.tokens_on_disk = TOKENS_PER_TURN * len(agent.turns)
    agent.bytes_on_disk = agent.tokens_on_disk * BYTES_PER_TOKEN
    show_resumed(agent)


class FakeRunner:
    def __init__(self, *, restores: dict[str, RestoreReport] | None = None,
                 manual: bool = False, hold_load: bool = False, chunk_words: int = 3,
                 delay: float = 0.0, fail_next: dict[str, BaseException] | None = None,
                 export_error: BaseException | None = None, export_ms: float = 42.0,
                 export_size: int = 3_355_443, save_ms: float = 3.5,
                 model: FakeModel | None = None, device: str = "cpu", blas: str = "OpenBLAS",
                 memory: MemoryFigures = MEMORY, batch: int = 1) -> None:
        self.restores = dict(restores or {})
        self.batch = batch  # how many turns run_turns takes together (1: the engine never asks)
        self.batches: list[tuple[str, ...]] = []
        self.manual, self.chunk_words, self.delay = manual, chunk_words, delay
        self.fail_next = dict(fail_next or {})
        self.export_error, self.export_ms, self.export_size = export_error, export_ms, export_size
        self.save_ms = save_ms
        self.model = model or FakeModel()
        self._device, self._blas, self._memory = device, blas, memory
        # what ran, for assertions
        self.turns: list[tuple[str, str]] = []
        self.params: list = []  # the TurnParams of each turn, in order
        self.restored: list[str] = []
        self.saved: list[str] = []
        self.exports: list[str] = []
        self.drafts: list[tuple[str, str]] = []  # (agent id, text) of each draft prefilled
        # gates
        self._gate = threading.Semaphore(0)
        self._load_gate = threading.Event()
        if not hold_load:
            self._load_gate.set()
        self._closing = threading.Event()
        self._waiting = 0
        self._lock = threading.Lock()

    # ---- test controls -------------------------------------------------------------------
    def release(self, turns: int = 1) -> None:
        """Let `turns` held turns run (manual mode)."""
        self._gate.release(turns)

    def release_load(self) -> None:
        self._load_gate.set()

    def close(self) -> None:
        """Open every gate for good (teardown)."""
        self._closing.set()
        self._load_gate.set()
        self._gate.release(1000)

    @property
    def blocked(self) -> bool:
        """A turn or the load is waiting for a release."""
        with self._lock:
            return self._waiting > 0

    def _hold(self, wait, cancel: threading.Event | None = None) -> None:
        """Wait until `wait(timeout)` says go (or teardown; or a cancel, which raises)."""
        with self._lock:
            self._waiting += 1
        try:
            while not wait(0.01):
                if self._closing.is_set():
                    return
                if cancel is not None and cancel.is_set():
                    raise TurnCancelled("cancelled before it started")
        finally:
            with self._lock:
                self._waiting -= 1

    # ---- ModelRunner ---------------------------------------------------------------------
    def load(self, progress):
        self._hold(self._load_gate.wait)
        for stage, fraction in (("imports", 0.1), ("weights", 0.5), ("tokenizer", 0.8)):
            progress(stage, fraction)
        return self.model

    def device(self) -> str:
        return self._device

    def blas(self) -> str:
        return self._blas

    def memory(self) -> MemoryFigures:
        return self._memory

    def rss(self) -> int:
        return self._memory.rss_bytes

    def ensure_resident(self, ws, agent: Agent, *, rebuild: bool) -> RestoreReport:
        agent.last_used = time.time()
        if agent.cache is not None and not rebuild:
            if agent.attach_used:
                agent.source = "memory"
            return RestoreReport(agent.source, 0.0, len(agent.cache_ids))
        tokens = TOKENS_PER_TURN * len(agent.turns)
        agent.cache, agent.cache_ids = [FakeLayer(agent)], [0] * tokens
        report = self.restores.pop(agent.agent_id, None) or RestoreReport("new", 0.0, tokens)
        agent.source = report.source
        agent.dirty = True  # every attached state counts as unsaved: save() writes it
        show_resumed(agent)
        self.restored.append(agent.agent_id)
        return report

    def save_agent(self, ws, agent: Agent) -> float | None:
        if agent.cache is None or not agent.dirty:
            return None
        agent.tokens_on_disk = len(agent.cache_ids)
        agent.bytes_on_disk = agent.cache_bytes()
        agent.dirty = False
        self.saved.append(agent.agent_id)
        return self.save_ms

    def run_turn(self, agent: Agent, text: str, params, *, turn_id: int, emit, cancel,
                 source: str, on_start, kind: str = "new") -> TurnResult:
        """A scripted turn. "continue" adds CONTINUED to the last reply; "regenerate" replaces
        it with the scripted reply plus REGENERATED (a cancel keeps the old one)."""
        if kind == "regenerate":
            last = agent.turns.pop()
            try:
                return self._turn(agent, last.user, params, turn_id=turn_id, emit=emit,
                                  cancel=cancel, source=source, on_start=on_start, kind=kind)
            except BaseException:
                agent.turns.append(last)
                raise
        return self._turn(agent, text, params, turn_id=turn_id, emit=emit, cancel=cancel,
                          source=source, on_start=on_start, kind=kind)

    def _turn(self, agent: Agent, text: str, params, *, turn_id: int, emit, cancel,
              source: str, on_start, kind: str) -> TurnResult:
        agent_id = agent.agent_id
        self.turns.append((agent_id, text))
        self.params.append(params)
        if self.manual:
            self._hold(lambda t: self._gate.acquire(timeout=t), cancel)
        cached = len(agent.cache_ids)
        to_prefill = 1 if kind == "continue" else 24 + len(text.split())
        on_start(cached, to_prefill)
        emit(PrefillProgress(agent_id, turn_id, to_prefill // 2, to_prefill))
        emit(PrefillProgress(agent_id, turn_id, to_prefill, to_prefill))
        if agent_id in self.fail_next:
            raise self.fail_next.pop(agent_id)
        reply = reply_for(agent_id, text.splitlines()[0] if text else "")
        if kind == "continue":
            reply = CONTINUED
        elif kind == "regenerate":
            reply += REGENERATED
        words = reply.split(" ")
        for i in range(0, len(words), self.chunk_words):
            if cancel.is_set():
                raise TurnCancelled("cancelled")
            if self.delay:
                time.sleep(self.delay)
            chunk = " ".join(words[i: i + self.chunk_words])
            emit(Tokens(agent_id, turn_id, chunk if i == 0 else " " + chunk, ()))
        generated = len(words) * 2
        agent.cache_ids = [0] * (cached + to_prefill + generated)
        if kind == "continue":
            last = agent.turns.pop()
            reply = last.reply + reply
        agent.turns.append(Turn(text, reply, (), time.time()))
        agent.dirty, agent.last_used = True, time.time()
        agent.last_tok_s, agent.last_ttft_ms = 18.9, 120.0
        agent.tok_s_history = (agent.tok_s_history + [18.9])[-30:]
        return TurnResult(
            agent=agent_id, user=text, reply=reply, generated_ids=(), source=source,
            cached=cached, prefilled=to_prefill, generated=generated,
            in_cache=len(agent.cache_ids), context_limit=self.model.context_limit,
            timing_ms={"ttft": 120.0}, decode_tok_s=18.9,
            finish_reason="length" if text.startswith("long") and kind != "continue" else "stop",
            kind=kind)

    def prepare(self, agent: Agent, text: str, cancel) -> int:
        """A draft of words: each whole word typed stands for one token."""
        self.drafts.append((agent.agent_id, text))
        return len(text.split()[:-1])

    def drop_draft(self, agent: Agent) -> None:
        agent.draft = False

    def max_batch(self) -> int:
        return self.batch

    def run_turns(self, turns) -> list:
        """The scripted turns of a batch, one after another (the grouping is what is tested)."""
        self.batches.append(tuple(t.agent.agent_id for t in turns))
        out: list = []
        for t in turns:
            try:
                out.append(self.run_turn(t.agent, t.text, t.params, turn_id=t.turn_id,
                                         emit=t.emit, cancel=t.cancel, source=t.source,
                                         on_start=t.on_start))
            except BaseException as exc:  # noqa: BLE001 - per turn, as the real one
                out.append(exc)
        return out

    def export(self, ws, agent: Agent, path, quant: str, *, fidelity: bool, progress):
        self.exports.append(agent.agent_id)
        progress(0.5)
        if self.export_error is not None:
            raise self.export_error
        progress(1.0)
        target = str(path or f"/tmp/permeant-test/exports/{agent.agent_id}.usxf")
        return FakeExport(target, self.export_size, DIGEST, tuple(agent.cache_ids)), \
            self.export_ms

    def import_usxf(self, ws, path: str, name: str | None) -> dict:
        raise PermeantError("the fake runner does not import USXF files")

    def replay_fidelity(self, ws, agent_id: str, restore) -> str:
        restore(ws.agent(agent_id))
        return "not checked: fake runner"
