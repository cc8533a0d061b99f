"""One agent's pane: its conversation (streamed Markdown), its turn state, gauges and input.

The pane never calls the engine. It posts what the person asked for (`Submitted`, `LoadMore`,
`Drafted` when typing pauses) and the app calls the engine; the app's event router calls the
methods below as engine events arrive (they stream the text). The agent's state (queued,
prefilling, generating, done, ...) is the engine's own, read from `AgentStats.state` on the
app's stats timer, and shown as the border subtitle; events only add the prefill count
("prefilling 120/300").
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.markup import escape
from textual.message import Message
from textual.reactive import reactive
from textual.timer import Timer
from textual.widgets import Button, ProgressBar

from ..conversation import code_blocks, team_question
from ..engine.api import AgentView, TurnView
from ..engine.events import AgentStats, TurnResult
from ..engine.text import printable
from .chat_turn import ChatTurn
from .gauges import AgentGauges, LiveFigures
from .message_input import MessageInput

RECENT_TURNS = 20  # turns a "load more" adds
# Turns mounted at start: each is a Markdown of several widgets, and three panes of twenty made
# the first paint take seconds. Older ones are mounted when the person scrolls to the top of
# the conversation, presses the button above it or the load-more key (they are on disk).
FIRST_PAINT_TURNS = 4
# Of those, the first frame holds only the newest, the one a person reads first: each Markdown
# costs 40-70 ms to mount and lay out here, three panes of four took the first paint from 0.6 s
# to 1.1 s. The others are mounted above it once start-up's work is over (the engine's
# "settled": the model loaded and the recent agents restored), when the model fails, when the
# person scrolls to the top, or HISTORY_SECONDS after the first frame, whichever comes first:
# mounted right after the first frame, they took ~520 ms of the UI thread while the weights
# loaded, and the model was ready 1.56 s after start instead of 1.30 (bench/cold_start.py).
FIRST_FRAME_TURNS = 1
HISTORY_SECONDS = 5.0
# The live gauges follow the stream at most this often, in the frame that shows new text (a
# token can arrive every few ms on a Mac; a frame that repaints the gauges costs 8-15 ms here,
# one that repaints only the text 2-4: bench/ui_overhead.py). The stats timer shows them too
# when no text has come for twice as long (a long prefill).
LIVE_GAUGE_SECONDS = 1.0
clock = time.monotonic  # the live gauges' cadence (tests set their own)
BUSY_STATES = frozenset({"queued", "prefilling", "generating"})
# The engine's agent states (AgentStats.state), plus what an idle agent shows while the model
# loads ("loading") or after it failed to load ("unavailable").
STATE_LABELS = {
    "loading": "waiting for the model",
    "idle": "ready",
    "queued": "queued",
    "prefilling": "prefilling",
    "generating": "generating",
    "done": "done",
    "failed": "failed",
    "unavailable": "no model",
}
STATE_STYLES = {
    "queued": "$text-warning",
    "prefilling": "$text-warning",
    "generating": "bold $text-success",
    "failed": "$text-error",
    "unavailable": "$text-error",
}


def turn_note(result: TurnResult) -> str:
    return _note(result.generated, result.decode_tok_s, result.cached, result.prefilled,
                 result.finish_reason)


def history_turn(turn: TurnView, index: int) -> ChatTurn:
    """A finished turn of the transcript, as shown."""
    return ChatTurn(turn.user, turn.reply, index=index, note=history_note(turn.stats))


def history_note(stats: dict | None) -> str:
    """The same footnote for a turn of an earlier session, from the figures its transcript
    line keeps ("" for turns recorded before they were kept, or unreadable ones)."""
    if not stats:
        return ""
    try:
        return _note(int(stats["generated"]), float(stats["decode_tok_s"]),
                     int(stats.get("cached", 0)), int(stats.get("prefilled", 0)),
                     str(stats.get("finish", "")))
    except (KeyError, TypeError, ValueError):
        return ""


def _note(generated: int, tok_s: float, cached: int, prefilled: int, finish: str) -> str:
    parts = [f"{generated} tokens", f"{tok_s:.1f} tok/s"]
    if cached:
        parts.append(f"{cached:,} reused")
    if prefilled:
        parts.append(f"{prefilled:,} prefilled")
    if finish not in ("stop", ""):
        parts.append(f"stopped: {printable(finish)}")
    return " · ".join(parts)


class AgentPane(Vertical):
    """Title in the border, conversation, gauges, input."""

    class Submitted(Message):
        """The person pressed Enter in this pane's input."""

        def __init__(self, agent_id: str, text: str) -> None:
            super().__init__()
            self.agent_id = agent_id
            self.text = text

    class Drafted(Submitted):
        """Typing paused while the agent is idle: the text so far, for the engine to prefill."""

    class LoadMore(Message):
        """Older turns are wanted: transcript indices before `before`."""

        def __init__(self, agent_id: str, before: int) -> None:
            super().__init__()
            self.agent_id = agent_id
            self.before = before

    class Streaming(Message):
        """A reply started or stopped streaming in this pane (see `streaming`)."""

    state: reactive[str] = reactive("loading")
    detail: reactive[str] = reactive("")

    def __init__(self, view: AgentView, *, recent: int = FIRST_PAINT_TURNS) -> None:
        super().__init__(id=f"pane-{view.agent_id}")
        self.agent_id = view.agent_id
        # The title comes from a file (settings, an imported USXF): one line, never markup.
        self.agent_title = printable(view.title)
        self.border_title = Content(self.agent_title)
        self._initial = view.turns[-recent:] if recent else ()
        self.first_index = len(view.turns) - len(self._initial)
        self._deferred = 0  # of the initial turns, how many are not mounted yet (show_history)
        self._history_timer: Timer | None = None
        self._next_index = len(view.turns)  # the transcript index of the next finished turn
        self._last_sent = next((t.user for t in reversed(view.turns)
                                if team_question(t.user) is None), "")
        self._turns: dict[int, ChatTurn] = {}
        self._redo: set[int] = set()  # turn ids that continue or regenerate a shown turn
        self._live: LiveFigures | None = None  # the turn streaming now, for live gauges
        self._live_shown = 0.0  # when the live gauges were last shown (monotonic s)
        self._stats: AgentStats | None = None  # the engine's last figures for this agent
        self._prefill_total = 0
        self.last_finish = ""  # why the last reply of this session stopped ("length": continue)
        self._model = "loading"  # loading | ready | failed: the model's, from its events
        self._engine_state = "idle"  # the agent's, from the engine's stats
        self._prefill: tuple[int, int] | None = None  # (done, total) of the turn prefilling
        # Kept, not queried: events and the stats timer reach these many times a second.
        self._conversation = VerticalScroll(classes="conversation")
        self._load_more_button = Button(self._load_more_label(), id="load-more", compact=True)
        self._export_bar = ProgressBar(total=1.0, show_eta=False, id="export-progress")
        self._gauges = AgentGauges()
        self._message_input = MessageInput(
            Content(f"Message {self.agent_title} (ctrl+j: new line)"), id="message"
        )

    def compose(self) -> ComposeResult:
        self._deferred = max(len(self._initial) - FIRST_FRAME_TURNS, 0)
        with self._conversation:
            yield self._load_more_button
            for index, turn in enumerate(self._initial[self._deferred:],
                                         self.first_index + self._deferred):
                yield history_turn(turn, index)
        yield self._gauges  # the export bar is mounted above it on the first export
        yield self._message_input

    def on_mount(self) -> None:
        self._conversation.anchor()
        self.watch(self._conversation, "scroll_y", self._scrolled, init=False)
        self._sync_load_more()
        self._show_state()
        if self._deferred:
            self._history_timer = self.set_timer(HISTORY_SECONDS, self.show_history)

    async def show_history(self) -> None:
        """The initial turns left out of the first frame, above the ones shown (anchored to the
        bottom, the view does not move). Once; later calls do nothing."""
        if self._history_timer is not None:
            self._history_timer.stop()
            self._history_timer = None
        deferred, self._deferred = self._initial[:self._deferred], 0
        if not deferred:
            return  # reset meanwhile
        turns = [history_turn(turn, index) for index, turn in enumerate(deferred, self.first_index)]
        shown = self._chat_turns()
        if shown:
            await self._conversation.mount_all(turns, before=shown[0])
        else:
            await self._conversation.mount_all(turns, after=self._load_more_button)

    # what the person does

    @property
    def input(self) -> MessageInput:
        return self._message_input

    @property
    def busy(self) -> bool:
        """A turn is queued or running (by the engine's state, or a turn still streaming)."""
        return self.state in BUSY_STATES or bool(self._turns)

    @on(MessageInput.Send)
    def _submit(self, event: MessageInput.Send) -> None:
        event.stop()
        text = event.text.strip()
        if text:
            self._message_input.clear()
            self._last_sent = text
            self.post_message(self.Submitted(self.agent_id, text))

    @on(MessageInput.Paused)
    def _paused(self, event: MessageInput.Paused) -> None:
        event.stop()
        if self._model == "ready" and not self.busy:
            self.post_message(self.Drafted(self.agent_id, event.text))

    @on(MessageInput.Recall)
    def _recall(self, event: MessageInput.Recall) -> None:
        event.stop()
        if self._last_sent:
            self._message_input.recall(self._last_sent)

    @on(MessageInput.Page)
    def _page(self, event: MessageInput.Page) -> None:
        event.stop()
        if event.direction < 0:
            self._conversation.scroll_page_up()
        else:
            self._conversation.scroll_page_down()

    @property
    def last_reply(self) -> str:
        """The newest reply shown (streamed so far, if a turn is still generating)."""
        return next((turn.reply for turn in reversed(self._chat_turns()) if turn.reply), "")

    @property
    def last_code_block(self) -> str:
        """The newest fenced code block in the replies shown."""
        for turn in reversed(self._chat_turns()):
            blocks = code_blocks(turn.reply)
            if blocks:
                return blocks[-1]
        return ""

    def scroll_to_turn(self, index: int) -> bool:
        """Scroll the conversation to the turn at transcript `index` (shown already) and mark
        it; False if it is not shown (load earlier turns first)."""
        turn = next((t for t in self._chat_turns() if t.index == index), None)
        if turn is None:
            return False
        for other in self.query(".-found"):
            other.remove_class("-found")
        turn.add_class("-found")
        self._conversation.release_anchor()
        self._conversation.scroll_to_widget(turn, animate=False, top=True)
        return True

    def _chat_turns(self) -> list[ChatTurn]:
        return list(self._conversation.query_children(ChatTurn))

    @on(Button.Pressed, "#load-more")
    def _load_more(self, event: Button.Pressed) -> None:
        event.stop()
        self.request_more()

    def request_more(self) -> None:
        if self._deferred:  # the initial turns come first (the next scroll up loads more)
            self.call_later(self.show_history)
        elif self.first_index > 0:
            self.post_message(self.LoadMore(self.agent_id, self.first_index))

    def _scrolled(self, scroll_y: float) -> None:
        """Scrolled to the top of a conversation with earlier turns: load them."""
        if scroll_y <= 0 and self._conversation.max_scroll_y > 0:
            self.request_more()

    async def prepend_history(self, turns: Sequence[TurnView], first_index: int) -> None:
        """Show older turns above the ones already shown; scrolled to the top, what was in
        view stays there (the top is not reached again at once, loading more and more)."""
        if turns and first_index + len(turns) != self.first_index:
            return  # asked twice (a scroll and a key): these turns are shown already
        self.first_index = max(first_index, 0) if turns else 0
        self._sync_load_more()
        if not turns:
            return
        conversation = self._conversation
        height = conversation.virtual_size.height
        at_top = conversation.scroll_y <= 0 and conversation.max_scroll_y > 0
        await conversation.mount_all(
            [history_turn(turn, index) for index, turn in enumerate(turns, self.first_index)],
            after="#load-more",
        )
        if at_top:
            self.call_after_refresh(lambda: conversation.scroll_to(
                y=conversation.virtual_size.height - height, animate=False, immediate=True))

    def _load_more_label(self) -> str:
        return f"▲ load earlier turns ({self.first_index} more)"

    def _sync_load_more(self) -> None:
        button = self._load_more_button
        button.display = self.first_index > 0
        button.label = self._load_more_label()

    # what the engine reports

    def model_ready(self) -> None:
        self._model = "ready"
        self._sync_state()

    def model_failed(self) -> None:
        self._model = "failed"
        self._sync_state()
        self.call_later(self.show_history)

    async def turn_queued(self, turn_id: int, user: str, kind: str = "new") -> None:
        """A new turn gets its own widget; a continue or a regenerate streams into the last
        finished turn (kept as it was if it does not complete)."""
        if kind != "new":
            last = next((t for t in reversed(self._chat_turns()) if t.index is not None), None)
            if last is not None:
                await last.reopen(clear=kind == "regenerate")
                self._turns[turn_id] = last
                self._redo.add(turn_id)
                return
        turn = ChatTurn(user, turn_id=turn_id, pending=True)
        self._turns[turn_id] = turn
        await self._conversation.mount(turn)

    async def turn_started(self, turn_id: int, user: str, to_prefill: int,
                           cached: int = 0) -> None:
        turn = await self._turn(turn_id, user)
        turn.set_user(user)
        self._live = LiveFigures(cached)
        self.post_message(self.Streaming())
        self._prefill_total = to_prefill
        self._set_prefill((0, to_prefill) if to_prefill else None)

    def prefill_progress(self, done: int, total: int) -> None:
        self._set_prefill((done, total))
        if self._live is not None:
            self._live.prefilled = done
            self._show_live()

    async def tokens(self, turn_id: int, text: str, n_ids: int = 0) -> None:
        self._set_prefill(None)
        if self._live is not None:
            if self._prefill_total:
                self._live.prefilled = self._prefill_total
            self._live.generated(n_ids, time.monotonic())
        turn = await self._turn(turn_id)
        turn.on_shown = self._text_shown
        await turn.append(text)

    def _text_shown(self) -> None:
        """The streaming turn has just shown new text: the gauges follow in the same frame (one
        repaint, not two), at most every LIVE_GAUGE_SECONDS."""
        now = clock()
        if self._live is not None and now - self._live_shown >= LIVE_GAUGE_SECONDS:
            self._live_shown = now
            self._show_live()

    async def turn_done(self, turn_id: int, result: TurnResult) -> None:
        turn = await self._turn(turn_id, result.user)
        if turn_id not in self._redo:  # a continue or regenerate keeps its turn's place
            turn.index = self._next_index  # finished turns, and only they, join the transcript
            self._next_index += 1
        await turn.finish(result.reply, turn_note(result))
        self.last_finish = result.finish_reason
        self._turn_ended(turn_id)

    async def turn_failed(self, turn_id: int, kind: str) -> None:
        turn = await self._turn(turn_id)
        if turn_id in self._redo:
            await turn.restore(f"failed: {kind}")
        else:
            await turn.finish(note=f"failed: {kind}", state="failed")
        self._turn_ended(turn_id)

    async def turn_cancelled(self, turn_id: int) -> None:
        turn = self._turns.get(turn_id)
        if turn is not None and turn_id in self._redo:
            await turn.restore("cancelled")
        elif turn is not None:
            await turn.finish(note="cancelled", state="cancelled")
        self._turn_ended(turn_id)

    async def reset(self) -> None:
        if self._live is not None:
            self._live = None
            self.post_message(self.Streaming())
        self._turns.clear()
        self._set_prefill(None)
        self.first_index = self._next_index = self._deferred = 0
        await self.query(ChatTurn).remove()
        self._gauges.clear()
        self._sync_load_more()

    def export_progress(self, fraction: float | None) -> None:
        """Show export progress; None hides the bar."""
        self.set_class(fraction is not None, "-exporting")
        if fraction is not None:
            if self._export_bar.parent is None:
                self.mount(self._export_bar, before=self._gauges)
            self._export_bar.update(progress=fraction)

    @property
    def streaming(self) -> bool:
        """A turn of this pane is prefilling or generating."""
        return self._live is not None

    def show_stats(self, stats: AgentStats) -> None:
        self._stats = stats
        # While a reply streams, its text shows the gauges (`_text_shown`); the timer adds a
        # repaint only when no text has come for 2 x LIVE_GAUGE_SECONDS (a prefill: the first
        # text shows them at once all the same).
        if self._live is None:
            self._gauges.show(stats)
        elif clock() - self._live_shown >= 2 * LIVE_GAUGE_SECONDS:
            self._gauges.show(self._live.over(stats))
        if stats.state != self._engine_state:
            self._engine_state = stats.state
            self._sync_state()

    # internals

    def _show_live(self) -> None:
        """The gauges while a reply streams: the engine's figures of the last sample, with the
        context and the speed this turn has reached since (the engine's arrive when it ends)."""
        if self._stats is not None and self._live is not None:
            self._gauges.show(self._live.over(self._stats))

    def _turn_ended(self, turn_id: int) -> None:
        if self._live is not None:
            self._live = None
            self.post_message(self.Streaming())
        self._turns.pop(turn_id, None)
        self._redo.discard(turn_id)
        self._set_prefill(None)

    def _set_prefill(self, progress: tuple[int, int] | None) -> None:
        if progress is not None:
            self._prefill_total = progress[1]
        if progress != self._prefill:
            self._prefill = progress
            self._sync_state()

    def _sync_state(self) -> None:
        """What the border shows: the engine's state; an idle agent shows the model's."""
        state = self._engine_state
        if state in ("idle", "loading", "unavailable"):  # the model's phase, from its events
            state = {"ready": "idle", "failed": "unavailable"}.get(self._model, "loading")
        self.state = state
        self.detail = (f"{self._prefill[0]:,}/{self._prefill[1]:,}"
                       if state == "prefilling" and self._prefill else "")

    async def _turn(self, turn_id: int, user: str = "") -> ChatTurn:
        """The widget for `turn_id`, created if its TurnQueued was never seen."""
        turn = self._turns.get(turn_id)
        if turn is None:
            turn = ChatTurn(user, turn_id=turn_id, pending=True)
            self._turns[turn_id] = turn
            await self._conversation.mount(turn)
        return turn

    def watch_state(self) -> None:
        self._show_state()

    def watch_detail(self) -> None:
        self._show_state()

    @property
    def state_label(self) -> str:
        """What the border shows, without colour: "prefilling 120/300"."""
        return f"{STATE_LABELS.get(self.state, self.state)} {self.detail}".strip()

    def _show_state(self) -> None:
        # Coloured with markup, not a CSS class: a class change would restyle every widget
        # in the pane (each Markdown block of its history) several times per turn.
        style = STATE_STYLES.get(self.state)
        label = escape(self.state_label)
        self.border_subtitle = f"[{style}]{label}[/]" if style else label
