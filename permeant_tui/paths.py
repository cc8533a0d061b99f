"""Where things live: the default workspace under the user data dir, PERMEANT_HOME to override."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "permeant"


def default_workspace() -> Path:
    env = os.environ.get("PERMEANT_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir(APP, appauthor=False)) / "workspace"


def resolve_workspace(arg: str | os.PathLike | None) -> Path:
    return Path(arg).expanduser().resolve() if arg else default_workspace().resolve()


def cache_dir() -> Path:
    """Machine-local caches (weight digests): safe to delete."""
    env = os.environ.get("PERMEANT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir(APP, appauthor=False))
