"""Typed errors. Each carries what a person needs: which file, which field, what to do next.

The CLI prints `str(error)` on one line and exits non-zero; the UI shows it as a notification.
"""

from __future__ import annotations


class PermeantError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code = 1


class ModelLoadError(PermeantError):
    """The model could not be found or loaded (bad path, unsupported architecture, ...)."""

    exit_code = 3


class ContextExhausted(PermeantError):
    """A turn would not fit in the model's context window."""

    exit_code = 4

    def __init__(self, in_cache: int, new: int, max_tokens: int, limit: int):
        self.in_cache, self.new, self.max_tokens, self.limit = in_cache, new, max_tokens, limit
        super().__init__(
            f"context exhausted: {in_cache} tokens in cache + {new} new + {max_tokens} to generate "
            f"= {in_cache + new + max_tokens} > limit {limit}; reset the agent or lower --max-tokens"
        )


class TurnCancelled(PermeantError):
    """The turn was cancelled between tokens; nothing was recorded."""


class NothingToDo(PermeantError):
    """A continue or a regenerate with nothing to work on (no reply yet, or the last reply
    ended on its own); the message says what to do instead."""


class UnknownAgent(PermeantError):
    exit_code = 2


class SnapshotInvalid(PermeantError):
    """A KV snapshot failed a check. `check` names which one (identity, checksum, tokens, ...)."""

    def __init__(self, path: str, check: str, detail: str):
        self.path, self.check, self.detail = path, check, detail
        super().__init__(f"snapshot {path}: {check} check failed: {detail}")


class SnapshotCorrupt(SnapshotInvalid):
    """Truncated, bit-flipped, empty or unreadable."""


class ModelMismatch(SnapshotInvalid):
    """State made by another model (identity fingerprint differs)."""


class WorkspaceError(PermeantError):
    """The workspace folder or its settings are unusable."""


class UsxfInvalid(PermeantError):
    """A USXF file failed verification. `check` names the failed check."""

    exit_code = 5

    def __init__(self, check: str, detail: str, path: str | None = None):
        self.check, self.detail, self.path = check, detail, path
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{check}: {detail}")


class WorkspaceBusy(WorkspaceError):
    """Another process holds the workspace's writer lock (the message names it)."""

    exit_code = 9


class InvalidTokenIds(PermeantError):
    """Token ids from a file, a transcript or the network that the model cannot take (not an
    integer, negative, or outside the vocabulary). Checked before any id reaches MLX, whose
    embedding lookup does not bound-check."""

    exit_code = 5
