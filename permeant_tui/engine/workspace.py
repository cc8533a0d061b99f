"""A workspace on disk: settings, one append-only transcript and one KV snapshot per agent,
and the LRU policy that decides which agents' caches stay in memory.

    <workspace>/workspace.json                   settings (atomic writes)
    <workspace>/agents/<id>/transcript.jsonl     one line per finished turn, fsynced
    <workspace>/agents/<id>/kv.safetensors       KV snapshot manifest (a verified cache of the
                                                 transcript): token ids, tail, block names
    <workspace>/kv-blocks/<chain>-<content>.kvb  K/V blocks the manifests name, stored once
    <workspace>/agents/<id>/import.usxf          an imported USXF state not yet saved as snapshot
    <workspace>/exports/                         USXF exports
    <workspace>/keys/                            this workspace's signing key and trusted keys

Runs on the engine worker (restore/save call MLX) except `open`, which only reads files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from .agent import Agent, Turn
from .atomic import fsync_dir, write_atomic
from .blockload import Donors
from .blockstore import BlockStore
from .durable import Flusher
from .errors import PermeantError, SnapshotInvalid, UnknownAgent, WorkspaceError
from .events import RestoreReport
from .generation import new_cache, prefill
from .kvcache import buffers
from .names import check_agent_name
from .runtime import keep_freed_buffers
from .settings import (
    AgentSpec,
    WorkspaceSettings,
    load_settings,
    save_settings,
)
from .snapshot import (
    BLOCK_FORMATS,
    BLOCKS_DIR,
    FORMAT,
    attach,
    attach_payload,
    blocks_on_disk,
    ids_digest,
    read_header,
    read_snapshot,
    write_snapshot,
)
from .transcript import check_turn_ids, file_mtime, heal_tail, read_transcript, usxf_length

TRANSCRIPT = "transcript.jsonl"
SNAPSHOT = "kv.safetensors"
IMPORTED = "import.usxf"


class Workspace:
    def __init__(self, folder: Path, settings: WorkspaceSettings, agents: dict[str, Agent],
                 warnings: list[str]):
        self.folder = folder
        self.settings = settings
        self.agents = agents
        self.warnings = warnings  # things found while opening (a torn transcript line, ...)
        self.blocks = BlockStore(folder / BLOCKS_DIR)
        # Saves made durable on a thread of their own (engine/durable.py), once the engine
        # asks for it (`background_saves`); otherwise every save is durable when it returns.
        self.flusher: Flusher | None = None
        # K/V buffers of the agents evicted to make room for a restore, handed to it
        # (blockload.Donors), then dropped (worker thread only)
        self.donors = Donors([])

    def background_saves(self, on_failed: Callable[[str, BaseException], None] | None = None
                         ) -> Flusher:
        """From now on a save returns once its files are written; the flusher's thread makes
        them durable. `on_failed(agent_id, exc)` is called on that thread when it cannot."""
        if self.flusher is None:
            self.flusher = Flusher(self._collect_now, on_failed)
        return self.flusher

    def flush(self) -> dict[str, BaseException]:
        """Wait until every save made so far is durable. -> the agents whose saves failed
        (marked dirty again, so the next save rewrites them), with the errors."""
        if self.flusher is None:
            return {}
        self.flusher.wait()
        return self.take_save_failures()

    def take_save_failures(self) -> dict[str, BaseException]:
        failed = self.flusher.take_failed() if self.flusher is not None else {}
        for agent_id in failed:
            if agent_id in self.agents:
                self.agents[agent_id].dirty = True
        return failed

    def close(self) -> dict[str, BaseException]:
        """Flush, then stop the flusher's thread (the worker's last act). -> failures."""
        failed = self.flush()
        if self.flusher is not None:
            self.flusher.close()
            self.flusher = None
        return failed

    # ---- opening (no MLX) -------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path, *, create: bool = True) -> Workspace:
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise WorkspaceError(f"{folder} exists and is not a folder")
        if not folder.exists():
            if not create:
                raise WorkspaceError(f"no workspace at {folder}")
            try:
                folder.mkdir(parents=True)
            except OSError as exc:
                raise WorkspaceError(f"cannot create the workspace {folder}: "
                                     f"{exc.strerror or exc}") from None
        settings = load_settings(folder)
        if create and not (folder / "workspace.json").exists():
            try:
                save_settings(folder, settings)
            except OSError as exc:  # a read-only or full disk: the defaults still work
                warnings_at_open = [f"could not write {folder / 'workspace.json'} "
                                    f"({exc.strerror or exc}); using the defaults"]
            else:
                warnings_at_open = []
        else:
            warnings_at_open = []
        agents, warnings = {}, warnings_at_open
        for spec in settings.agents:
            agent = Agent(spec.id, spec.role, spec.title, spec.system)
            agent.turns, warn = read_transcript(folder / "agents" / spec.id / TRANSCRIPT)
            if warn:
                warnings.append(f"{spec.id}: {warn}")
            snap = folder / "agents" / spec.id / SNAPSHOT
            if snap.exists():
                st = snap.stat()
                agent.last_used, agent.bytes_on_disk = st.st_mtime, st.st_size
                try:
                    meta = read_header(snap).get("__metadata__") or {}
                    agent.tokens_on_disk = int(meta.get("tokens", 0))
                    agent.bytes_on_disk += blocks_on_disk(meta)
                except (SnapshotInvalid, ValueError, TypeError):
                    pass  # reported when the agent is restored
            elif (imported := folder / "agents" / spec.id / IMPORTED).exists():
                # an import (or a migration) not yet attached: its USXF file is the state
                st = imported.stat()
                agent.last_used, agent.bytes_on_disk = st.st_mtime, st.st_size
                agent.tokens_on_disk = usxf_length(imported)
            elif agent.turns:
                # turns that came from a file carry no time (ts 0): the transcript's then
                agent.last_used = max(t.ts for t in agent.turns) or file_mtime(
                    folder / "agents" / spec.id / TRANSCRIPT)
            else:
                agent.last_used = 0.0  # never used: last in line for eager restore
            agents[spec.id] = agent
        return cls(folder, settings, agents, warnings)

    def agent(self, agent_id: str) -> Agent:
        try:
            return self.agents[agent_id]
        except KeyError:
            raise UnknownAgent(f"no agent {agent_id!r} in {self.folder}; agents: "
                               f"{', '.join(self.agents)}") from None

    def agent_dir(self, agent_id: str) -> Path:
        return self.folder / "agents" / agent_id

    def snapshot_path(self, agent_id: str) -> Path:
        return self.agent_dir(agent_id) / SNAPSHOT

    def imported_path(self, agent_id: str) -> Path:
        return self.agent_dir(agent_id) / IMPORTED

    @property
    def exports_dir(self) -> Path:
        return self.folder / "exports"

    @property
    def keys_dir(self) -> Path:
        return self.folder / "keys"

    def find_agent(self, agent_id: str) -> str | None:
        """The existing agent whose name equals `agent_id` casefolded (macOS disks are
        case-insensitive: `Technical` and `technical` are one folder there), or None."""
        key = agent_id.casefold()
        return next((a for a in self.agents if a.casefold() == key), None)

    def add_agent(self, spec: AgentSpec, turns: list[Turn], *, replace: bool = False) -> Agent:
        """Register a new agent with a transcript (used by import). Atomic per file.
        `replace`: an existing agent of that name that has no turns gives way to it."""
        check_agent_name(spec.id)
        existing = self.find_agent(spec.id)
        if existing is not None:
            if not replace or existing != spec.id or self.agents[existing].turns:
                raise WorkspaceError(f"an agent named '{existing}' exists already; use --as NAME")
            self.flush()
        d = self.agent_dir(spec.id)
        d.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(t.to_json(), ensure_ascii=False) + "\n" for t in turns)
        write_atomic(d / TRANSCRIPT, lines.encode())
        if existing is not None:
            (d / SNAPSHOT).unlink(missing_ok=True)  # the state of an empty conversation
            self.collect_blocks()
            self.agents[existing].release()
            self.settings.agents = [spec if a.id == existing else a for a in self.settings.agents]
        else:
            self.settings.agents.append(spec)
        save_settings(self.folder, self.settings)
        agent = Agent(spec.id, spec.role, spec.title, spec.system, list(turns))
        self.agents[spec.id] = agent
        return agent

    # ---- transcript -------------------------------------------------------------------
    def append_turn(self, agent: Agent, turn: Turn, *, replaces_last: bool = False) -> None:
        """Durable before the turn counts as done: write one line, flush, fsync.
        `replaces_last`: the line stands for the turn before it (a continued or regenerated
        reply): the transcript stays append-only, and a crash before this line is written
        leaves the previous reply, which the snapshot on disk still matches."""
        d = self.agent_dir(agent.agent_id)
        d.mkdir(parents=True, exist_ok=True)
        path = d / TRANSCRIPT
        new = not path.exists()
        if not new:
            heal_tail(path)
        with open(path, "a", encoding="utf-8") as f:
            record = {**turn.to_json(), "replaces": True} if replaces_last else turn.to_json()
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(d)

    def reset(self, agent: Agent) -> None:
        """Archive the transcript (never deleted), drop the snapshot and the KV state."""
        self.flush()  # a save still landing would bring the dropped snapshot back
        d = self.agent_dir(agent.agent_id)
        t = d / TRANSCRIPT
        if t.exists():
            os.replace(t, d / f"transcript.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        for p in (d / SNAPSHOT, d / IMPORTED):
            p.unlink(missing_ok=True)
        if d.exists():
            fsync_dir(d)  # the archive's rename and the deletions are durable together
        self.collect_blocks()
        agent.turns.clear()
        agent.tokens_on_disk = agent.bytes_on_disk = 0
        agent.cache, agent.cache_ids, agent.dirty, agent.source = None, [], False, "new"
        agent.attach_used = False

    # ---- KV residency (worker thread only) -----------------------------------------------
    def ensure_resident(self, agent: Agent, loaded, *, rebuild: bool = False,
                        progress=None) -> RestoreReport:
        """Attach the agent's KV state: memory, else a verified snapshot (or import), else
        rebuild by prefill from the transcript. Never attaches anything unverified. The caller
        then applies the residency limits (`enforce_residency`)."""
        try:
            return self._attach(agent, loaded, rebuild, progress)
        finally:
            self.donors.clear()  # the evicted buffers the restore did not take go back to MLX

    def _attach(self, agent: Agent, loaded, rebuild: bool, progress) -> RestoreReport:
        t0 = time.perf_counter()
        agent.last_used = time.time()
        if agent.cache is not None and not rebuild:
            # The first turn after an attach reports where the state came from; later ones,
            # memory.
            if agent.attach_used:
                agent.source = "memory"
            return RestoreReport(agent.source, 0.0, len(agent.cache_ids))
        tok = loaded.tokenizer
        check_turn_ids(agent, loaded.identity.vocab_size)
        expected = agent.expected_ids(tok)
        if not expected:
            agent.cache, agent.cache_ids, agent.source = new_cache(loaded.model), [], "new"
            return RestoreReport("new", (time.perf_counter() - t0) * 1000, 0)
        reason = "--rebuild asked for it" if rebuild else None
        if not rebuild:
            self.flush()  # its last save, if still landing, is the snapshot to read
            imported = self.imported_path(agent.agent_id)
            try:
                if imported.exists():
                    self._attach_usxf(agent, loaded, imported, expected)
                    agent.source, agent.dirty = "usxf", True
                else:
                    pairs, ids, meta = read_snapshot(self.snapshot_path(agent.agent_id),
                                                     loaded.identity, expected, self.blocks,
                                                     prefix=True, donors=self.donors)
                    agent.cache, agent.cache_ids = attach(loaded.model, pairs), ids
                    # an older format is rewritten as blocks at the next save
                    agent.source, agent.dirty = "snapshot", meta.get("format") != FORMAT
                behind = len(expected) - len(agent.cache_ids)
                if behind:
                    # The snapshot is behind the transcript (a crash, or a failed or unfinished
                    # write, after a turn was recorded): its ids are the transcript's first ones,
                    # so its KV is theirs; only the turns after it are prefilled.
                    prefill(loaded.model, agent, expected[len(agent.cache_ids):],
                            progress=progress)
                    agent.dirty = True
                return RestoreReport(agent.source, (time.perf_counter() - t0) * 1000,
                                     len(expected), prefilled=behind)
            except SnapshotInvalid as exc:
                detail = exc.detail
                if exc.check == "tokens" and type(exc) is SnapshotInvalid:
                    detail = self._stale_detail(agent, tok) or detail
                reason = f"{exc.check} check failed: {detail}" \
                    if exc.check != "exists" else "no snapshot on disk"
            except PermeantError as exc:  # a USXF import that no longer verifies
                reason = str(exc)
        agent.cache, agent.cache_ids = new_cache(loaded.model), []
        prefill(loaded.model, agent, expected, progress=progress)
        agent.source, agent.dirty = "prefill", True
        return RestoreReport("prefill", (time.perf_counter() - t0) * 1000, len(expected), reason)

    def _stale_detail(self, agent: Agent, tok, max_back: int = 8) -> str | None:
        """When a verified snapshot holds an earlier point of this transcript (a turn finished
        after the last save, e.g. a crash between the two), say how many turns behind it is.
        The ids' digest in the header was verified by read_snapshot before this is asked."""
        try:
            meta = read_header(self.snapshot_path(agent.agent_id)).get("__metadata__") or {}
        except SnapshotInvalid:
            return None
        for k in range(1, min(max_back, len(agent.turns)) + 1):
            head = Agent(agent.agent_id, agent.role, agent.title, agent.system, agent.turns[:-k])
            if ids_digest(head.expected_ids(tok)) == meta.get("tokens_digest"):
                return (f"stale: the snapshot is {k} turn{'s' if k > 1 else ''} behind the "
                        f"transcript (a turn finished after the last save)")
        return None

    def _attach_usxf(self, agent: Agent, loaded, path: Path, expected: list[int]) -> None:
        from .errors import UsxfInvalid
        from .usxf import read_usxf
        from .usxf.keys import WorkspaceKeys

        f = read_usxf(path, trusted=WorkspaceKeys(self.keys_dir), expected_identity=loaded.identity)
        if list(f.token_ids) != expected:
            raise UsxfInvalid("tokens", "the imported token ids differ from the transcript",
                              str(path))
        kv = f.load_kv()
        agent.cache = attach_payload(loaded.model, kv.keys, kv.values, kv.dtype,
                                     loaded.identity.kv_dtype, len(f.token_ids))
        agent.cache_ids = list(f.token_ids)

    def save_agent(self, agent: Agent, loaded) -> float | None:
        """Write the agent's snapshot if it changed. Returns ms, or None when nothing to do."""
        if agent.cache is None or not agent.dirty:
            return None
        if agent.draft:  # a message being typed is never saved (engine/drafts.py)
            from .drafts import drop

            drop(loaded.model, loaded.tokenizer, agent)
        # No re-render here: cache_ids equal the transcript's ids by construction (run_turn,
        # restore and cancel keep that invariant), and a snapshot whose ids do not match is
        # rejected when it is loaded, never attached.
        path = self.snapshot_path(agent.agent_id)
        if self.flusher is None:
            info = write_snapshot(path, agent.cache, agent.cache_ids, loaded.identity,
                                  agent.agent_id, self.blocks)
        else:
            self.take_save_failures()
            with self.flusher.lock:  # no block collection between its block checks and submit
                info = write_snapshot(path, agent.cache, agent.cache_ids, loaded.identity,
                                      agent.agent_id, self.blocks, flusher=self.flusher)
        agent.tokens_on_disk, agent.bytes_on_disk = info.tokens, info.bytes
        agent.dirty = False
        imported = self.imported_path(agent.agent_id)
        if imported.exists():  # the import's state is the snapshot's once that is durable
            if not self.flush().get(agent.agent_id):
                imported.unlink(missing_ok=True)
        if self.flusher is None:
            self.collect_blocks()
        return info.ms

    def collect_blocks(self) -> list[str]:
        """Delete the KV blocks no snapshot manifest of this workspace names (a replaced or
        reset snapshot's, a crashed save's). Runs in the workspace's one writer (engine/lock.py)
        after a manifest is committed; does nothing while any manifest cannot be read, since the
        blocks it names are then unknown, nor while a save is still landing (the flusher
        collects after it). Returns the deleted names."""
        if self.flusher is None:
            return self._collect_now()
        with self.flusher.lock:
            return [] if self.flusher.pending() else self._collect_now()

    def _collect_now(self) -> list[str]:
        if not self.blocks.folder.is_dir():
            return []
        referenced: set[str] = set()
        for m in (self.folder / "agents").glob(f"*/{SNAPSHOT}"):
            try:
                meta = read_header(m).get("__metadata__") or {}
                lists = [json.loads(meta.get(key, "[]")) for key in ("blocks", "window_blocks")] \
                    if meta.get("format") in BLOCK_FORMATS else []
            except (SnapshotInvalid, ValueError):
                return []
            if not all(isinstance(names, list) for names in lists):
                return []
            referenced.update(x for names in lists for x in names if isinstance(x, str))
        return self.blocks.collect(referenced)

    def enforce_residency(self, save: Callable[[Agent], object], keep: Agent | None = None,
                          incoming: Agent | None = None) -> list[str]:
        """Evict least-recently-used agents beyond max_resident or the memory budget, calling
        `save(agent)` first (it writes the snapshot when the agent is dirty). Returns the
        evicted ids.

        `incoming`: an agent about to be restored, counted as if it were resident already, at
        the size of its snapshot (`bytes_on_disk`). Called so before the restore, the agents
        that make room for it leave first: the restore never holds more than the limits allow,
        and it lands in the K/V buffers the evicted ones just released (keep_freed_buffers),
        already in memory."""
        evicted = []
        budget = self.settings.memory_budget_mb * 1024 * 1024
        extra = incoming is not None and not incoming.resident
        while True:
            resident = sorted((a for a in self.agents.values() if a.resident),
                              key=lambda a: a.last_used)
            total = sum(a.cache_bytes() for a in resident)
            if extra and incoming is not None:
                total += incoming.bytes_on_disk
            if len(resident) + extra <= max(1, self.settings.max_resident) and total <= budget:
                break
            victims = [a for a in resident if a is not keep and a is not incoming]
            if not victims:
                break
            victim = victims[0]
            save(victim)
            if extra:  # the restore it makes room for reads into the victim's K/V buffers
                self.donors.add(buffers(victim.cache))
            # (or, when their shapes do not fit, gets them back from MLX, already in memory)
            keep_freed_buffers(min(victim.cache_bytes(), budget))
            victim.release()
            evicted.append(victim.agent_id)
        return evicted

    def delete_created(self, agent_id: str, created: list[Path]) -> None:
        """Undo a failed import: remove only the files it created, and the agent's folder if
        the import created that too (and it is then empty). Every path is resolved and must lie
        inside `agents/<valid name>`; anything else is left alone."""
        check_agent_name(agent_id)
        root = (self.folder / "agents").resolve()
        d = self.agent_dir(agent_id)
        if d.resolve().parent != root:
            return
        for p in created:
            if p.resolve().parent == d.resolve() and (p.is_file() or p.is_symlink()):
                p.unlink(missing_ok=True)
        try:
            d.rmdir() if d in created else None
        except OSError:
            pass  # not empty: something else is in it, keep it
