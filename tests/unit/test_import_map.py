"""The map of rooms (docs/ARCHITECTURE.md "Rooms and who may import whom"), checked on every
import the code makes, lazy ones inside functions included.

- engine/: the bottom. No Textual, and nothing from the front ends (app, screens, widgets,
  palette, keymap/config, cli, migrate).
- UI (app, screens, widgets, palette, preferences, conversation): no MLX; from the engine only its public face.
- migrate/: a front end of the engine like the CLI: no Textual, nothing from the UI or the CLI.
- cli/: may use everything (it is the entry point), nothing imports it but `__main__`.
- No import circle between modules at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "permeant_tui"
ROOT = "permeant_tui"

UI_ROOMS = ("permeant_tui.app", "permeant_tui.screens", "permeant_tui.widgets",
            "permeant_tui.palette", "permeant_tui.preferences", "permeant_tui.conversation")
FRONT_ENDS = (*UI_ROOMS, "permeant_tui.cli", "permeant_tui.migrate")
# What the UI may take from the engine: the public face and the records that cross it.
ENGINE_PUBLIC = ("api", "events", "errors", "agent", "text", "names", "usxf", "atomic",
                 "states", "settings")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            for a in node.names:  # `from . import x` may name a submodule
                out.add(f"{target}.{a.name}")
    return out


def in_room(name: str, rooms) -> bool:
    return any(name == r or name.startswith(r + ".") for r in rooms)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def violations() -> list[str]:
    bad = []
    for mod, path in modules().items():
        names = imports(path)
        if in_room(mod, ("permeant_tui.engine",)):
            for n in names:
                if n.split(".")[0] == "textual" or in_room(n, FRONT_ENDS):
                    bad.append(f"{mod} imports {n}")
        if in_room(mod, UI_ROOMS):
            for n in names:
                if n.split(".")[0] in ("mlx", "mlx_lm"):
                    bad.append(f"{mod} imports {n}")
                if in_room(n, ("permeant_tui.engine",)) and n != "permeant_tui.engine":
                    room = n.split(".")[2]
                    if room not in ENGINE_PUBLIC:
                        bad.append(f"{mod} imports engine internals {n}")
        if in_room(mod, ("permeant_tui.migrate",)):
            for n in names:
                if n.split(".")[0] == "textual" or in_room(n, (*UI_ROOMS, "permeant_tui.cli")):
                    bad.append(f"{mod} imports {n}")
        if not in_room(mod, ("permeant_tui.cli",)):
            for n in names:
                if in_room(n, ("permeant_tui.cli",)):
                    bad.append(f"{mod} imports {n} (only the entry point may)")
    return sorted(set(bad))


def cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module in the module-level import graph."""
    mods = modules()
    graph = {m: {n for n in imports(p, top_level_only=True) if n in mods and n != m}
             for m, p in mods.items()}
    # a package's __init__ importing its own submodules is not a circle
    for m in graph:
        graph[m] = {n for n in graph[m] if not n.startswith(m + ".")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_import_follows_the_map():
    assert len(modules()) > 50
    assert violations() == []


def test_no_import_circle():
    assert cycles() == []


def test_the_map_catches_a_violation(tmp_path, monkeypatch):
    """The checks see a lazy import of a front end from the engine, and a circle."""
    pkg = tmp_path / "permeant_tui"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "migrate").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "migrate" / "__init__.py").write_text("")
    (pkg / "engine" / "worker.py").write_text("def f():\n    from ..migrate import go\n")
    (pkg / "migrate" / "a.py").write_text("from . import b\n")
    (pkg / "migrate" / "b.py").write_text("from .a import x\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    assert "permeant_tui.engine.worker imports permeant_tui.migrate" in violations()
    assert cycles() == [["permeant_tui.migrate.a", "permeant_tui.migrate.b"]]
