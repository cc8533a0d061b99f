"""Workspace settings (workspace.json): model, agents, limits. Written atomically.

The schema belongs to the workspace, so it lives in the engine; the three default agents come
from `engine.agent.DEFAULT_AGENTS` (their one definition).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .agent import DEFAULT_AGENTS
from .atomic import write_atomic
from .errors import WorkspaceError

SETTINGS_FILE = "workspace.json"
VERSION = 1


@dataclass
class AgentSpec:
    id: str
    role: str
    title: str
    system: str


def default_agents() -> list[AgentSpec]:
    return [AgentSpec(i, r, t, s) for i, r, t, s in DEFAULT_AGENTS]


@dataclass
class WorkspaceSettings:
    version: int = VERSION
    model: str | None = None  # None: the embedded default model
    max_resident: int = 3
    memory_budget_mb: int = 4096
    max_tokens: int = 256
    agents: list[AgentSpec] = field(default_factory=default_agents)

    def agent(self, agent_id: str) -> AgentSpec | None:
        return next((a for a in self.agents if a.id == agent_id), None)

    def copy(self) -> WorkspaceSettings:
        return WorkspaceSettings(**{**asdict(self), "agents": [AgentSpec(**asdict(a))
                                                               for a in self.agents]})


def load_settings(folder: Path) -> WorkspaceSettings:
    path = Path(folder) / SETTINGS_FILE
    if not path.exists():
        return WorkspaceSettings()
    try:
        raw = json.loads(path.read_text())
        agents = [AgentSpec(**a) for a in raw.pop("agents", [])]
        known = set(WorkspaceSettings.__dataclass_fields__)
        s = WorkspaceSettings(**{k: v for k, v in raw.items() if k in known})
        if agents:
            s.agents = agents
        return s
    except (ValueError, TypeError) as exc:
        raise WorkspaceError(f"{path}: unreadable settings ({exc}); fix or delete the file "
                             "(transcripts are kept beside it)") from None


def save_settings(folder: Path, settings: WorkspaceSettings) -> None:
    write_atomic(Path(folder) / SETTINGS_FILE,
                 (json.dumps(asdict(settings), indent=2) + "\n").encode())
