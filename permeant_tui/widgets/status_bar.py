"""The status bar: model loading progress, then model, device, BLAS, memory and workspace.

Loading progress comes from ModelLoading events; the rest from `EngineStats` on the app's stats
timer. Labels are only rewritten when their text changes. Names come from files (a model's
metadata, a path): literal (markup=False) and printable.
"""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.content import Content
from textual.reactive import reactive
from textual.widgets import Label, ProgressBar

from ..engine.events import EngineStats
from ..engine.text import printable
from .gauges import format_bytes, show_figure

MEMORY_SECONDS = 2.0


class StatusBar(Horizontal):
    """One line: `model · device · BLAS   RSS · MLX active/peak   workspace`."""

    phase: reactive[str] = reactive("loading")  # loading | ready | failed

    def __init__(self, workspace: str = "") -> None:
        super().__init__()
        self._workspace = workspace
        # Kept, not queried: the stats timer writes here twice a second.
        self._model_label = Label("Loading model…", id="model", markup=False)
        self._loading_bar = ProgressBar(total=1.0, show_eta=False, id="loading")
        self._memory_label = Label("", id="memory", markup=False)
        self._memory_label.tooltip = "process resident memory · MLX memory active/peak"
        self._path_label = Label(printable(workspace), id="workspace", markup=False)
        self._base_tag = ""  # "base model · Gemma turns" once a base model is ready
        self._memory_shown = -MEMORY_SECONDS  # when the memory figure was last shown

    def compose(self) -> ComposeResult:
        yield self._model_label
        yield self._loading_bar
        yield self._memory_label
        yield self._path_label

    def watch_phase(self, old: str, new: str) -> None:
        self.remove_class(f"-{old}")
        self.add_class(f"-{new}")

    def model_loading(self, stage: str, fraction: float) -> None:
        if self.phase == "ready":
            return
        self.phase = "loading"
        _set(self._model_label, f"Loading model: {stage}")
        self._loading_bar.update(progress=max(0.0, min(fraction, 1.0)))

    def ready(self, name: str, device: str, blas: str, dtype: str, context_limit: int,
              chat_format: str = "") -> None:
        self.phase = "ready"
        self._base_tag = base_model_tag(chat_format) or self._base_tag
        _set(self._model_label, " · ".join(p for p in (name, self._base_tag, device, blas) if p))
        window = f", context window {context_limit:,} tokens" if context_limit else ""
        turns = f"; {chat_format}: no chat template in the model" if self._base_tag else ""
        self._model_label.tooltip = Content(printable(f"weights {dtype}{window}{turns}"))

    def failed(self, message: str) -> None:
        self.phase = "failed"
        _set(self._model_label, f"Model failed to load: {message}")

    def show(self, stats: EngineStats) -> None:
        if stats.ready and self.phase != "ready":
            self.ready(stats.model, stats.device, stats.blas, stats.weights_dtype, 0)
        # Memory moves with every sample, and each repaint of the screen costs ~6 ms while
        # replies stream: it is shown every MEMORY_SECONDS, not at every sample.
        now = time.monotonic()
        if now - self._memory_shown >= MEMORY_SECONDS:
            self._memory_shown = now
            active = format_bytes(stats.mlx_active_bytes).removesuffix(" MB")
            show_figure(self._memory_label, f"RSS {format_bytes(stats.rss_bytes)} · MLX "
                        f"{active}/{format_bytes(stats.mlx_peak_bytes)}", left=True)
        if stats.workspace and not self._workspace:
            _set(self._path_label, stats.workspace)


def base_model_tag(chat_format: str) -> str:
    """The status bar's short tag for a base model (no chat template; a built-in turn format):
    "base model · Gemma turns" / "base model · plain transcript"; "" otherwise."""
    if "(base model)" not in chat_format:
        return ""
    turns = chat_format.replace("(base model)", "").strip()
    return "base model · " + ("Gemma turns" if turns.startswith("gemma") else turns)


def _set(label: Label, text: str) -> None:
    text = printable(text)
    if str(label.content) != text:
        label.update(text)
