"""An agent's gauges: tokens in cache against the context limit, decode speed, cache size.

Fed from `AgentStats` by the app's single stats timer; every setter skips work when the value
has not changed, so an idle workspace costs nothing to redraw.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Sparkline

from ..engine.events import AgentStats


def format_bytes(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GB"
    if n >= 100 << 20:
        return f"{n / (1 << 20):.0f} MB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.0f} KB"
    return f"{n} B"


def show_figure(label: Label, text: str, *, left: bool = False) -> None:
    """A gauge's new figure. Figures change with every streamed batch, and a label that changes
    width lays the whole screen out again (every widget of every pane: 16 ms here, where a
    repaint of the label is under 1). So a figure is padded to the width its label has already
    (numbers to the right, `left` text to the left): the label only ever grows, and is laid
    out again only then."""
    old = str(label.content)
    if len(text) < len(old):
        text = text.ljust(len(old)) if left else text.rjust(len(old))
    if text != old:
        label.update(text, layout=len(text) != len(old))


class GaugeBar(ProgressBar):
    """A ProgressBar that moves only when told. ProgressBar calls `update()` every second to
    refresh an ETA, which a gauge never shows; in a streaming pane each call is one more repaint
    of the screen (2-3 ms here), out of step with the text's."""

    def update(self, **changes: Any) -> None:
        if changes:
            super().update(**changes)


class AgentGauges(Vertical):
    """Three lines: context bar, tok/s sparkline, and cache size / residency / TTFT."""

    def __init__(self) -> None:
        super().__init__()
        self._shown: AgentStats | None = None
        # After a reset: the speed history the engine reported before it, which says nothing
        # about the new conversation and is not shown again (see `clear`).
        self._stale_history: tuple[float, ...] = ()
        # Kept, not queried: the stats timer writes here twice a second.
        self._context_bar = GaugeBar(total=1, show_eta=False, show_percentage=False, id="context")
        self._context_label = Label("0", id="context-count", classes="gauge-value")
        self._speed_line = Sparkline([], id="speed")
        self._speed_line.display = False
        self._speed_label = Label("–", id="speed-value", classes="gauge-value")
        self._cache_label = Label("empty cache", id="cache", markup=False)

    def compose(self) -> ComposeResult:
        with Horizontal(classes="gauge-row"):
            yield Label("ctx", classes="gauge-name")
            yield self._context_bar
            yield self._context_label
        with Horizontal(classes="gauge-row"):
            yield Label("tok/s", classes="gauge-name")
            yield self._speed_line
            yield self._speed_label
        yield self._cache_label

    def show(self, stats: AgentStats) -> None:
        if stats == self._shown:
            return
        self._shown = stats
        limit = max(stats.context_limit, 1)
        self._context_bar.update(total=limit, progress=min(stats.tokens, limit))
        self._context_bar.set_class(stats.tokens >= 0.9 * limit, "-nearly-full")
        show_figure(self._context_label, f"{stats.tokens:,}/{stats.context_limit:,}"
                    if stats.context_limit else f"{stats.tokens:,}")
        history, last_tok_s, ttft_ms = self._fresh_speed(stats)
        self._show_speed(history)
        show_figure(self._speed_label, f"{last_tok_s:.1f}" if last_tok_s else "–")
        where = "resident" if stats.resident else "on disk"
        size = format_bytes(stats.bytes) if stats.bytes else "empty cache"
        ttft = f" · TTFT {ttft_ms:,.0f} ms" if ttft_ms else ""
        show_figure(self._cache_label, f"{size} · {where}{ttft}", left=True)

    def clear(self) -> None:
        """Show an empty agent (after a reset) until the engine reports new figures."""
        if self._shown is not None:
            self._stale_history = self._shown.tok_s_history or self._stale_history
        self._shown = None
        self._context_bar.update(total=1, progress=0)
        self._context_bar.remove_class("-nearly-full")
        self._context_label.update("0")
        self._show_speed(())
        self._speed_label.update("–")
        self._cache_label.update("empty cache")

    def _fresh_speed(self, stats: AgentStats) -> tuple[tuple[float, ...], float, float]:
        """Speed history, last tok/s and TTFT, without what was measured before a reset."""
        history, stale = stats.tok_s_history, self._stale_history
        if not stale:
            return history, stats.last_tok_s, stats.last_ttft_ms
        if not history:  # the engine cleared them itself
            self._stale_history = ()
            return history, stats.last_tok_s, stats.last_ttft_ms
        if history == stale:
            return (), 0.0, 0.0
        if history[: len(stale)] == stale:
            return history[len(stale):], stats.last_tok_s, stats.last_ttft_ms
        self._stale_history = ()  # the window has moved on: all of it is new enough
        return history, stats.last_tok_s, stats.last_ttft_ms

    def _show_speed(self, history: tuple[float, ...]) -> None:
        # One cell per turn (at most the width the row allows): a single turn is one bar, not
        # a full-width block, and the line grows as turns are added.
        self._speed_line.data = list(history)
        self._speed_line.styles.width = max(len(history), 1)
        self._speed_line.display = bool(history)


class LiveFigures:
    """What a streaming turn has reached, from its events: tokens in the context (reused +
    prefilled + generated so far) and the decode speed since the first token."""

    def __init__(self, cached: int) -> None:
        self.cached, self.prefilled, self.tokens_out = cached, 0, 0
        self._first: float | None = None
        self._last = 0.0

    def generated(self, n: int, now: float) -> None:
        if self._first is None:
            self._first = now
        self.tokens_out += n
        self._last = now

    @property
    def tok_s(self) -> float:
        span = self._last - (self._first or self._last)
        return (self.tokens_out - 1) / span if self.tokens_out > 1 and span > 0 else 0.0

    def over(self, stats: AgentStats) -> AgentStats:
        tokens = max(stats.tokens, self.cached + self.prefilled + self.tokens_out)
        return replace(stats, tokens=tokens, last_tok_s=self.tok_s or stats.last_tok_s)
