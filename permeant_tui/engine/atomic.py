"""Durable file writes, in one place: every writer of the project goes through here.

`write_atomic` writes to a temp file beside the target, fsyncs it, renames it over the target
and fsyncs the folder: a crash leaves the old file or the new one, never half of one.
`write_private` does the same with mode 0600 from the first byte (keys, TLS material).
Temp files are named `.<name>.<pid>.tmp` so a later writer can tell a dead process's leftovers
(`remove_dead_temps`) from a live one's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable (no-op where the platform cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def temp_path(path: Path, suffix: str = ".tmp") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


def refuse_non_regular(path: Path) -> None:
    """A target that exists and is not a regular file (a device, a FIFO, a folder) is never
    replaced: renaming over /dev/full would 'succeed' and lose nothing the user sees."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    import stat

    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(f"{path} exists and is not a regular file; refusing to replace it")


def remove_dead_temps(folder: Path, pattern: re.Pattern[str], keep_own: bool = False
                      ) -> list[Path]:
    """Delete the temp files in `folder` whose names match `pattern` (group 1: the writer's
    pid) and whose writer is dead (a process killed mid-write never renamed them). A live
    process's are left alone, and so is anything not matching; this process's own too with
    `keep_own` (saves of its own may still be landing: engine/durable.py)."""
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if (pid != os.getpid() or keep_own) and _alive(pid):
            continue
        try:
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def write_atomic(path: str | Path, data: bytes | Callable[[BinaryIO], None], *,
                 mode: int = 0o644, durable: bool = True) -> Path:
    """Replace `path` with `data` (bytes, or a function that writes to the open file)."""
    path = Path(path)
    refuse_non_regular(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_private(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """`write_atomic` with mode 0600 from creation (secrets never exist world-readable)."""
    return write_atomic(path, data, mode=0o600)


def create_private(path: str | Path, data: bytes) -> Path:
    """Create `path` (mode 0600 from the first byte) holding `data`, atomically, and never over a
    file another process created meanwhile (FileExistsError then): for keys, which must not be
    replaced once made."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails if the name exists
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
    return path


def commit_file(tmp: str | Path, path: str | Path) -> Path:
    """Finish a write that a library made itself (mx.save_safetensors writes its own file):
    fsync `tmp`, rename it over `path`, fsync the folder. Removes `tmp` on failure."""
    tmp, path = Path(tmp), Path(path)
    try:
        refuse_non_regular(path)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
