"""An agent's gauges: tokens in cache against the context limit, decode speed, cache size.

Fed from `AgentStats` by the app's single stats timer; every setter skips work when the value
has not changed, so an idle workspace costs nothing to redraw.
"""

from __future__ import annotations

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


class AgentGauges(Vertical):
    """Three lines: context bar, tok/s sparkline, and cache size / residency / TTFT."""

    def __init__(self) -> None:
        super().__init__()
        self._shown: AgentStats | None = None
        # Kept, not queried: the stats timer writes here twice a second.
        self._context_bar = ProgressBar(total=1, show_eta=False, show_percentage=False, id="context")
        self._context_label = Label("0", id="context-count", classes="gauge-value")
        self._speed_line = Sparkline([], id="speed")
        self._speed_label = Label("–", id="speed-value", classes="gauge-value")
        self._cache_label = Label("empty cache", id="cache")

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
        self._context_label.update(
            f"{stats.tokens:,}/{stats.context_limit:,}" if stats.context_limit else f"{stats.tokens:,}"
        )
        self._speed_line.data = list(stats.tok_s_history)
        self._speed_label.update(f"{stats.last_tok_s:.1f}" if stats.last_tok_s else "–")
        where = "resident" if stats.resident else "on disk"
        size = format_bytes(stats.bytes) if stats.bytes else "empty cache"
        ttft = f" · TTFT {stats.last_ttft_ms:,.0f} ms" if stats.last_ttft_ms else ""
        self._cache_label.update(f"{size} · {where}{ttft}")
