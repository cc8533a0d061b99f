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
from .names import AgentNameInvalid, check_agent_name
from .text import printable

SETTINGS_FILE = "workspace.json"
VERSION = 1


# How an agent samples unless a turn says otherwise. SmolLM2-135M-Instruct's model card
# (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct, "How to use") generates with
# temperature=0.2, top_p=0.9, do_sample=True; its generation_config.json sets no sampling. Greedy
# decoding makes that model loop ("...such as a server being terminated by a user-level service,
# such as a server being terminated..."), so a mild repetition penalty (mlx_lm's, over the last
# 20 tokens) is added; bench/answers.py measures the effect against greedy.
DEFAULT_TEMP = 0.2
DEFAULT_TOP_P = 0.9
DEFAULT_REPETITION_PENALTY = 1.1
GENERATION_FIELDS = ("temp", "top_p", "repetition_penalty", "max_tokens")


@dataclass
class AgentSpec:
    id: str
    role: str
    title: str
    system: str
    # generation settings (TurnParams' names); max_tokens None: the workspace's max_tokens
    temp: float = DEFAULT_TEMP
    top_p: float = DEFAULT_TOP_P
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    max_tokens: int | None = None


def check_generation(values: dict) -> dict:
    """Generation settings as the engine can use them, or WorkspaceError naming the field:
    temp >= 0, 0 < top_p <= 1, repetition_penalty in [1, 2], max_tokens >= 1 (or None)."""
    out = {}
    for key, v in values.items():
        if key not in GENERATION_FIELDS:
            raise WorkspaceError(f"unknown generation setting '{key}'; known: "
                                 f"{', '.join(GENERATION_FIELDS)}")
        if key == "max_tokens":
            if v is not None and (not _is_int(v) or v < 1):
                raise WorkspaceError(f"max_tokens must be a whole number >= 1, not {v!r}")
            out[key] = v
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise WorkspaceError(f"{key} must be a number, not {v!r}")
        ok = {"temp": 0 <= v <= 5, "top_p": 0 < v <= 1,
              "repetition_penalty": 1 <= v <= 2}[key]
        if not ok:
            rule = {"temp": "between 0 and 5 (0: greedy)", "top_p": "above 0 and at most 1",
                    "repetition_penalty": "between 1 (off) and 2"}[key]
            raise WorkspaceError(f"{key} must be {rule}, not {v}")
        out[key] = float(v)
    return out


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
    """The workspace's settings, checked against one schema: any type or value the engine
    cannot use is a one-line WorkspaceError naming the file and the field (exit 1)."""
    path = Path(folder) / SETTINGS_FILE
    if not path.exists() and not path.is_symlink():
        return WorkspaceSettings()
    refuse = f"; fix or delete {path} (transcripts are kept beside it)"
    try:
        if not path.is_file():
            raise WorkspaceError(f"{path} is not a regular file{refuse}")
        raw = json.loads(read_regular(path, _MAX_SETTINGS).decode("utf-8"))
    except WorkspaceError:
        raise
    except (OSError, ValueError) as exc:
        raise WorkspaceError(f"{path}: unreadable settings ({printable(str(exc))[:200]})"
                             f"{refuse}") from None
    return parse_settings(raw, str(path), refuse)


_MAX_SETTINGS = 16 << 20
_POSITIVE = ("max_resident", "memory_budget_mb", "max_tokens")
_AGENT_FIELDS = ("id", "role", "title", "system")


def parse_settings(raw: object, where: str = SETTINGS_FILE, refuse: str = "") -> WorkspaceSettings:
    def bad(field_name: str, why: str) -> WorkspaceError:
        return WorkspaceError(f"{where}: field '{field_name}' {why}{refuse}")

    if not isinstance(raw, dict):
        raise WorkspaceError(f"{where}: must hold a JSON object, not {_kind(raw)}{refuse}")
    s = WorkspaceSettings()
    if "version" in raw:
        if not _is_int(raw["version"]):
            raise bad("version", f"must be an integer, not {_kind(raw['version'])}")
        s.version = raw["version"]
    if "model" in raw:
        if raw["model"] is not None and not isinstance(raw["model"], str):
            raise bad("model", f"must be a string or null, not {_kind(raw['model'])}")
        s.model = raw["model"] or None
    for key in _POSITIVE:
        if key in raw:
            v = raw[key]
            if not _is_int(v):
                raise bad(key, f"must be an integer >= 1, not {_kind(v)}")
            if v < 1:
                raise bad(key, f"must be an integer >= 1, not {v}")
            setattr(s, key, v)
    if "agents" in raw:
        agents = raw["agents"]
        if not isinstance(agents, list):
            raise bad("agents", f"must be a list, not {_kind(agents)}")
        specs, seen = [], set()
        for i, a in enumerate(agents):
            if not isinstance(a, dict):
                raise bad(f"agents[{i}]", f"must be an object, not {_kind(a)}")
            for k in _AGENT_FIELDS:
                if not isinstance(a.get(k), str):
                    raise bad(f"agents[{i}].{k}", f"must be a string, not {_kind(a.get(k))}")
            try:
                check_agent_name(a["id"])
            except AgentNameInvalid as exc:
                raise bad(f"agents[{i}].id", str(exc)) from None
            if a["id"].casefold() in seen:
                raise bad(f"agents[{i}].id", f"repeats the name '{a['id']}'")
            seen.add(a["id"].casefold())
            spec = AgentSpec(*(a[k] for k in _AGENT_FIELDS))
            given = {k: a[k] for k in GENERATION_FIELDS if k in a}
            try:
                for k, v in check_generation(given).items():
                    setattr(spec, k, v)
            except WorkspaceError as exc:
                raise bad(f"agents[{i}]", str(exc)) from None
            specs.append(spec)
        if specs:
            s.agents = specs
    return s


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind(v: object) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file, opened without blocking (a FIFO in its place is refused,
    never waited on), at most `limit` bytes."""
    import os
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WorkspaceError(f"{path} is not a regular file; move it away")
        if st.st_size > limit:
            raise WorkspaceError(f"{path} is {st.st_size} bytes, more than {limit}")
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def save_settings(folder: Path, settings: WorkspaceSettings) -> None:
    write_atomic(Path(folder) / SETTINGS_FILE,
                 (json.dumps(asdict(settings), indent=2) + "\n").encode())
