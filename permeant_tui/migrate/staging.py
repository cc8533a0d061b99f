"""Staged migrations on the target: the record of each one (`Staged`), its files under
<workspace>/migrate/staging/<id>/, and the start-up sweep.

    file.usxf     the USXF file being received: the signed head at once, then each chunk at its
                  offset (room reserved up front with fallocate)
    meta.json     who opened it, for what (a record for a person; never read back)
    commit.json   the commit journal: written before the import starts, so a crash mid-commit
                  can be rolled back at the next start

Nothing staged is ever attached on its own: on start the folder is emptied (`recover_staging`).
Every function here does file work: the routes call them through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.atomic import fsync_dir, write_atomic
from ..engine.names import is_agent_name
from .protocol import to_ranges

STAGING = "staging"
PART = "file.usxf"
META = "meta.json"
JOURNAL = "commit.json"
ACTIVE = ("receiving", "verifying", "prepared", "committing")


def staging_root(workspace: Path) -> Path:
    return Path(workspace) / "migrate" / STAGING


@dataclass
class Staged:
    """One migration the target has opened: its state machine is receiving -> verifying ->
    prepared -> committing -> committed, or failed / aborted; expired ones are forgotten."""

    id: str
    key_id: str
    mode: str
    name: str
    folder: Path
    header: object  # usxf.reader.Header
    parsed: object  # usxf.reader.Parsed
    turns: list
    n_chunks: int
    created: float = field(default_factory=time.time)
    touched: float = field(default_factory=time.monotonic)
    state: str = "receiving"
    present: bytearray = field(default_factory=bytearray)
    received_bytes: int = 0
    result: dict | None = None
    error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def file(self) -> Path:
        return self.folder / PART

    @property
    def size(self) -> int:
        return self.header.total_size if self.mode == "kv" else self.header.payload_offset

    @property
    def digest(self) -> str:
        return self.parsed.digest.hex()

    def chunk_range(self, n: int) -> tuple[int, int]:
        c, length = self.header.chunk_size, self.header.payload_len
        return n * c, min((n + 1) * c, length)

    def touch(self) -> None:
        self.touched = time.monotonic()

    def view(self, ttl: float) -> dict:
        missing = to_ranges([not p for p in self.present])
        return {
            "id": self.id, "state": self.state, "mode": self.mode, "name": self.name,
            "agent": self.parsed.agent.agent_id, "tokens": len(self.parsed.token_ids),
            "size": self.size, "chunk_size": self.header.chunk_size, "n_chunks": self.n_chunks,
            "present": to_ranges(self.present), "missing": missing,
            "first_missing": missing[0][0] if missing else None,
            "received_bytes": self.received_bytes, "digest": self.digest,
            "expires_in": max(0.0, ttl - (time.monotonic() - self.touched)),
            "result": self.result, "error": self.error,
        }


# ---- files ------------------------------------------------------------------------------------

def create_files(m: Staged, head: bytes) -> None:
    """The staged file with the head written and the whole size reserved, and meta.json. Raises
    OSError (ENOSPC, EDQUOT, ...) when there is no room."""
    m.folder.mkdir(parents=True)
    fd = os.open(m.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        if m.mode == "kv":
            try:
                os.posix_fallocate(fd, 0, m.size)  # the disk room is reserved now
            except OSError as exc:
                if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                    raise
                os.ftruncate(fd, m.size)  # a filesystem without fallocate
        os.pwrite(fd, head, 0)
    finally:
        os.close(fd)
    write_atomic(m.folder / META, json.dumps(
        {"id": m.id, "key_id": m.key_id, "mode": m.mode, "name": m.name, "created": m.created,
         "digest": m.digest, "size": m.size}).encode(), durable=False)


def write_chunk(m: Staged, n: int, data: bytes) -> None:
    """Chunk n at its offset (made durable by `sync_file` before verification)."""
    a, _ = m.chunk_range(n)
    fd = os.open(m.file, os.O_WRONLY)
    try:
        os.pwrite(fd, data, m.header.payload_offset + a)
    finally:
        os.close(fd)


def sync_file(m: Staged) -> None:
    fd = os.open(m.file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(m.folder)


def write_journal(m: Staged) -> None:
    """Before the import starts: which agent this commit creates (see recover_staging)."""
    write_atomic(m.folder / JOURNAL, json.dumps({"agent": m.name, "at": time.time()}).encode())


def drop_files(m: Staged) -> None:
    shutil.rmtree(m.folder, ignore_errors=True)


# ---- start-up --------------------------------------------------------------------------------

def recover_staging(workspace: Path) -> list[str]:
    """On start: roll back any commit a crash cut short (its agent folder, if the agent never got
    registered), then remove every staged migration. Nothing staged is ever attached."""
    from ..engine.settings import load_settings

    workspace = Path(workspace)
    root = staging_root(workspace)
    notes: list[str] = []
    if not root.is_dir():
        return notes
    registered = {a.id for a in load_settings(workspace).agents} if workspace.exists() else set()
    for d in sorted(root.iterdir()):
        journal = d / JOURNAL
        if journal.exists():
            try:
                name = str(json.loads(journal.read_text())["agent"])
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                name = ""
            if is_agent_name(name) and name not in registered:
                shutil.rmtree(workspace / "agents" / name, ignore_errors=True)
                notes.append(f"rolled back the unfinished commit of {name!r} ({d.name})")
            elif name in registered:
                notes.append(f"commit of {name!r} ({d.name}) had completed")
        shutil.rmtree(d, ignore_errors=True)
        notes.append(f"discarded staged migration {d.name}")
    return notes
