"""A workspace's roster: adding an agent with its own role and system prompt, renaming one,
removing one (its folder is archived, never deleted). Names follow engine/names.py.

Runs where the workspace is owned: on the engine worker, or in the caller's thread before the
engine starts (engine/worker.py decides). Each change is a folder rename plus one atomic
settings write, undone when the second step fails, so a failure leaves the workspace as it was.

    <workspace>/archive/<id>-<YYYYmmdd-HHMMSS>/   a removed agent's folder (transcript, snapshot)
        agent.json                                its spec (role, title, system), to bring it back
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from .agent import Agent
from .atomic import fsync_dir, write_atomic
from .errors import WorkspaceError
from .names import check_agent_name
from .settings import AgentSpec, save_settings
from .text import printable
from .workspace import Workspace

MAX_ROLE = 64
MAX_SYSTEM = 32 << 10


def check_spec_text(role: str, system: str) -> None:
    if not role.strip() or len(role) > MAX_ROLE or printable(role) != role:
        raise WorkspaceError(f"role must be 1-{MAX_ROLE} printable characters on one line")
    if len(system) > MAX_SYSTEM:
        raise WorkspaceError(f"system prompt over {MAX_SYSTEM >> 10} KiB")


def _free_name(ws: Workspace, name: str, allow: str | None = None) -> None:
    """`name` is not taken (casefolded: macOS disks are case-insensitive) by an agent other
    than `allow`, and no stray folder of that name waits under agents/ (never adopted)."""
    existing = ws.find_agent(name)
    if existing is not None and existing != allow:
        raise WorkspaceError(f"an agent named '{existing}' exists already")
    d = ws.agent_dir(name)
    if existing is None and (d.exists() or d.is_symlink()):
        raise WorkspaceError(f"{d} exists but is no agent of this workspace; move it away "
                             f"first (nothing in it is adopted)")


def add_agent(ws: Workspace, name: str, role: str, system: str,
              title: str | None = None) -> Agent:
    check_agent_name(name)
    check_spec_text(role, system)
    _free_name(ws, name)
    spec = AgentSpec(name, role, title or name.capitalize(), system)
    ws.settings.agents.append(spec)
    try:
        save_settings(ws.folder, ws.settings)
    except BaseException:
        ws.settings.agents.remove(spec)
        raise
    agent = Agent(spec.id, spec.role, spec.title, spec.system)
    agent.last_used = 0.0
    ws.agents[name] = agent
    return agent


def rename_agent(ws: Workspace, old: str, new: str) -> Agent:
    """The folder moves, the settings follow; the KV snapshot stays valid (it is keyed by the
    transcript, not by the name) and a resident cache stays resident."""
    agent = ws.agent(old)
    check_agent_name(new)
    if new == old:
        return agent
    ws.flush()  # a save still landing names the old folder
    _free_name(ws, new, allow=old if new.casefold() == old.casefold() else None)
    src, dst = ws.agent_dir(old), ws.agent_dir(new)
    moved = False
    if src.exists():
        if new.casefold() == old.casefold():  # only the case changes: via a temporary name
            tmp = src.with_name(f".rename-{os.getpid()}-{old}")
            os.rename(src, tmp)
            os.rename(tmp, dst)
        else:
            os.rename(src, dst)
        fsync_dir(dst.parent)
        moved = True
    before = list(ws.settings.agents)
    spec = next(s for s in ws.settings.agents if s.id == old)
    title = new.capitalize() if spec.title == old.capitalize() else spec.title
    ws.settings.agents = [replace(s, id=new, title=title) if s.id == old else s
                          for s in ws.settings.agents]
    try:
        save_settings(ws.folder, ws.settings)
    except BaseException:
        ws.settings.agents = before
        if moved:
            os.rename(dst, src)
        raise
    agent.agent_id, agent.title = new, title
    ws.agents = {(new if k == old else k): a for k, a in ws.agents.items()}
    return agent


def remove_agent(ws: Workspace, agent_id: str) -> Path:
    """Move the agent's folder to archive/ with its spec beside it; returns the archive."""
    agent = ws.agent(agent_id)
    if len(ws.agents) == 1:
        raise WorkspaceError(f"'{agent_id}' is the workspace's only agent; add another first")
    ws.flush()  # a save still landing names the folder that moves
    archive = ws.folder / "archive" / f"{agent_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while archive.exists():
        n += 1
        archive = archive.with_name(f"{agent_id}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    archive.parent.mkdir(parents=True, exist_ok=True)
    src = ws.agent_dir(agent_id)
    spec = next(s for s in ws.settings.agents if s.id == agent_id)
    had_folder = src.exists()
    if had_folder:
        os.rename(src, archive)
    else:
        archive.mkdir()
    write_atomic(archive / "agent.json", (json.dumps(asdict(spec), indent=2) + "\n").encode())
    fsync_dir(archive.parent)
    before = list(ws.settings.agents)
    ws.settings.agents = [s for s in ws.settings.agents if s.id != agent_id]
    try:
        save_settings(ws.folder, ws.settings)
    except BaseException:
        ws.settings.agents = before
        (archive / "agent.json").unlink(missing_ok=True)
        if had_folder:
            os.rename(archive, src)
        else:
            archive.rmdir()
        raise
    agent.cache, agent.cache_ids, agent.dirty = None, [], False
    del ws.agents[agent_id]
    return archive
