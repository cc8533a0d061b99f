"""`permeant workspaces`: the workspaces this user has opened, with their sizes.

The list is a cache (`known-workspaces.json` in the cache dir, `PERMEANT_CACHE` moves it):
each command that opens a workspace for writing adds it; deleting the file forgets the list,
never a workspace. The default workspace is always listed when it exists. Folders that are
gone are shown as such (a removable disk may come back), never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

KNOWN = "known-workspaces.json"
MAX_KNOWN = 200


def _known_file() -> Path:
    from ..paths import cache_dir

    return cache_dir() / KNOWN


def _read() -> dict[str, float]:
    try:
        data = json.loads(_known_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))}


def remember(folder: Path) -> None:
    """Record that `folder` was opened now. Best effort: a read-only cache dir must not stop
    a command."""
    from ..engine.atomic import write_atomic

    known = _read()
    known[str(Path(folder).resolve())] = time.time()
    newest = dict(sorted(known.items(), key=lambda kv: -kv[1])[:MAX_KNOWN])
    try:
        _known_file().parent.mkdir(parents=True, exist_ok=True)
        write_atomic(_known_file(), json.dumps(newest, indent=1).encode())
    except OSError:
        pass


def folder_size(folder: Path) -> tuple[int, int]:
    """(bytes, files) under folder, symlinks not followed."""
    total = files = 0
    for root, _dirs, names in os.walk(folder):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
                files += 1
            except OSError:
                pass
    return total, files


def known_workspaces() -> list[dict]:
    """Every known workspace, the default first, then the most recently opened."""
    from ..engine.settings import load_settings
    from ..paths import default_workspace

    default = default_workspace().resolve()
    known = _read()
    order = sorted(known, key=lambda k: -known[k])
    if str(default) in order:
        order.remove(str(default))
    rows = []
    for i, path in enumerate([str(default), *order]):
        p = Path(path)
        exists = (p / "workspace.json").is_file()
        if i == 0 and not exists and path not in known:
            continue  # the default workspace was never created
        row: dict = {"path": path, "default": i == 0, "exists": exists,
                     "last_opened": known.get(path)}
        if exists:
            row["bytes"], row["files"] = folder_size(p)
            try:
                row["agents"] = [a.id for a in load_settings(p).agents]
            except Exception as exc:  # noqa: BLE001 - one bad workspace must not hide the rest
                row["agents"], row["error"] = [], str(exc).splitlines()[0]
        rows.append(row)
    return rows


def register(subparsers) -> None:
    p = subparsers.add_parser("workspaces", help="the workspaces you have opened, with sizes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=list_workspaces)


def list_workspaces(args: argparse.Namespace) -> int:
    from ..engine.text import printable

    rows = known_workspaces()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no workspaces yet (the first `permeant` or `permeant chat` creates one)")
        return 0
    print(f"{'':2}{'MB':>9}  {'agents':>6}  {'last opened':<19}  path")
    for r in rows:
        mark = "* " if r["default"] else "  "
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_opened"]))
                if r["last_opened"] else "-")
        if not r["exists"]:
            print(f"{mark}{'-':>9}  {'-':>6}  {when:<19}  {printable(r['path'])} (gone)")
            continue
        print(f"{mark}{r['bytes'] / 1e6:>9.1f}  {len(r['agents']):>6}  {when:<19}  "
              f"{printable(r['path'])}" + (f" ({printable(r['error'])})" if "error" in r else ""))
    print("* the default workspace (PERMEANT_HOME or the user data dir); others with "
          "--workspace DIR")
    return 0
