"""An agent's message box: a compact TextArea that grows to a few lines (workspace.tcss).

Enter sends. ctrl+j inserts a newline (it arrives in every terminal and in tmux, as LF, apart
from Enter's CR); shift+enter does too where the terminal tells it apart (kitty's keyboard
protocol: kitty, WezTerm, foot, Ghostty; in tmux and most others it arrives as plain Enter).
Up in an empty box recalls the last message sent, to edit and resend it. PageUp/PageDown
scroll the conversation above, not the few lines of the box.

Keys are taken in the order they were typed. Textual resolves a widget's (non-priority)
bindings only when the key has bubbled up to the app, against whatever has focus *then*; so a
backspace typed just before F3 (one read from the terminal) would edit the pane F3 moved to,
and a priority Enter would send before the characters typed ahead of it reached the box. Here
the box runs its own bindings (the keymap applied) as it receives each key.

Typing that pauses for PAUSE_SECONDS posts `Paused` with the text so far: the engine prefills
it while the person finishes the message (engine/drafts.py), so Enter waits for less.

The widget never calls the engine; it posts `Send`, `Recall`, `Page` and `Paused` for its pane.
"""

from __future__ import annotations

from textual import events, on
from textual.binding import Binding
from textual.content import Content
from textual.message import Message
from textual.timer import Timer
from textual.widgets import TextArea

PAUSE_SECONDS = 0.4  # a pause in typing this long posts `Paused`


class MessageInput(TextArea):
    BINDINGS = [
        Binding("enter", "send", "Send", id="message.send", show=False,
                tooltip="Send the message to this agent"),
        Binding("ctrl+j,shift+enter", "newline", "New line", id="message.newline",
                show=False,
                tooltip="Start a new line in the message (shift+enter where the terminal "
                        "reports it)"),
        Binding("up", "recall", "Recall last", id="message.recall", show=False,
                tooltip="In an empty box: bring back the last message sent, to edit and resend"),
        Binding("pageup", "page(-1)", "Scroll up", id="conversation.page_up", show=False,
                tooltip="Scroll the conversation up a page"),
        Binding("pagedown", "page(1)", "Scroll down", id="conversation.page_down",
                show=False, tooltip="Scroll the conversation down a page"),
    ]

    class Send(Message):
        """Enter was pressed: the text to send (possibly empty: the pane decides)."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class Recall(Message):
        """Up in an empty box: the pane puts its last message back."""

    class Paused(Message):
        """Typing paused with text in the box: the text so far (for the engine to prefill)."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class Page(Message):
        def __init__(self, direction: int) -> None:
            super().__init__()
            self.direction = direction

    def __init__(self, placeholder: str | Content = "", *, id: str | None = None) -> None:
        super().__init__(compact=True, soft_wrap=True, tab_behavior="focus",
                         highlight_cursor_line=False, placeholder=placeholder, id=id)
        self._pause: Timer | None = None

    @on(TextArea.Changed)
    def _typed(self) -> None:
        if self._pause is not None:
            self._pause.stop()
        self._pause = self.set_timer(PAUSE_SECONDS, self._paused) if self.text.strip() else None

    def _paused(self) -> None:
        self._pause = None
        if self.text.strip():
            self.post_message(self.Paused(self.text))

    async def _on_key(self, event: events.Key) -> None:
        binding = self._own_binding(event.key)
        if binding is None:
            await super()._on_key(event)  # characters, Enter's newline in a plain TextArea
            return
        event.stop()
        event.prevent_default()
        await self.run_action(binding.action)

    def _own_binding(self, key: str) -> Binding | None:
        """This box's (non-priority) binding for `key`, with the app's keymap applied."""
        bindings = self._bindings.copy()
        keymap = self.app._keymap
        if keymap:
            bindings.apply_keymap(keymap)
        return next((b for b in bindings.key_to_bindings.get(key, ()) if not b.priority), None)

    def action_send(self) -> None:
        self.post_message(self.Send(self.text))

    def action_newline(self) -> None:
        self.insert("\n")

    def action_recall(self) -> None:
        if self.text:
            self.action_cursor_up()
        else:
            self.post_message(self.Recall())

    def action_page(self, direction: int) -> None:
        self.post_message(self.Page(direction))

    def recall(self, text: str) -> None:
        """Show `text` for editing, the cursor at its end."""
        self.load_text(text)
        self.move_cursor(self.document.end)
