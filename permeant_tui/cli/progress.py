"""What a headless command shows while it works: a rich progress line on stderr when stderr is a
terminal, nothing when it is piped or redirected (scripts and tests read stdout and one-line
errors only). With `-v/--verbose` each stage is also written as one plain line on stderr,
piped or not, so a script can see what ran (and what did not: the model load).

`Reporter.event` takes the engine's events (engine/events.py) from the command's main thread
(cli/common.py `Session` drains the engine's sink there), so rich is only driven from one
thread.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

NO_PROGRESS_ENV = "PERMEANT_NO_PROGRESS"  # set (to anything) to silence bars on a terminal too


def terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and not os.environ.get(NO_PROGRESS_ENV)
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class Reporter:
    """One progress line (a bar when the fraction is known, a spinner otherwise), replaced
    stage by stage and erased when the command ends; notices kept for the end."""

    def __init__(self, verbose: bool = False, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.live = terminal(self.stream)
        self.verbose = verbose
        self.notices: list[str] = []
        self.problems = 0  # warnings and errors the engine reported (a failed save, ...)
        self._progress = None
        self._task = None
        self._last = ""

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- stages ----------------------------------------------------------------------------
    def stage(self, text: str, fraction: float | None = None) -> None:
        """Show `text` (with a bar at `fraction` in 0..1 when known). Verbose: a line per new
        stage text."""
        if self.verbose and text != self._last:
            self._line(text)
        self._last = text
        if not self.live:
            return
        if self._progress is None:
            self._start()
        assert self._progress is not None
        total = None if fraction is None else 1.0
        self._progress.update(self._task, description=text, total=total,
                              completed=max(0.0, min(1.0, fraction or 0.0)))

    def say(self, text: str) -> None:
        """A line that stays (above the progress line on a terminal; verbose only when
        piped)."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        elif self.verbose:
            self._line(text)

    def stop(self) -> None:
        """Erase the progress line (before a reply streams to the same terminal, or at the
        end). Safe to call twice."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _line(self, text: str) -> None:
        if self._progress is not None:  # above the progress line, not through it
            self._progress.console.print(f"permeant: {text}", markup=False, highlight=False)
            return
        try:
            print(f"permeant: {text}", file=self.stream, flush=True)
        except (OSError, ValueError):
            pass

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(file=self.stream, stderr=self.stream is sys.stderr)
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  TaskProgressColumn(), TimeElapsedColumn(), console=console,
                                  transient=True, refresh_per_second=8)
        self._progress.start()
        self._task = self._progress.add_task("", total=None)

    # ---- engine events ---------------------------------------------------------------------
    def event(self, ev) -> None:
        from ..engine import events as e

        if isinstance(ev, e.ModelLoading):
            if ev.stage != "settled":  # after "model ready": nothing more to say
                self.stage(f"loading model ({ev.stage})", ev.fraction)
        elif isinstance(ev, e.ModelReady):
            self.stage(f"model ready: {ev.name} in {ev.load_ms:.0f} ms", 1.0)
        elif isinstance(ev, e.TurnStarted) and ev.to_prefill:
            self.stage(f"{ev.agent_id}: prefilling {ev.to_prefill} tokens "
                       f"({ev.cached} reused)", 0.0)
        elif isinstance(ev, e.PrefillProgress) and ev.total:
            self.stage(f"{ev.agent_id}: prefilling {ev.total} tokens", ev.done / ev.total)
        elif isinstance(ev, e.ExportProgress):
            self.stage(f"exporting {ev.agent_id}", ev.fraction)
        elif isinstance(ev, e.Notice):
            self.notices.append(ev.message)
            self.problems += ev.level in ("warning", "error")
        elif isinstance(ev, e.AgentRestored):
            if ev.prefilled:
                self.notices.append(f"{ev.agent_id}: the snapshot was behind the transcript; "
                                    f"restored {ev.tokens - ev.prefilled} tokens from it and "
                                    f"prefilled the last {ev.prefilled} in {ev.ms:.0f} ms")
            elif ev.reason:
                self.notices.append(f"{ev.agent_id}: snapshot not used ({ev.reason}); rebuilt "
                                    f"{ev.tokens} tokens by prefill in {ev.ms:.0f} ms")
            elif self.verbose:
                self._line(f"{ev.agent_id}: restored from {ev.source} ({ev.tokens} tokens, "
                           f"{ev.ms:.0f} ms)")

    def print_notices(self) -> None:
        """Each notice once, one line each, on stderr (a failed snapshot write is retried at
        exit and would otherwise be said twice)."""
        from ..engine.text import printable

        self.stop()
        for n in dict.fromkeys(self.notices):
            try:
                print(f"permeant: {printable(n)}", file=self.stream)
            except (OSError, ValueError):
                pass
        self.notices.clear()
