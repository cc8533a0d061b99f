"""What every command shares: the workspace, model and verbosity arguments, opening an engine in
two steps (the workspace first, checks, then the model), and waiting on it while its events
drive the progress line. Errors follow the one-line convention (PermeantError ->
`permeant: error: ...` on stderr, its exit code; cli/__init__.py).

Why two steps: opening the workspace takes the lock and reads the settings and transcripts in
well under a second; loading the model takes seconds. Everything that can be refused from the
arguments and the workspace alone (an unknown agent, an unwritable target, a file that fails
its signature) is refused before the model loads (`open_session(check=...)`).
"""

from __future__ import annotations

import argparse
import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from ..engine.errors import PermeantError
from .progress import Reporter

if TYPE_CHECKING:
    from ..engine.events import Event
    from ..engine.worker import Engine

T = TypeVar("T")

# engine/usxf's QUANTS and PROBE_N, spelled here so that building the parser does not import the
# format (numpy, cryptography: seconds on a loaded machine); tests/unit/test_cli_parser.py
# checks that they agree.
QUANTS = ("none", "f16", "bf16", "int8", "kivi8")
PROBE_N = 128


class UsageError(PermeantError):
    """Arguments that cannot work, found before anything is opened (exit 2, one line)."""

    exit_code = 2


# ---- arguments -------------------------------------------------------------------------------
# Subcommands default to SUPPRESS so that `permeant --workspace DIR status` keeps DIR: a
# subparser's own default would otherwise overwrite what the main parser read.

def _default(top: bool, value: Any = None) -> Any:
    return value if top else argparse.SUPPRESS


def add_workspace(p: argparse.ArgumentParser, top: bool = False) -> None:
    p.add_argument("--workspace", metavar="DIR", default=_default(top),
                   help="workspace folder (default: PERMEANT_HOME or the user data dir)")


def add_model(p: argparse.ArgumentParser, top: bool = False) -> None:
    p.add_argument("--model", metavar="PATH_OR_REPO", default=_default(top),
                   help="a .gguf file, an MLX model directory or a Hugging Face repo id "
                        "(default: the embedded SmolLM2-135M-Instruct)")


def add_verbose(p: argparse.ArgumentParser, top: bool = False) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=_default(top, False),
                   help="write each stage (model load, restore, prefill) as a line on stderr, "
                        "also when stderr is not a terminal")


def add_common(p: argparse.ArgumentParser, workspace: bool = True, top: bool = False) -> None:
    if workspace:
        add_workspace(p, top)
    add_model(p, top)
    add_verbose(p, top)


def check_agent_listed(args: argparse.Namespace, name: str) -> None:
    """Refuse an agent the workspace's settings do not list (UnknownAgent, exit 2) from the
    settings file alone: no engine, no lock, a few milliseconds. The engine checks again once
    it holds the workspace."""
    from ..engine.errors import UnknownAgent
    from ..engine.settings import load_settings
    from ..paths import resolve_workspace

    folder = resolve_workspace(getattr(args, "workspace", None))
    if folder.exists() and not folder.is_dir():
        return  # the engine says what is wrong with it
    ids = [a.id for a in load_settings(folder).agents]
    if name not in ids:
        raise UnknownAgent(f"no agent {name!r} in {folder}; agents: {', '.join(ids)}")


def reporter_for(args: argparse.Namespace) -> Reporter:
    return Reporter(verbose=bool(getattr(args, "verbose", False)))


# ---- an engine, in two steps -----------------------------------------------------------------

class Session:
    """An engine for one command: its events arrive in a queue that the command's main thread
    drains while it waits (so a ctrl+c lands there, and rich is driven from one thread)."""

    def __init__(self, engine: Engine, reporter: Reporter):
        self.engine, self.reporter = engine, reporter
        self.events: queue.Queue[Event] = queue.Queue()
        engine.connect(self.events.put)

    def start(self) -> None:
        """Load the model (progress on a terminal); ModelLoadError if it fails."""
        self.reporter.stage("loading model")
        self.engine.start()
        while True:
            try:
                self.engine.wait_ready(timeout=0.1)
                break
            except TimeoutError:
                pass
            except PermeantError:
                self.drain()
                self.reporter.notices.clear()  # "load failed: ...": the error line says it
                raise
            finally:
                self.drain()
        self.drain()

    def drain(self, on_event: Callable[[Event], None] | None = None,
              timeout: float | None = None) -> None:
        """Hand every queued event to the reporter (and `on_event`); with `timeout`, first
        wait up to that long for one."""
        try:
            ev = self.events.get(timeout=timeout) if timeout else self.events.get_nowait()
        except queue.Empty:
            return
        while True:
            self.reporter.event(ev)
            if on_event is not None:
                on_event(ev)
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return

    def wait(self, fut: Future[T], on_event: Callable[[Event], None] | None = None) -> T:
        """The future's result, draining events meanwhile (and after, so none is missed)."""
        while not fut.done():
            self.drain(on_event, timeout=0.05)
        self.drain(on_event)
        return fut.result()

    def close(self, cancel_running: bool = True) -> None:
        """Shut the engine down (saves dirty agents), then say the notices."""
        try:
            self.engine.shutdown(cancel_running=cancel_running)
        finally:
            self.drain()
            self.reporter.print_notices()


def engine_for(args: argparse.Namespace, **kw) -> Engine:
    """The engine for args.workspace / args.model, not started: the workspace is open and
    locked (WorkspaceBusy, exit 9, if another writer holds it), the model not loaded. The
    caller must call `shutdown()`."""
    from ..engine.worker import Engine
    from .workspaces import remember

    cmd = " ".join(x for x in (getattr(args, "cmd", None), getattr(args, "usxf_cmd", None)) if x)
    engine = Engine(getattr(args, "workspace", None), getattr(args, "model", None),
                    eager_restore=False, purpose=f"permeant {cmd}".strip(), **kw)
    remember(engine.folder)
    return engine


def open_session(args: argparse.Namespace, check: Callable[[Engine], None] | None = None,
                 **kw) -> Session:
    """Open the workspace, run `check(engine)` (no model yet: refuse bad arguments here, in
    well under a second), then load the model. The caller must `close()` the session (use
    try/finally)."""
    engine = engine_for(args, **kw)
    session = Session(engine, reporter_for(args))
    try:
        if check is not None:
            check(engine)
        session.start()
    except BaseException:
        session.close()
        raise
    return session


def open_engine(args: argparse.Namespace, **kw) -> Engine:
    """Start an engine on args.workspace / args.model and wait for its model. The caller must
    call `shutdown()` (use try/finally)."""
    engine = engine_for(args, **kw)
    engine.start()
    try:
        engine.wait_ready()
    except BaseException:
        engine.shutdown()
        raise
    return engine
