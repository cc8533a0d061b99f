"""The person's UI preferences: `config.toml` in the user config dir (not the workspace).

Today it holds the keymap, as Posting's config does: binding id -> keys, applied with
`App.set_keymap`. Workspace settings (model, agents, limits) stay in the workspace's own
`workspace.json`, which belongs to the engine; what lives here follows the person from one
workspace to the next.

    # ~/.config/permeant/config.toml (PERMEANT_CONFIG names another file)
    [keymap]
    "pane.1" = "alt+1,f2"     # several keys: comma-separated
    "copy.reply" = "ctrl+y"

A missing file is the defaults; an unreadable one, or an entry that is not a string, is
reported (`Preferences.problems`) and skipped, never fatal: the workspace must open.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from .engine.text import printable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

APP = "permeant"
CONFIG_FILE = "config.toml"


def config_path() -> Path:
    env = os.environ.get("PERMEANT_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir(APP, appauthor=False)) / CONFIG_FILE


@dataclass(frozen=True)
class Preferences:
    keymap: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    problems: tuple[str, ...] = ()

    @property
    def shown_path(self) -> str:
        """The file's path as a person writes it (~ for the home folder)."""
        if self.path is None:
            return CONFIG_FILE
        try:
            return str(Path("~") / self.path.relative_to(Path.home()))
        except ValueError:
            return str(self.path)

    def check(self, known_ids: set[str]) -> list[str]:
        """What is wrong with the file: its problems, then keymap ids naming no binding (a
        typo, or a binding renamed since)."""
        unknown = sorted(binding_id for binding_id in self.keymap if binding_id not in known_ids)
        if not unknown:
            return list(self.problems)
        return [*self.problems, printable(f"{self.shown_path}: no binding with id "
                                          f"{', '.join(unknown)} (F1 lists the ids)")]


def load_preferences(path: Path | None = None) -> Preferences:
    path = path or config_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Preferences(path=path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        return Preferences(path=path, problems=(
            printable(f"{path}: unreadable ({error}); using the default keys"),))
    table = raw.get("keymap", {})
    if not isinstance(table, dict):
        return Preferences(path=path, problems=(f"{path}: [keymap] must be a table",))
    keymap: dict[str, str] = {}
    problems: list[str] = []
    for binding_id, keys in table.items():
        if isinstance(keys, str) and keys.strip():
            keymap[binding_id] = ",".join(k.strip() for k in keys.split(",") if k.strip())
        else:
            problems.append(printable(
                f"{path}: keymap {binding_id!r} must be a string of keys, like \"f2\""))
    return Preferences(keymap, path, tuple(problems))


