"""Conversations as text, for the workspace's features that read them: the team brief's question,
code blocks to copy, a Markdown export, and search across every agent's transcript.

Pure functions over the engine's `AgentView`/`TurnView` records: no Textual, no engine calls.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .engine.api import AgentView, TurnView
from .engine.text import printable

# How the engine opens the coordinator's brief in a team turn (engine/jobs.py TEAM_BRIEF):
# the question is its first paragraph. Recognised to show "Team brief: <question>" instead of
# the whole internal prompt (which quotes both colleagues' replies, already on screen).
TEAM_BRIEF_OPENING = "The team was asked: "

# A fenced code block: ``` or ~~~ (3 or more), an optional info string, the body, the same fence.
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})[^\n]*\n(?P<body>.*?)"
                    r"^(?P=indent)(?P=fence)[ \t]*$", re.MULTILINE | re.DOTALL)
SNIPPET_CHARS = 70
_MARKS = str.maketrans("", "", "*`")


def team_question(user: str) -> str | None:
    """The team's question if `user` is a coordinator's team brief, else None."""
    if not user.startswith(TEAM_BRIEF_OPENING):
        return None
    return user[len(TEAM_BRIEF_OPENING):].split("\n\n", 1)[0].strip()


def code_blocks(markdown: str) -> list[str]:
    """The bodies of the fenced code blocks in `markdown`, in order (an unclosed fence at the
    end, as a reply cut by the token limit leaves it, counts too)."""
    matches = list(_FENCE.finditer(markdown))
    blocks = [m.group("body").rstrip("\n") for m in matches]
    rest = markdown[matches[-1].end():] if matches else markdown
    unclosed = re.search(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n(?P<body>.*)\Z", rest,
                         re.MULTILINE | re.DOTALL)
    if unclosed and unclosed.group("body").strip():
        blocks.append(unclosed.group("body").rstrip("\n"))
    return blocks


def conversation_markdown(view: AgentView, turns: Sequence[TurnView] | None = None) -> str:
    """An agent's conversation as a Markdown document (its turns, or `turns` if given)."""
    title = printable(view.title)
    lines = [f"# {title}", ""]
    if view.system:
        lines += [f"_System prompt:_ {view.system.strip()}", ""]
    for number, turn in enumerate(view.turns if turns is None else turns, 1):
        question = team_question(turn.user)
        heading = "Team brief" if question is not None else "You"
        lines += [f"## {number}. {heading}", "", turn.user.strip(), "",
                  f"### {title}", "", turn.reply.strip() or "_(no reply)_", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


@dataclass(frozen=True)
class TurnMatch:
    agent_id: str
    title: str
    index: int  # the turn's index in the agent's transcript
    field: str  # "user" | "reply"
    snippet: str  # one line around the match, control characters escaped


def _plain(text: str) -> str:
    """One line, without the emphasis and code marks a reader does not see ("**1**" is 1)."""
    return " ".join(text.translate(_MARKS).split())


def search_turns(views: Iterable[AgentView], query: str, limit: int = 50) -> list[TurnMatch]:
    """Turns whose message or reply contains `query` (case-insensitive, as shown: Markdown
    emphasis and code marks ignored), newest first per agent."""
    needle = _plain(query).casefold()
    if not needle:
        return []
    found: list[TurnMatch] = []
    for view in views:
        for index in range(len(view.turns) - 1, -1, -1):
            turn = view.turns[index]
            user = team_question(turn.user) or turn.user
            for field, text in (("user", user), ("reply", turn.reply)):
                flat = _plain(text)
                at = flat.casefold().find(needle)
                if at >= 0:
                    found.append(TurnMatch(view.agent_id, printable(view.title), index, field,
                                           snippet(flat, at, len(needle))))
                    break
            if len(found) >= limit:
                return found
    return found


def snippet(flat: str, at: int, length: int, width: int = SNIPPET_CHARS) -> str:
    """About `width` characters of one-line `flat` around [at, at+length)."""
    start = max(0, at - (width - length) // 3)
    end = min(len(flat), start + width)
    start = max(0, min(start, end - width))
    text = flat[start:end]
    return printable(("…" if start else "") + text + ("…" if end < len(flat) else ""))


# The embedded models' names (engine/embedded.py display names): small demonstration models.
DEMO_MODELS = ("SmolLM2-135M-Instruct (", "Gemma 3 270M (")


def demo_model_note(model_name: str) -> str | None:
    """What a first start with an embedded model says about it, or None for any other model."""
    if not model_name.startswith(DEMO_MODELS):
        return None
    return (f"{model_name} is a small demonstration model: expect short, often wrong answers. "
            "Bring a real one with `permeant --model path/to/model.gguf` (or, on a Mac, an "
            "mlx-community repository such as mlx-community/Qwen2.5-7B-Instruct-4bit).")
