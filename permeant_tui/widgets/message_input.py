"""An agent's message box: a compact TextArea that grows to a few lines (workspace.tcss).

Enter sends. ctrl+j inserts a newline (it arrives in every terminal and in tmux, as LF, apart
from Enter's CR); shift+enter does too where the terminal tells it apart (kitty's keyboard
protocol: kitty, WezTerm, foot, Ghostty; in tmux and most others it arrives as plain Enter).
Up in an empty box recalls the last message sent, to edit and resend it. PageUp/PageDown
scroll the conversation above, not the few lines of the box.

The widget never calls the engine; it posts `Send`, `Recall` and `Page` for its pane.
"""

from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea


class MessageInput(TextArea):
    BINDINGS = [
        Binding("enter", "send", "Send", id="message.send", priority=True, show=False,
                tooltip="Send the message to this agent"),
        Binding("ctrl+j,shift+enter", "newline", "New line", id="message.newline",
                priority=True, show=False,
                tooltip="Start a new line in the message (shift+enter where the terminal "
                        "reports it)"),
        Binding("up", "recall", "Recall last", id="message.recall", priority=True, show=False,
                tooltip="In an empty box: bring back the last message sent, to edit and resend"),
        Binding("pageup", "page(-1)", "Scroll up", id="conversation.page_up", priority=True,
                show=False, tooltip="Scroll the conversation up a page"),
        Binding("pagedown", "page(1)", "Scroll down", id="conversation.page_down",
                priority=True, show=False, tooltip="Scroll the conversation down a page"),
    ]

    class Send(Message):
        """Enter was pressed: the text to send (possibly empty: the pane decides)."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class Recall(Message):
        """Up in an empty box: the pane puts its last message back."""

    class Page(Message):
        def __init__(self, direction: int) -> None:
            super().__init__()
            self.direction = direction

    def __init__(self, placeholder: str = "", *, id: str | None = None) -> None:
        super().__init__(compact=True, soft_wrap=True, tab_behavior="focus",
                         highlight_cursor_line=False, placeholder=placeholder, id=id)

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
