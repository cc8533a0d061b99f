"""The Textual app: wiring between the workspace screen and the engine (`EngineAPI`). Nothing else.

Engine events arrive on the engine's worker thread; the sink given to `connect` only posts
them to the app (thread-safe). `on_engine_event` (app_events.py) is the one router from events
to widgets and notifications. Widgets post what the person asked for; the handlers below call the engine.
Gauges and each agent's state are fed by one timer that samples `engine.stats()` (sampled at
once, too, when an event says a turn moved on).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from textual.app import App
from textual.binding import Binding
from textual.command import CommandPalette
from textual.worker import Worker, WorkerState

from .app_events import EngineEvent, EngineEventRouting
from .conversation import conversation_markdown
from .engine.agent import DEFAULT_AGENTS
from .engine.api import AgentView, EngineAPI
from .engine.atomic import write_atomic
from .engine.events import Event
from .engine.text import printable
from .palette import HistorySearch, WorkspaceCommands
from .preferences import Preferences, load_preferences
from .screens.agent_settings import AgentSettingsScreen
from .screens.confirm import ConfirmScreen
from .screens.help import HelpScreen, binding_ids, workspace_keys
from .screens.migrate import MigrateScreen, MigrationRequest
from .screens.workspace import WorkspaceScreen
from .widgets.agent_pane import RECENT_TURNS, AgentPane
from .widgets.team_prompt import TeamPrompt

T = TypeVar("T")

class PermeantApp(EngineEventRouting, App[None]):
    TITLE = "Permeant"
    # App-wide, then the workspace screen's (Textual reads only pushed screens' CSS_PATH).
    CSS_PATH = ["styles/app.tcss", "screens/workspace.tcss"]
    COMMANDS = App.COMMANDS | {WorkspaceCommands}
    STATS_INTERVAL = 0.5
    BINDINGS = [
        Binding("ctrl+e", "export", "Export", id="export", priority=True,
                tooltip="Export the focused agent's KV state as a USXF file"),
        Binding("ctrl+s", "save", "Save", id="save", priority=True, show=False,
                tooltip="Save every agent's KV snapshot now"),
        Binding("escape", "cancel_turn", "Cancel", id="cancel",
                tooltip="Cancel the focused agent's turn (from the team prompt: the team's turns)"),
        Binding("ctrl+r", "reset", "Reset", id="reset", priority=True,
                tooltip="Forget the focused agent's conversation and KV cache (asks first)"),
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True,
                tooltip="Finish or cancel the turn in flight, save every agent, quit"),
        # `?` only outside text boxes (they consume printable keys before bindings see them).
        Binding("f1,question_mark", "help", "Help", id="help",
                tooltip="Show every key and its keymap id"),
        Binding("ctrl+f", "search", "Search", id="search", priority=True, show=False,
                tooltip="Search every agent's conversation; Enter jumps to the turn"),
        Binding("ctrl+l", "continue_reply", "Continue", id="continue", priority=True,
                show=False, tooltip="Continue the focused agent's last reply (one cut by the "
                "length limit) from its KV cache, without re-reading the conversation"),
        Binding("f5", "regenerate", "Regenerate", id="regenerate", priority=True, show=False,
                tooltip="Sample the focused agent's last reply again (the old one stays if "
                "you cancel)"),
        Binding("f8", "agent_settings", "Agent settings", id="agent.settings", priority=True,
                show=False, tooltip="Temperature, top-p, repetition penalty and max tokens of "
                "the focused agent (saved in the workspace)"),
    ]
    WORKSPACE_ACTIONS = frozenset({"export", "save", "cancel_turn", "reset", "help", "search",
                                   "continue_reply", "regenerate", "agent_settings"})

    def __init__(self, engine: EngineAPI, workspace_label: str = "",
                 preferences: Preferences | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.workspace_label = workspace_label
        self.preferences = preferences if preferences is not None else load_preferences()
        self.engine_stopped = False
        self._quitting = False
        self._save_requested = False
        self._titles: dict[str, str] = {}
        self._team_questions: deque[str] = deque()  # asked, coordinator turn not yet queued
        self.set_keymap(self.preferences.keymap)

    # start-up

    def get_default_screen(self) -> WorkspaceScreen:
        views = self._call(self.engine.agents) or [AgentView(*agent, ()) for agent in DEFAULT_AGENTS]
        self._titles = {view.agent_id: printable(view.title) for view in views}
        return WorkspaceScreen(views, self.workspace_label)

    @property
    def workspace(self) -> WorkspaceScreen:
        return self.screen_stack[0]  # type: ignore[return-value]

    def on_ready(self) -> None:
        self._check_preferences()
        # After the first paint: the workspace is on screen before the model starts loading.
        self.engine.connect(self._sink)
        self._call(self.engine.start)
        self._sample_stats()
        self.set_interval(self.STATS_INTERVAL, self._sample_stats)

    def _sink(self, event: Event) -> None:
        # Runs on the engine's thread: post and return, nothing else.
        self.post_message(EngineEvent(event))

    def _sample_stats(self) -> None:
        stats = self._call(self.engine.stats, quiet=True)
        if stats is not None and self.screen_stack:  # the timer can fire while the app closes
            self.workspace.show_stats(stats)

    # what the person asks for -> engine

    def on_agent_pane_submitted(self, message: AgentPane.Submitted) -> None:
        self._call(self.engine.submit, message.agent_id, message.text)

    def on_agent_pane_drafted(self, message: AgentPane.Drafted) -> None:
        self._call(self.engine.prepare, message.agent_id, message.text, quiet=True)

    def on_team_prompt_asked(self, message: TeamPrompt.Asked) -> None:
        self._team_questions.append(message.question)
        try:
            self.engine.ask_team(message.question)
        except Exception as error:
            self._team_questions.pop()
            self._failed("ask team", error)

    async def on_agent_pane_load_more(self, message: AgentPane.LoadMore) -> None:
        turns = self._call(self.engine.load_more, message.agent_id, message.before, RECENT_TURNS)
        pane = self.workspace.pane(message.agent_id)
        if turns is not None and pane is not None:
            await pane.prepend_history(turns, message.before - len(turns))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.WORKSPACE_ACTIONS and isinstance(
                self.screen, (ConfirmScreen, MigrateScreen, HelpScreen, AgentSettingsScreen)):
            return False
        return True

    def action_export(self) -> None:
        pane = self.workspace.active_pane
        if pane is not None:
            pane.export_progress(0.0)
            self._call(self.engine.export, pane.agent_id)

    def action_save(self) -> None:
        self._save_requested = True
        self._call(self.engine.save)

    def action_continue_reply(self) -> None:
        self._redo("continue_reply")

    def action_regenerate(self) -> None:
        self._redo("regenerate")

    def _redo(self, method: str) -> None:
        """Continue or regenerate the focused agent's last reply, once its turns are done."""
        pane = self.workspace.active_pane
        if pane is not None and pane.busy:
            self._tell("Wait for the turn in flight to finish (or cancel it with escape).",
                       pane.agent_title, "warning")
        elif pane is not None:
            self._call(getattr(self.engine, method), pane.agent_id)

    def action_agent_settings(self) -> None:
        pane = self.workspace.active_pane
        settings = self._call(self.engine.settings)
        spec = settings.agent(pane.agent_id) if pane is not None and settings else None
        if pane is None or settings is None or spec is None:
            return

        def save(values: dict | None) -> None:
            if values:
                if self._call(self.engine.update_agent_settings, pane.agent_id,
                              **values) is not None:
                    shown = ", ".join(f"{k} {'default' if v is None else f'{v:g}'}"
                                      for k, v in values.items())
                    self._tell(shown, f"{pane.agent_title}: settings saved")
            pane.input.focus()

        self.push_screen(AgentSettingsScreen(pane.agent_title, spec, settings.max_tokens), save)

    def action_cancel_turn(self) -> None:
        screen = self.workspace
        if screen.team_focused:
            agents = [pane.agent_id for pane in screen.panes if pane.busy]
        else:
            agents = [screen.active_agent] if screen.active_agent else []
        for agent_id in agents:
            self._call(self.engine.cancel, agent_id)

    def action_reset(self) -> None:
        pane = self.workspace.active_pane
        if pane is None:
            return

        def reset(confirmed: bool | None) -> None:
            if confirmed:
                self._call(self.engine.reset, pane.agent_id)
            pane.input.focus()

        self.push_screen(
            ConfirmScreen(
                f"Reset {pane.agent_title}?",
                "Its conversation and KV cache are forgotten; the transcript is archived.",
                confirm_label="Reset",
            ),
            reset,
        )

    def action_migrate(self) -> None:
        pane = self.workspace.active_pane
        if pane is None:
            return

        def go(request: MigrationRequest | None) -> None:
            if request is not None:
                self._tell(f"to {request.target} (quant {request.quant})",
                           f"Migrating {pane.agent_title}")

                def migrate() -> None:
                    from .migrate import start_migration  # the network stack, only when used

                    start_migration(self.engine, pane.agent_id, request.target, pin=request.pin,
                                    quant=request.quant, move=request.move, on_event=self._sink)

                self._call(migrate)
            pane.input.focus()

        self.push_screen(MigrateScreen(pane.agent_title), go)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            sections = workspace_keys(self.BINDINGS, self.preferences.keymap,
                                      self.get_key_display)
            self.push_screen(HelpScreen(sections, printable(
                f"Change a key in {self.preferences.shown_path}, e.g. under [keymap]: "
                '"pane.1" = "alt+1"')))

    def action_search(self) -> None:
        if not isinstance(self.screen, CommandPalette):
            self.push_screen(CommandPalette(providers=[HistorySearch], id="--history-search",
                                            placeholder="Search every agent's conversation…"))

    async def show_turn(self, agent_id: str, index: int) -> None:
        """Focus `agent_id`'s pane and scroll to the turn at transcript `index` (a search hit),
        loading earlier turns first if it is not shown yet."""
        pane = self.workspace.pane(agent_id)
        if pane is None:
            return
        self.workspace.activate(agent_id)
        if index < pane.first_index:
            turns = self._call(self.engine.load_more, agent_id, pane.first_index,
                               pane.first_index - index)
            if turns is None:
                return
            await pane.prepend_history(turns, pane.first_index - len(turns))
        self.call_after_refresh(pane.scroll_to_turn, index)

    def action_export_markdown(self) -> None:
        pane = self.workspace.active_pane
        if pane is None:
            return
        views = self._call(self.engine.agents) or []
        view = next((v for v in views if v.agent_id == pane.agent_id), None)
        if view is None:
            return
        path = Path(self.engine.folder) / "exports" / f"{view.agent_id}.md"
        try:
            write_atomic(path, conversation_markdown(view).encode("utf-8"))
        except OSError as error:
            self._tell(f"{error}\nCheck the exports folder has room and is writable.",
                       f"Markdown export of {pane.agent_title} failed", "error", timeout=20)
            return
        self._tell(f"{path}\n{len(view.turns):,} turns", f"Exported {pane.agent_title} as "
                   "Markdown", timeout=12)

    def _check_preferences(self) -> None:
        known = binding_ids(self.BINDINGS, ConfirmScreen.BINDINGS, MigrateScreen.BINDINGS,
                            AgentSettingsScreen.BINDINGS)
        for problem in self.preferences.check(known):
            self._tell(problem, "Keymap", "warning", timeout=15)

    async def action_quit(self) -> None:
        if self._quitting:
            return
        self._quitting = True
        self._tell("Finishing the turn in flight and saving every agent…", "Quitting")
        self.run_worker(self._shutdown_engine, name="engine-shutdown", thread=True,
                        exit_on_error=False)

    def _shutdown_engine(self) -> None:
        self.engine.shutdown()
        self.engine_stopped = True
        self.call_from_thread(self.exit, return_code=0)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.name == "engine-shutdown":
            self.exit(return_code=1, message=f"permeant: could not stop the engine cleanly: "
                                             f"{event.worker.error}")

    # small things

    def _title(self, agent_id: str | None) -> str:
        return self._titles.get(agent_id or "", agent_id or "")

    def _tell(self, text: str, title: str = "", severity: str = "information",
              timeout: float | None = None) -> None:
        """A notification; its text may come from files or the network: never markup, and
        control characters escaped (line breaks kept between lines)."""
        text = "\n".join(printable(line) for line in str(text).split("\n"))
        self.notify(text, title=printable(title), severity=severity,  # type: ignore[arg-type]
                    timeout=timeout, markup=False)

    def _call(self, method: Callable[..., T], *args: Any, quiet: bool = False,
              **kwargs: Any) -> T | None:
        """Call the engine; a failure becomes a notification, never a crash."""
        try:
            return method(*args, **kwargs)
        except Exception as error:
            if not quiet:
                self._failed(method.__name__.replace("_", " "), error)
            return None

    def _failed(self, what: str, error: Exception) -> None:
        self._tell(str(error) or type(error).__name__, f"{what} failed", "error", timeout=15)


def run_tui(engine: EngineAPI, workspace_label: str = "") -> int:
    """Run the workspace until the person quits; returns the process exit code.

    The app connects and starts the engine itself. However the app ends, the engine is shut
    down (turn in flight cancelled, dirty agents saved) before this returns.
    """
    app = PermeantApp(engine, workspace_label)
    try:
        app.run()
    finally:
        if not app.engine_stopped:
            try:
                engine.shutdown()
            except Exception as error:
                print(f"permeant: could not stop the engine cleanly: {error}", file=sys.stderr)
    return app.return_code or 0
