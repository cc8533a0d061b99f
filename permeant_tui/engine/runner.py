"""The model-runner seam: every step of the engine that touches the model or its KV state.

`Engine` owns the queue, the worker thread, the turn states, the events and the residency
policy; the runner does the work: load the model, attach an agent's KV state, run a turn,
save a snapshot, export and import. `MlxRunner` is the real one (MLX, mlx_lm); UI tests give
the engine a scripted one (tests/support/fake_runner.py) so that the queue and the thread
under test are the real ones. Runner methods run on the worker thread only, except `rss()`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import runtime
from .agent import Agent
from .events import Event, RestoreReport, TurnResult
from .runtime import MemoryFigures

if TYPE_CHECKING:
    from .batch import BatchTurn
    from .generation import TurnParams
    from .models import LoadedModel
    from .usxf.reader import UsxfFile
    from .workspace import Workspace


class ModelRunner(Protocol):
    def load(self, progress: Callable[[str, float], None]) -> LoadedModel:
        """Load the model (or hand back the preloaded one)."""

    def device(self) -> str: ...

    def blas(self) -> str: ...

    def memory(self) -> MemoryFigures:
        """Process RSS and the runtime's allocator figures (worker thread)."""

    def rss(self) -> int:
        """Process RSS in bytes (any thread: the gauges ask twice a second)."""

    def ensure_resident(self, ws: Workspace, agent: Agent, *, rebuild: bool) -> RestoreReport:
        """Attach the agent's KV state (memory, USXF import, snapshot, else prefill)."""

    def save_agent(self, ws: Workspace, agent: Agent) -> float | None:
        """Write the agent's snapshot if it is dirty: ms taken, or None when nothing to do."""

    def run_turn(self, agent: Agent, text: str, params: TurnParams, *, turn_id: int,
                 emit: Callable[[Event], None], cancel: threading.Event, source: str,
                 on_start: Callable[[int, int], None], kind: str = "new") -> TurnResult:
        """One turn; appends the Turn to agent.turns only when it completes. `kind`:
        "continue" extends the last reply, "regenerate" replaces it (`text` is then unused)."""

    def prepare(self, agent: Agent, text: str, cancel: threading.Event) -> int:
        """Prefill the message being typed into the resident agent's cache, as Enter would send
        it now (engine/drafts.py): tokens prefilled. `cancel` stops it between chunks."""

    def drop_draft(self, agent: Agent) -> None:
        """Take a typed draft back out of the agent's cache (it holds its transcript again)."""

    def max_batch(self) -> int:
        """How many agents' turns `run_turns` decodes together (1: no batching)."""

    def run_turns(self, turns: list[BatchTurn]) -> list[TurnResult | BaseException]:
        """Turns of distinct resident agents, decoded in one batch; per turn its result or the
        exception that ended it (engine/batch.py)."""

    def export(self, ws: Workspace, agent: Agent, path: str | None, quant: str, *,
               fidelity: bool | int, progress: Callable[[float], None]) -> tuple[UsxfFile, float]:
        """Write a USXF file of the (resident) agent: (the file, ms taken)."""

    def import_usxf(self, ws: Workspace, path: str, name: str | None) -> dict:
        """Verify a USXF file and register it as an agent of `ws`; a report."""

    def replay_fidelity(self, ws: Workspace, agent_id: str,
                        restore: Callable[[Agent], object]) -> str:
        """Replay an imported agent's fidelity probe (`restore` makes it resident)."""


class MlxRunner:
    """The real runner: MLX and mlx_lm on this machine's default device."""

    def __init__(self, spec: str | None, *, context_limit: int | None = None,
                 preloaded: LoadedModel | None = None,
                 digest_cache: Path | None = None) -> None:
        self.spec, self.context_limit = spec, context_limit
        self.digest_cache = digest_cache
        self.lm: LoadedModel | None = preloaded
        self._batch: int | None = None

    def load(self, progress: Callable[[str, float], None]) -> LoadedModel:
        if self.lm is None:
            from .models import load_model

            lm = load_model(self.spec, digest_cache=self.digest_cache,
                            context_limit=self.context_limit, progress=progress)
            # Kernels' first use paid now, not at the first token after a resume
            # (PERMEANT_WARMUP=0 skips it: bench/first_token.py compares both).
            if os.environ.get("PERMEANT_WARMUP", "1") != "0":
                from .speed import warm_up

                progress("warm-up", 0.92)
                lm.timings_ms["warm_up"] = warm_up(lm.model)
            self.lm = lm
        return self.lm

    def _model(self) -> LoadedModel:
        assert self.lm is not None, "load() first"
        return self.lm

    def device(self) -> str:
        return runtime.device_label()

    def blas(self) -> str:
        return runtime.blas_label()

    def memory(self) -> MemoryFigures:
        return runtime.memory_figures()

    def rss(self) -> int:
        import psutil

        try:
            return psutil.Process().memory_info().rss
        except psutil.Error:
            return 0

    def ensure_resident(self, ws: Workspace, agent: Agent, *, rebuild: bool) -> RestoreReport:
        return ws.ensure_resident(agent, self._model(), rebuild=rebuild)

    def save_agent(self, ws: Workspace, agent: Agent) -> float | None:
        return ws.save_agent(agent, self._model())

    def run_turn(self, agent: Agent, text: str, params: TurnParams, *, turn_id: int,
                 emit: Callable[[Event], None], cancel: threading.Event, source: str,
                 on_start: Callable[[int, int], None], kind: str = "new") -> TurnResult:
        from . import generation

        lm = self._model()
        kw: dict[str, Any] = dict(context_limit=lm.context_limit, turn_id=turn_id, emit=emit,
                                  cancel=cancel, source=source, on_start=on_start)
        if kind == "continue":
            return generation.continue_reply(lm.model, lm.tokenizer, agent, params, **kw)
        if kind == "regenerate":
            return generation.regenerate(lm.model, lm.tokenizer, agent, params, **kw)
        return generation.run_turn(lm.model, lm.tokenizer, agent, text, params, **kw)

    def prepare(self, agent: Agent, text: str, cancel: threading.Event) -> int:
        from .drafts import prepare

        lm = self._model()
        return prepare(lm.model, lm.tokenizer, agent, text, context_limit=lm.context_limit,
                       cancel=cancel)

    def drop_draft(self, agent: Agent) -> None:
        from .drafts import drop

        lm = self._model()
        drop(lm.model, lm.tokenizer, agent)

    def max_batch(self) -> int:
        from .batch import MAX_BATCH, batchable

        if self._batch is None:
            self._batch = MAX_BATCH if batchable(self._model().model) else 1
        return self._batch

    def run_turns(self, turns: list[BatchTurn]) -> list[TurnResult | BaseException]:
        from .batch import run_turns

        lm = self._model()
        return run_turns(lm.model, lm.tokenizer, turns, context_limit=lm.context_limit)

    def export(self, ws: Workspace, agent: Agent, path: str | None, quant: str, *,
               fidelity: bool | int, progress: Callable[[float], None]) -> tuple[UsxfFile, float]:
        from .exchange import export_agent

        t = time.perf_counter()
        info = export_agent(self._model(), ws, agent, path, quant, fidelity=fidelity,
                            progress=progress)
        return info, (time.perf_counter() - t) * 1000

    def import_usxf(self, ws: Workspace, path: str, name: str | None) -> dict:
        from .exchange import import_usxf

        return import_usxf(self._model(), ws, path, name)

    def replay_fidelity(self, ws: Workspace, agent_id: str,
                        restore: Callable[[Agent], object]) -> str:
        from .exchange import replay_fidelity

        return replay_fidelity(self._model(), ws, agent_id, restore)
