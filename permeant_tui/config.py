"""Workspace settings (workspace.json): model, agents, limits. Written atomically."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .engine.agent import DEFAULT_AGENTS
from .engine.errors import WorkspaceError

SETTINGS_FILE = "workspace.json"
VERSION = 1


@dataclass
class AgentSpec:
    id: str
    role: str
    title: str
    system: str


@dataclass
class Settings:
    version: int = VERSION
    model: str | None = None  # None: the embedded default model
    max_resident: int = 3
    memory_budget_mb: int = 4096
    max_tokens: int = 256
    agents: list[AgentSpec] = field(default_factory=lambda: [
        AgentSpec(i, r, t, s) for i, r, t, s in DEFAULT_AGENTS])

    def agent(self, agent_id: str) -> AgentSpec | None:
        return next((a for a in self.agents if a.id == agent_id), None)


def write_atomic(path: Path, data: bytes) -> None:
    from .engine.snapshot import fsync_dir

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_settings(folder: Path) -> Settings:
    path = folder / SETTINGS_FILE
    if not path.exists():
        return Settings()
    try:
        raw = json.loads(path.read_text())
        agents = [AgentSpec(**a) for a in raw.pop("agents", [])]
        known = set(Settings.__dataclass_fields__)
        s = Settings(**{k: v for k, v in raw.items() if k in known})
        if agents:
            s.agents = agents
        return s
    except (ValueError, TypeError) as exc:
        raise WorkspaceError(f"{path}: unreadable settings ({exc}); fix or delete the file "
                             "(transcripts are kept beside it)") from None


def save_settings(folder: Path, settings: Settings) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / SETTINGS_FILE,
                 (json.dumps(asdict(settings), indent=2) + "\n").encode())
