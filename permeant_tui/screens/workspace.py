"""The workspace: status bar, one pane per agent, the team prompt and the footer.

Wide terminals show the panes side by side. Below `WIDE` columns they stack: the active pane
takes the room and the others shrink to their title and state (click one, or F2..F4), and the
footer turns compact.
The screen knows which agent is "focused" (the last pane that had focus), for the app's
export, cancel and reset actions. Its stylesheet, workspace.tcss beside it, styles the widgets
it hosts (the app loads it: Textual does not read a default screen's CSS_PATH).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.events import Click, DescendantFocus, Resize
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Input

from ..engine.api import AgentView
from ..engine.events import EngineStats
from ..widgets.agent_pane import AgentPane
from ..widgets.message_input import MessageInput
from ..widgets.status_bar import StatusBar
from ..widgets.team_prompt import TeamPrompt

WIDE = 100
GIL_SWITCH_SECONDS = 0.001  # sys.setswitchinterval while the workspace is up (see on_mount)
TEAM = "team"
PANES = Binding.Group("Pane")


class WorkspaceScreen(Screen):
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (WIDE, "-wide")]
    BINDINGS = [
        Binding("tab", "cycle(1)", "Next pane", id="pane.next", show=False, priority=True,
                tooltip="Move to the next agent pane (then the team prompt)"),
        Binding("shift+tab", "cycle(-1)", "Previous pane", id="pane.previous", show=False,
                priority=True,
                tooltip="Move to the previous agent pane"),
        # F-keys, not alt+digit: terminals and tmux send alt+1 as ESC 1, which Textual reads
        # as macOS Option+1 and types "¡" into the input. F2..F4 arrive everywhere.
        # Pane keys are priority bindings: handled as the app reads them, so characters typed
        # in the same burst ("F3 x y" in one read) go to the new pane, not the old one.
        Binding("f2", "focus_pane(0)", "Pane 1", id="pane.1", group=PANES, priority=True,
                tooltip="Focus the first agent's pane (Technical)"),
        Binding("f3", "focus_pane(1)", "Pane 2", id="pane.2", group=PANES, priority=True,
                tooltip="Focus the second agent's pane (Business)"),
        Binding("f4", "focus_pane(2)", "Pane 3", id="pane.3", group=PANES, priority=True,
                tooltip="Focus the third agent's pane (Coordinator)"),
        Binding("ctrl+t", "focus_team", "Team", id="team.focus", show=False, priority=True,
                tooltip="Ask the team: technical and business answer, then the coordinator"),
        Binding("ctrl+o", "copy_reply", "Copy reply", id="copy.reply", show=False,
                priority=True, tooltip="Copy the focused agent's last reply to the clipboard"),
        Binding("ctrl+g", "copy_code", "Copy code", id="copy.code", show=False, priority=True,
                tooltip="Copy the last code block of the focused agent's replies"),
    ]

    active_agent: reactive[str] = reactive("", init=False)

    def __init__(self, views: Sequence[AgentView], workspace_label: str = "") -> None:
        super().__init__()
        self._views = list(views)
        self._workspace_label = workspace_label
        # Looked up on every engine event: a dict, not a DOM query over every Markdown block.
        self._panes = {view.agent_id: AgentPane(view) for view in self._views}
        self._status = StatusBar(workspace_label)
        self._team = TeamPrompt()
        self._footer = Footer()
        # Each input's cursor_blink while replies stream (empty when none does).
        self._blinks: dict[MessageInput | Input, bool] = {}
        self._switch_interval = sys.getswitchinterval()  # restored on unmount
        self.set_reactive(WorkspaceScreen.active_agent, views[0].agent_id if views else "")

    def compose(self) -> ComposeResult:
        # The breakpoint class and the footer's size for the size the screen opens at: set on
        # the first Resize instead, each restyles every widget once more before the first paint.
        width = self.app.size.width
        self.set_class(width >= WIDE, "-wide")
        self.set_class(width < WIDE, "-narrow")
        self._footer.compact = width < WIDE
        yield self._status
        with Horizontal(id="panes"):
            for pane in self._panes.values():
                pane.set_class(pane.agent_id == self.active_agent, "-active")
                yield pane
        yield self._team
        yield self._footer

    def on_mount(self) -> None:
        if self.panes:
            self.panes[0].input.focus()
        # The engine's thread decodes in Python between MLX calls and waits for the GIL each
        # time this (UI) thread has it: it gets it back within 1 ms of asking, not Python's 5.
        # Measured (bench/ui_overhead.py): UI cost on decode 12.8% at 5 ms, 4.5-5.6% at 1 ms,
        # 9.0% at 0.5 ms (switching then costs more than it saves).
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_SECONDS)

    def on_unmount(self) -> None:
        sys.setswitchinterval(self._switch_interval)

    def on_resize(self, event: Resize) -> None:
        self._footer.compact = event.size.width < WIDE

    # lookups the app uses

    @property
    def status(self) -> StatusBar:
        return self._status

    @property
    def panes(self) -> list[AgentPane]:
        return list(self._panes.values())

    @property
    def team_prompt(self) -> TeamPrompt:
        return self._team

    def pane(self, agent_id: str | None) -> AgentPane | None:
        return self._panes.get(agent_id or "")

    @property
    def active_pane(self) -> AgentPane | None:
        return self.pane(self.active_agent)

    @property
    def team_focused(self) -> bool:
        focused = self.focused
        return focused is not None and self.team_prompt in focused.ancestors_with_self

    def show_stats(self, stats: EngineStats) -> None:
        self.status.show(stats)
        for agent in stats.agents:
            pane = self.pane(agent.agent_id)
            if pane is not None:
                pane.show_stats(agent)

    # moving between panes

    def activate(self, agent_id: str) -> None:
        """Make `agent_id` the focused agent and put the cursor in its input."""
        pane = self.pane(agent_id)
        if pane is None:
            return
        self.active_agent = agent_id
        # At once, not after a refresh (as `focus()` would): keys typed right after F3 arrive
        # in the same read from the terminal and must reach the new pane. In the stacked
        # layout the pane becomes visible with the class change above, focused already.
        self.set_focus(pane.input)

    def watch_active_agent(self, agent_id: str) -> None:
        for pane in self.panes:
            pane.set_class(pane.agent_id == agent_id, "-active")

    def on_agent_pane_streaming(self, event: AgentPane.Streaming) -> None:
        """No cursor blinks while a reply streams: each blink repaints the screen (twice a
        second, as often as the text and the gauges), and the decode shares the CPU with it."""
        streaming = any(pane.streaming for pane in self._panes.values())
        if streaming == bool(self._blinks):
            return
        inputs: list[MessageInput | Input] = [pane.input for pane in self._panes.values()]
        inputs.append(self._team.input)
        if streaming:
            self._blinks = {widget: widget.cursor_blink for widget in inputs}
            for widget in inputs:
                widget.cursor_blink = False
        else:
            for widget, blink in self._blinks.items():
                widget.cursor_blink = blink
            self._blinks = {}

    def on_descendant_focus(self, event: DescendantFocus) -> None:
        for node in event.widget.ancestors_with_self:
            if isinstance(node, AgentPane):
                self.active_agent = node.agent_id
                return

    def on_click(self, event: Click) -> None:
        # A stacked (collapsed) pane opens when clicked.
        widget = event.widget
        pane = next((node for node in widget.ancestors_with_self if isinstance(node, AgentPane)),
                    None) if widget is not None else None
        if pane is not None and pane.agent_id != self.active_agent:
            self.activate(pane.agent_id)

    def action_focus_pane(self, index: int) -> None:
        panes = self.panes
        if 0 <= index < len(panes):
            self.activate(panes[index].agent_id)

    def action_focus_team(self) -> None:
        self.set_focus(self.team_prompt.input)

    def action_cycle(self, step: int) -> None:
        stops = [pane.agent_id for pane in self.panes] + [TEAM]
        here = TEAM if self.team_focused else self.active_agent
        index = stops.index(here) if here in stops else 0
        target = stops[(index + step) % len(stops)]
        if target == TEAM:
            self.action_focus_team()
        else:
            self.activate(target)

    def action_load_more(self) -> None:
        pane = self.active_pane
        if pane is not None:
            pane.request_more()

    # the clipboard (OSC 52, through Textual: terminals that allow it put it on the system's)

    def action_copy_reply(self) -> None:
        pane = self.active_pane
        if pane is not None:
            self._copy(pane.last_reply, f"{pane.agent_title}'s last reply", "no reply to copy yet")

    def action_copy_code(self) -> None:
        pane = self.active_pane
        if pane is not None:
            self._copy(pane.last_code_block, f"code block from {pane.agent_title}",
                       "no code block in the replies shown")

    def _copy(self, text: str, what: str, nothing: str) -> None:
        if not text:
            self.notify(nothing, title="Nothing copied", severity="warning", markup=False)
            return
        self.app.copy_to_clipboard(text)
        lines = text.count("\n") + 1
        self.notify(f"{what} ({lines:,} line{'s' if lines != 1 else ''}, {len(text):,} "
                    "characters)", title="Copied", markup=False)
