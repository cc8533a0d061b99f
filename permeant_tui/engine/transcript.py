"""A workspace's files read without trusting them: the transcript (one JSON line per turn, a
torn last line healed), an imported USXF file's declared length, the ids a transcript holds."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .agent import Agent, Turn
from .errors import PermeantError, WorkspaceError
from .settings import read_regular
from .token_ids import checked_ids

_MAX_TRANSCRIPT = 1 << 34


def file_mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def usxf_length(path: Path, limit: int = 64 << 20) -> int:
    """The token count a USXF file declares (its manifest's sequence length), read from its
    head only, for figures (`status`, gauges): 0 when it cannot be read. Nothing is trusted
    from it: the file is verified in full before it is attached."""
    try:
        from .usxf.header import parse_header
        from .usxf.manifest import decode_manifest
        from .usxf.spec import HEADER_SIZE

        with open(path, "rb") as f:
            header = parse_header(f.read(HEADER_SIZE), str(path))
            if header.manifest_len > limit:
                return 0
            m = decode_manifest(f.read(header.manifest_len), str(path))
        n = m.get("sequence", {}).get("length", 0)
        return n if isinstance(n, int) and n >= 0 else 0
    except (PermeantError, OSError, AttributeError):
        return 0


def check_turn_ids(agent: Agent, vocab_size: int) -> None:
    """Every generated id in the transcript is a token of this model, before any reaches MLX
    (whose embedding lookup does not bound-check): else InvalidTokenIds naming the turn."""
    for i, t in enumerate(agent.turns):
        checked_ids(t.generated_ids, vocab_size,
                    f"agent '{agent.agent_id}' turn {i + 1} of {len(agent.turns)} "
                    f"(transcript generated_ids)")


def heal_tail(path: Path) -> None:
    """Make the transcript end with a newline before appending to it. An unfinished last line
    (a crash mid-append, which read_transcript ignored) is cut off and kept in transcript.torn;
    a complete last line that only lacks its newline gets one. Without this, the next append
    would glue the new turn onto the fragment and the transcript would no longer open."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        try:
            Turn.from_json(json.loads(tail))
            complete = True
        except (ValueError, KeyError, TypeError):
            complete = False
        if complete:
            f.seek(size)
            f.write(b"\n")
        else:
            with open(path.with_name("transcript.torn"), "ab") as t:
                t.write(tail + b"\n")
                t.flush()
                os.fsync(t.fileno())
            f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def read_transcript(path: Path) -> tuple[list[Turn], str | None]:
    """Turns from a transcript. A torn last line (a crash mid-append) is ignored and reported;
    a bad line elsewhere is an error (the file was edited or damaged)."""
    if not path.exists() and not path.is_symlink():
        return [], None
    try:
        data = read_regular(path, _MAX_TRANSCRIPT)
    except OSError as exc:
        raise WorkspaceError(f"{path}: unreadable transcript ({exc.strerror or exc})") from None
    turns: list[Turn] = []
    warn = None
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            turn = Turn.from_json(record)
            if record.get("replaces") is True and turns:  # a continued or regenerated reply
                turns.pop()
            turns.append(turn)
        except (ValueError, KeyError, TypeError) as exc:
            if i == len(lines) - 1:  # no newline after it: an append cut short
                warn = f"ignored an unfinished last line in {path.name} (an interrupted write)"
                break
            raise WorkspaceError(f"{path}:{i + 1}: unreadable transcript line ({exc})") from None
    return turns, warn
