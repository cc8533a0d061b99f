"""One exchange in an agent pane: the user's message, then the reply, rendered as Markdown.

While a reply streams, Markdown is the expensive part: each write re-parses the last block and
mounts its widgets again, and the screen is laid out anew. So the growing text goes, at most
every FLUSH_SECONDS, into a plain-text `Static` (its `Content` re-wrapped, nothing parsed or
mounted), and the Markdown takes the finished blocks (text up to a blank line) only every
MARKDOWN_SECONDS, through `Markdown.get_stream` (as Toad does); the plain text holds only what
came after them. When the turn ends the stream is stopped and the Markdown is rendered once
from the whole reply with `Markdown.update` (as oterm does), so a finished turn shows exactly
what the same turn loaded from disk shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.timer import Timer
from textual.widgets import Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from ..conversation import team_question

# The plain text of a streaming reply is redrawn at most this often: each redraw repaints the
# screen (~6 ms here, taken from the decode on a 2-core machine), and five updates a second
# read as a steady stream.
FLUSH_SECONDS = 0.2
# Finished blocks move from the plain text to the Markdown at most this often (0: only when
# the turn ends).
MARKDOWN_SECONDS = 1.5
# The plain text's box grows this many lines at a time: a box that changes height lays the
# screen out again (every widget of every pane), a box with room left only repaints.
LIVE_LINES_STEP = 4
# A coordinator's brief quotes both colleagues' answers, which are already on screen.
USER_PREVIEW_CHARS = 400


def preview(text: str, limit: int = USER_PREVIEW_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def user_content(user: str) -> Content:
    """The user's message as shown: literal text (never markup); a coordinator's team brief as
    "Team brief: <question>" (the rest of the brief quotes replies already on screen)."""
    question = team_question(user)
    if question is not None:
        return Content.assemble(("Team brief: ", "bold"), preview(question))
    return Content(preview(user) or "…")


def finished_blocks_end(text: str, start: int) -> int:
    """Where the Markdown blocks of `text` that are surely finished end: after its last blank
    line past `start` (`start` when there is none)."""
    cut = text.rfind("\n\n", start)
    return cut + 2 if cut >= start else start


class ChatTurn(Vertical):
    """The user's message, the agent's reply and a one-line footnote (tokens, speed)."""

    def __init__(
        self,
        user: str,
        reply: str = "",
        *,
        turn_id: int | None = None,
        index: int | None = None,
        note: str = "",
        pending: bool = False,
    ) -> None:
        super().__init__(classes="-pending" if pending else "")
        self.turn_id = turn_id
        self.index = index  # in the agent's transcript; None until the turn is done
        self._user = user
        self._reply = reply
        # What the Markdown was last rendered from, whole (None once the stream wrote to it).
        self._rendered: str | None = reply
        self._in_markdown = len(reply)  # self._reply[:_in_markdown] is in the Markdown
        self._shown = len(reply)  # self._reply[:_shown] is on screen (Markdown + plain text)
        self._stream: MarkdownStream | None = None
        self._flush_timer: Timer | None = None
        self._flushed_at = -1e9  # monotonic time the plain text was last shown
        self._flush_soon = False  # a flush is asked for after the next refresh
        self._markdown_timer: Timer | None = None
        self._user_view = Static(user_content(user), classes="user")
        self._reply_view = Markdown(reply, classes="reply")
        self._live_view = Static("", classes="live", markup=False)
        self._live_view.display = False
        self._live_lines = 0  # the height the live view was last laid out with
        self._note = note
        self._note_view = Label(note, classes="note", markup=False)
        self._note_view.display = bool(note)
        self._before: tuple[str, str] | None = None  # (reply, note) before a continue/regenerate
        # Called each time streamed text is shown (the pane's gauges follow in the same frame).
        self.on_shown: Callable[[], None] | None = None

    def compose(self) -> ComposeResult:
        yield self._user_view
        yield self._reply_view
        yield self._live_view
        yield self._note_view

    @property
    def reply(self) -> str:
        return self._reply

    def set_user(self, user: str) -> None:
        if user and user != self._user:
            self._user = user
            self._user_view.update(user_content(user))

    async def append(self, text: str) -> None:
        """Add a batch of generated text to the reply: shown at the next refresh when nothing was
        shown for FLUSH_SECONDS (the first words of a reply, text after a pause), else when they
        have passed."""
        if not text:
            return
        self._reply += text
        if self._flush_timer is None and not self._flush_soon:
            wait = self._flushed_at + FLUSH_SECONDS - time.monotonic()
            if wait <= 0:  # after the next refresh: a new turn is laid out (and anchored) first
                self._flush_soon = self.call_after_refresh(self._flush)
            else:
                self._flush_timer = self.set_timer(wait, self._flush)
        if self._markdown_timer is None and MARKDOWN_SECONDS > 0:
            self._markdown_timer = self.set_timer(MARKDOWN_SECONDS, self._flush_markdown)

    def _flush(self) -> None:
        """Show the text not yet in the Markdown as plain text."""
        self._flush_timer, self._flush_soon = None, False
        if self._shown == len(self._reply):
            return
        self._flushed_at = time.monotonic()
        self._shown = len(self._reply)
        self.remove_class("-pending")
        self._show_tail(self._reply[self._in_markdown:])
        if self.on_shown is not None:
            self.on_shown()

    async def _flush_markdown(self) -> None:
        """Move the finished blocks of the shown text from the plain text to the Markdown."""
        self._markdown_timer = None
        end = finished_blocks_end(self._reply[:self._shown], self._in_markdown)
        if end == self._in_markdown:
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(self._reply_view)
        self._rendered = None
        await self._stream.write(self._reply[self._in_markdown:end])
        self._in_markdown = end
        self._show_tail(self._reply[end:self._shown])

    def _show_tail(self, tail: str) -> None:
        """The plain text below the Markdown (a blank line apart when the Markdown has text).

        The screen is laid out again only when the text needs more room than its box has (it
        grows LIVE_LINES_STEP lines at a time): a layout visits every widget of every pane, a
        repaint only this one."""
        view = self._live_view
        content = Content(tail)
        width = view.content_region.width
        lines = len(content.wrap(width)) if tail and width > 0 else 0
        room = -(-lines // LIVE_LINES_STEP) * LIVE_LINES_STEP
        relayout = not width or room != self._live_lines or view.display != bool(tail)
        self._live_lines = room
        if relayout:
            view.styles.height = room if room else None  # None: as tall as its text
        view.update(content, layout=relayout)
        view.display = bool(tail)
        view.set_class(bool(self._reply[:self._in_markdown].strip()), "-below")

    def _stop_timers(self) -> None:
        for timer in (self._flush_timer, self._markdown_timer):
            if timer is not None:
                timer.stop()
        self._flush_timer = self._markdown_timer = None

    async def reopen(self, *, clear: bool) -> None:
        """Stream into this finished turn again: a continue appends to its reply, a regenerate
        (`clear`) replaces it. `restore()` brings the old reply back if that turn does not
        complete."""
        self._before = (self._reply, self._note)
        for state in ("-done", "-cancelled", "-failed"):
            self.remove_class(state)
        self.add_class("-pending" if clear else "-continuing")
        self._note_view.update("continuing…" if not clear else "regenerating…")
        self._note_view.display = True
        if clear:
            self._reply = self._rendered = ""
            self._in_markdown = self._shown = 0
            await self._reply_view.update("")

    async def restore(self, why: str) -> None:
        """The continue or regenerate did not complete: the old reply and note, and why."""
        if self._before is None:
            await self.finish(note=why, state="cancelled")
            return
        reply, note = self._before
        self._before = None
        await self.finish(reply, f"{note} · {why}" if note else why, state="done")

    async def finish(self, reply: str | None = None, note: str = "", state: str = "done") -> None:
        """Stop streaming; render the final reply as Markdown (once) and show the footnote."""
        self._stop_timers()
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.remove_class("-pending", "-continuing")
        self.add_class(f"-{state}")
        self._before = None
        self._note = note
        if reply is not None:
            self._reply = reply
        self._in_markdown = self._shown = len(self._reply)
        if self._reply != self._rendered:
            self._rendered = self._reply
            await self._reply_view.update(self._reply)
        self._show_tail("")
        self._note_view.update(note)
        self._note_view.display = bool(note)
