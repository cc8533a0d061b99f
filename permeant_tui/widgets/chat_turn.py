"""One exchange in an agent pane: the user's message, then the reply streamed as Markdown.

Tokens are written through `Markdown.get_stream` (as Toad does), at most every FLUSH_SECONDS,
and the stream coalesces fragments when they arrive faster than the widget renders; the whole
message is never re-parsed per batch. When the turn ends the stream is stopped and, only if the engine's final reply differs
from what was streamed, the document is replaced once with `Markdown.update` (as oterm does).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.timer import Timer
from textual.widgets import Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from ..conversation import team_question

# Token batches are written to the Markdown at most this often: each write re-lays the screen
# out, and a person cannot read faster than ten updates a second anyway.
FLUSH_SECONDS = 0.1
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
        self._stream: MarkdownStream | None = None
        self._unwritten = ""
        self._flush_timer: Timer | None = None
        self._user_view = Static(user_content(user), classes="user")
        self._reply_view = Markdown(reply, classes="reply")
        self._note = note
        self._note_view = Label(note, classes="note", markup=False)
        self._note_view.display = bool(note)
        self._before: tuple[str, str] | None = None  # (reply, note) before a continue/regenerate

    def compose(self) -> ComposeResult:
        yield self._user_view
        yield self._reply_view
        yield self._note_view

    @property
    def reply(self) -> str:
        return self._reply

    def set_user(self, user: str) -> None:
        if user and user != self._user:
            self._user = user
            self._user_view.update(user_content(user))

    async def append(self, text: str) -> None:
        """Add a batch of generated text to the reply (shown within FLUSH_SECONDS)."""
        if not text:
            return
        self._reply += text
        self._unwritten += text
        if self._flush_timer is None:
            self._flush_timer = self.set_timer(FLUSH_SECONDS, self._flush)

    async def _flush(self) -> None:
        self._flush_timer = None
        text, self._unwritten = self._unwritten, ""
        if not text:
            return
        self.remove_class("-pending")
        if self._stream is None:
            self._stream = Markdown.get_stream(self._reply_view)
        await self._stream.write(text)

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
            self._reply = ""
            await self._reply_view.update("")

    async def restore(self, why: str) -> None:
        """The continue or regenerate did not complete: the old reply and note, and why."""
        if self._before is None:
            await self.finish(note=why, state="cancelled")
            return
        reply, note = self._before
        self._before = None
        self._unwritten = ""
        await self.finish(reply, f"{note} · {why}" if note else why, state="done")

    async def finish(self, reply: str | None = None, note: str = "", state: str = "done") -> None:
        """Stop streaming; show the final reply (one update at most) and the footnote."""
        if self._flush_timer is not None:
            self._flush_timer.stop()
        await self._flush()
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.remove_class("-pending", "-continuing")
        self.add_class(f"-{state}")
        self._before = None
        self._note = note
        if reply is not None and reply != self._reply:
            self._reply = reply
            await self._reply_view.update(reply)
        self._note_view.update(note)
        self._note_view.display = bool(note)
