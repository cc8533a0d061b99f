"""One writer per workspace: an advisory lock that every process that may write holds.

The TUI, `chat`, `export`, `import`, `serve`, migration and the demo take it for as long as they
run; a second writer is refused at once with a message naming the holder (its command, pid and
start time), so two processes never generate from one cache or write stale settings over each
other. Read-only commands (`status`, `usxf inspect`) take no lock and work meanwhile.

`flock` on `<workspace>/.lock`: the kernel drops it when the holder dies (SIGKILL included), so
a crash never leaves a workspace locked. The holder's description is written into the same file
after the lock is taken; it is informative only, never trusted to decide anything.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .errors import WorkspaceBusy, WorkspaceError

LOCK_NAME = ".lock"


def _describe(purpose: str) -> dict:
    return {"pid": os.getpid(), "purpose": purpose, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": " ".join(os.path.basename(a) if i == 0 else a
                             for i, a in enumerate(sys.argv[:4]))[:200]}


def holder(folder: str | Path) -> dict | None:
    """Who holds the lock now (None when nobody does). Never blocks."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.read(fd, 4096)
            try:
                info = json.loads(raw.decode("utf-8", "replace"))
            except ValueError:
                info = None
            return info if isinstance(info, dict) else {"purpose": "unknown"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class WorkspaceLock:
    """Held from `acquire()` to `release()` (or the end of a `with` block)."""

    def __init__(self, folder: str | Path, purpose: str):
        self.folder = Path(folder)
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WorkspaceLock:
        import fcntl

        if self._fd is not None:
            return self
        path = self.folder / LOCK_NAME
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise WorkspaceError(f"cannot open the workspace lock {path}: {exc.strerror}") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkspaceBusy(_busy_message(self.folder, holder(self.folder))) from None
        try:  # informative: who holds it
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_describe(self.purpose)).encode(), 0)
        except OSError:
            pass  # a full disk must not stop the lock itself
        self._fd = fd
        return self

    def release(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> WorkspaceLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _busy_message(folder: Path, info: dict | None) -> str:
    who = "another permeant process"
    if info:
        who = (f"{info.get('purpose', 'permeant')} (pid {info.get('pid', '?')}, "
               f"since {info.get('since', '?')})")
        who = "".join(ch if ch.isprintable() else "?" for ch in who)[:200]
    return (f"workspace {folder} is in use by {who}; close it first, or use another "
            f"--workspace (read-only `permeant status` works meanwhile)")
