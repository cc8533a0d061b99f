"""The source side of a migration: `migrate_agent(engine, agent_id, target, ...)` runs every
stage and returns a MigrationReport; `start_migration(...)` runs it on its own thread for a front
end and reports through events (MigrationProgress, then MigrationDone or MigrationFailed).

Never run on the engine worker (it waits on engine jobs). The source agent never changes unless
the target acknowledged the commit and `move` was asked for; then its transcript is archived
(never deleted) and a `moved.json` marker written.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.atomic import write_atomic
from ..engine.events import Event
from ..engine.names import check_agent_name
from ..engine.text import printable
from .protocol import (
    PROTOCOL,
    Decision,
    MigrationError,
    b64,
    decide,
    estimate_size,
    format_fingerprint,
    from_ranges,
    normalize_fingerprint,
    parse_hostport,
)
from .tls import peer_fingerprint
from .transport import MigrationClient, TransportError

Progress = Callable[[str, dict], None]


# ---- what the source remembers about targets -----------------------------------------------------

class KnownTargets:
    """<workspace>/migrate/known_targets.json: host:port -> pinned fingerprint, measured MB/s."""

    def __init__(self, workspace: Path):
        self.path = Path(workspace) / "migrate" / "known_targets.json"

    def _load(self) -> dict:
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, host: str, port: int) -> dict:
        e = self._load().get(f"{host}:{port}")
        return e if isinstance(e, dict) else {}

    def update(self, host: str, port: int, **fields) -> None:
        d = self._load()
        e = d.get(f"{host}:{port}") if isinstance(d.get(f"{host}:{port}"), dict) else {}
        e.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        d[f"{host}:{port}"] = e
        write_atomic(self.path, (json.dumps(d, indent=2) + "\n").encode())


# ---- the report --------------------------------------------------------------------------------

@dataclass
class MigrationReport:
    agent: str
    target: str
    mode: str = "kv"
    quant: str = "none"
    tokens: int = 0
    size_bytes: int = 0
    chunks: int = 0
    migration_id: str | None = None
    target_agent: str | None = None
    fidelity: str | None = None
    moved: bool = False
    decision: Decision | None = None
    transfer_mb_s: float = 0.0
    retries: int = 0
    stages_ms: dict = field(default_factory=dict)
    target_result: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["decision"] = self.decision.to_json() if self.decision else None
        return d


# ---- worker-side steps (run through engine.call: fn gets the WorkerContext) -----------------------

def export_for_migration(ctx, agent_id: str, path: Path, quant: str, chunk_size: int | None):
    """The agent's state, resident first, as a signed USXF file (chunk_size: tests, --chunk-kib)."""
    from ..engine.exchange import export_agent

    ctx.restore(agent_id)
    return export_agent(ctx.model, ctx.workspace, ctx.workspace.agent(agent_id), str(path),
                        quant, chunk_size=chunk_size)


def mark_moved(ctx, agent_id: str, marker: dict) -> dict:
    """After an acknowledged commit: archive the transcript (ws.reset renames it, never deletes),
    drop the local KV, and leave agents/<id>/moved.json saying where the agent went."""
    ws = ctx.workspace
    agent = ws.agent(agent_id)
    d = ws.agent_dir(agent_id)
    before = set(d.glob("transcript.*.jsonl"))
    ws.reset(agent)
    archived = sorted(p.name for p in set(d.glob("transcript.*.jsonl")) - before)
    marker = {**marker, "archived_transcript": archived[-1] if archived else None,
              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    d.mkdir(parents=True, exist_ok=True)
    write_atomic(d / "moved.json", (json.dumps(marker, indent=2) + "\n").encode())
    return marker


def moved_marker(workspace, agent_id: str) -> dict | None:
    """The moved.json of an agent, for the UI ("moved to HOST:PORT as NAME")."""
    p = Path(workspace) / "agents" / agent_id / "moved.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


# ---- the whole migration ----------------------------------------------------------------------------

def _retrying(fn, attempts: int, report, what: str):
    """fn() with retries on transport errors (capped exponential backoff)."""
    for i in range(attempts + 1):
        try:
            return fn()
        except TransportError as exc:
            if i == attempts:
                raise
            delay = min(0.2 * 2 ** i, 5.0)
            report("retry", what=what, attempt=i + 1, delay_s=delay, error=str(exc))
            time.sleep(delay)
    raise AssertionError("unreachable")


def migrate_agent(engine, agent_id: str, target: str, pin: str | None = None,
                  quant: str = "none", move: bool = False, progress: Progress | None = None, *,
                  force: bool = False, reprefill: bool = False, name: str | None = None,
                  chunk_size: int | None = None, timeout: float = 60.0, retries: int = 6,
                  on_client: Callable[[MigrationClient], None] | None = None) -> MigrationReport:
    """Move one agent's live state to a `permeant serve` target.

    progress(stage, info) is called with stages: capabilities, decision, export, open, transfer
    (per chunk), retry, resume, verify, commit, fidelity, move, done. Raises MigrationError (or a
    subclass) on failure; the source agent is then unchanged and the target has nothing
    attached (its staged data is aborted, or expires after its TTL if unreachable)."""
    from ..engine.identity import ModelIdentity
    from ..engine.usxf import QUANTS
    from ..engine.usxf.keys import WorkspaceKeys

    def report(stage: str, **info) -> None:
        if progress is not None:
            progress(stage, info)

    if engine.on_worker_thread():
        raise MigrationError("migrate_agent must not run on the engine worker thread")
    if quant not in QUANTS:
        raise MigrationError(f"--quant must be one of {', '.join(QUANTS)}")
    if force and reprefill:
        raise MigrationError("--force (move the KV state) and --reprefill exclude each other")
    if name is not None:
        check_agent_name(name)
    host, port = parse_hostport(target)
    t_all = time.perf_counter()
    engine.wait_ready(600)
    identity = engine.model_info().identity
    engine.agent(agent_id)  # unknown agent: fails here
    keys = WorkspaceKeys(engine.folder / "keys").ensure()
    known = KnownTargets(engine.folder)
    remembered = known.get(host, port)
    if pin:
        pin_hex = normalize_fingerprint(pin)
    elif remembered.get("fingerprint"):
        pin_hex = normalize_fingerprint(remembered["fingerprint"])
    else:
        fp = peer_fingerprint(host, port, timeout)
        raise MigrationError(
            f"no certificate pinned for {host}:{port}. It presents {format_fingerprint(fp)}: "
            f"compare it with the fingerprint `permeant serve` printed on the target, then run "
            f"again with --pin {fp} (it is remembered after that). Nothing was sent.")
    rep = MigrationReport(agent_id, f"{host}:{port}", quant=quant)
    client = MigrationClient(host, port, pin_hex, keys, timeout)
    if on_client is not None:
        on_client(client)
    mid: str | None = None
    committed = False
    path: Path | None = None
    try:
        t = time.perf_counter()
        caps = _retrying(client.capabilities, 2, report, "capabilities")
        rep.stages_ms["capabilities"] = (time.perf_counter() - t) * 1000
        their = ModelIdentity.from_dict(caps.get("model") or {})
        same = their.fingerprint == identity.fingerprint
        report("capabilities", ms=rep.stages_ms["capabilities"], caps=caps, same_model=same)
        if not same:
            diff = ", ".join(identity.differences(their)) or "fingerprint"
            raise MigrationError(f"the target runs another model ({their.name}): {diff} differ. "
                                 "KV state only moves between identical models; the source agent "
                                 "is intact.")
        known.update(host, port, fingerprint=pin_hex)

        n_tokens = engine.call(lambda ctx: len(
            ctx.workspace.agent(agent_id).expected_ids(ctx.model.tokenizer))).result()
        if n_tokens == 0:
            raise MigrationError(f"agent {agent_id!r} has no conversation to migrate yet")
        rep.tokens = n_tokens
        est = estimate_size(identity.to_dict(), n_tokens, quant)
        link = remembered.get("link_mb_s")
        d = decide(n_tokens, est, caps, float(link) if isinstance(link, (int, float)) else None,
                   force="kv" if force else "reprefill" if reprefill else None)
        rep.decision, rep.mode = d, d.mode
        report("decision", decision=d, tokens=n_tokens)

        t = time.perf_counter()
        outbox = engine.folder / "migrate" / "outbox"
        outbox.mkdir(parents=True, exist_ok=True)
        path = outbox / f"{agent_id}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.usxf"
        info = engine.call(
            lambda ctx: export_for_migration(ctx, agent_id, path, quant, chunk_size)).result()
        payload = info.manifest["payload"]
        offset, length, csize = payload["offset"], payload["length"], payload["chunk_size"]
        n_chunks = -(-length // csize)
        rep.size_bytes = info.size if d.mode == "kv" else offset
        rep.chunks = n_chunks if d.mode == "kv" else 0
        rep.stages_ms["export"] = (time.perf_counter() - t) * 1000
        report("export", ms=rep.stages_ms["export"], size=info.size, chunks=n_chunks,
               chunk_size=csize, quant=quant, digest=info.digest)

        with open(path, "rb") as fh:
            head = fh.read(offset)
        request = {"protocol": PROTOCOL, "mode": d.mode, "name": name, "head": b64(head),
                   "summary": {"agent": agent_id, "tokens": n_tokens, "quant": quant,
                               "size": info.size, "chunk_size": csize, "n_chunks": n_chunks,
                               "digest": info.digest}}
        t = time.perf_counter()
        st = _retrying(lambda: client.open(request), 2, report, "open")
        mid = st["id"]
        rep.migration_id, rep.target_agent = mid, st.get("name")
        rep.stages_ms["open"] = (time.perf_counter() - t) * 1000
        report("open", ms=rep.stages_ms["open"], id=mid, name=st.get("name"),
               resumed=st.get("resumed", False))

        if d.mode == "kv":
            t = time.perf_counter()
            sent = _upload(client, mid, path, offset, length, csize, st, report, retries, rep)
            secs = time.perf_counter() - t
            rep.stages_ms["transfer"] = secs * 1000
            rep.transfer_mb_s = sent / 1e6 / secs if secs > 0 else 0.0
            if sent >= (1 << 20):  # enough to be a measurement of this link
                known.update(host, port, link_mb_s=round(rep.transfer_mb_s, 1))

        t = time.perf_counter()
        prep = _retrying(lambda: client.prepare(mid), retries, report, "prepare")
        rep.stages_ms["verify"] = (time.perf_counter() - t) * 1000
        report("verify", ms=rep.stages_ms["verify"], target_ms=prep.get("verify_ms", 0.0))

        t = time.perf_counter()
        res = _commit(client, mid, retries, report)
        committed = True
        rep.stages_ms["commit"] = (time.perf_counter() - t) * 1000
        result = res.get("result") or {}
        rep.target_result = result
        rep.target_agent = result.get("agent", rep.target_agent)
        rep.fidelity = result.get("fidelity")
        report("commit", ms=rep.stages_ms["commit"], agent=rep.target_agent, result=result)
        report("fidelity", result=rep.fidelity, ms=result.get("fidelity_ms", 0.0))

        if move:
            t = time.perf_counter()
            marker = {"moved_to": f"{host}:{port}", "fingerprint": pin_hex,
                      "target_agent": rep.target_agent, "migration_id": mid,
                      "tokens": n_tokens, "digest": info.digest, "mode": d.mode}
            done = engine.call(lambda ctx: mark_moved(ctx, agent_id, marker)).result()
            rep.moved = True
            rep.stages_ms["move"] = (time.perf_counter() - t) * 1000
            report("move", ms=rep.stages_ms["move"], marker=done)
        rep.stages_ms["total"] = (time.perf_counter() - t_all) * 1000
        report("done", ms=rep.stages_ms["total"], report=rep)
        return rep
    except BaseException:
        if mid is not None and not committed:
            try:  # best effort; a committed migration refuses the abort (409) anyway
                client.abort(mid)
                report("abort", id=mid)
            except Exception:  # noqa: BLE001 - the target's TTL removes it otherwise
                pass
        raise
    finally:
        client.close()
        if path is not None:
            path.unlink(missing_ok=True)


def _upload(client: MigrationClient, mid: str, path: Path, offset: int, length: int,
            csize: int, st: dict, report, retries: int, rep: MigrationReport) -> int:
    """PUT every missing chunk; after a transport failure ask the target which chunks it has and
    go on from the first missing one. Returns the bytes sent in this run."""
    n_chunks = -(-length // csize)
    have = from_ranges(st.get("present", []), n_chunks)
    sent = 0
    delay = float(os.environ.get("PERMEANT_MIGRATE_TEST_CHUNK_DELAY", "0") or 0)  # tests only
    t0 = time.perf_counter()
    failures = 0
    with open(path, "rb") as fh:
        fd = fh.fileno()
        while not all(have):
            try:
                for i in [i for i in range(n_chunks) if not have[i]]:
                    a, b = i * csize, min((i + 1) * csize, length)
                    data = os.pread(fd, b - a, offset + a)
                    client.put_chunk(mid, i, data)
                    have[i] = True
                    sent += len(data)
                    secs = time.perf_counter() - t0
                    report("transfer", chunk=i, n_chunks=n_chunks, sent=sent,
                           done=sum(have), total=length, mb_s=sent / 1e6 / secs if secs else 0.0)
                    if delay:
                        time.sleep(delay)
            except TransportError as exc:
                failures += 1
                rep.retries += 1
                if failures > retries:
                    raise MigrationError(
                        f"the transfer failed {failures} times ({exc}); the source agent is "
                        "intact, and the target drops the staged data after its TTL") from None
                time.sleep(min(0.2 * 2 ** (failures - 1), 5.0))
                st = _retrying(lambda: client.status(mid), retries, report, "status")
                have = from_ranges(st.get("present", []), n_chunks)
                report("resume", from_chunk=st.get("first_missing"), present=sum(have),
                       n_chunks=n_chunks, attempt=failures, error=str(exc))
    return sent


def _commit(client: MigrationClient, mid: str, retries: int, report) -> dict:
    """Commit; if the answer is lost, ask the target what happened before anything else."""
    try:
        return client.commit(mid)
    except TransportError as exc:
        last = exc
    for i in range(retries):
        time.sleep(min(0.5 * 2 ** i, 5.0))
        try:
            st = client.status(mid)
        except TransportError as exc:
            last = exc
            continue
        report("retry", what="commit", attempt=i + 1, state=st.get("state"))
        if st.get("state") == "committed":
            return st
        if st.get("state") == "prepared":
            try:
                return client.commit(mid)
            except TransportError as exc:
                last = exc
    raise MigrationError(f"the commit's outcome is unknown ({last}); the source agent is kept "
                         "as it was. Check the target (`permeant status` there) before retrying.")


def start_migration(engine, agent_id: str, target: str, pin: str | None = None,
                    quant: str = "none", move: bool = False,
                    on_event: Callable[[Event], None] | None = None) -> threading.Thread:
    """Run `migrate_agent` on a thread of its own (it waits on the network and on the engine
    worker), started and returned. Each stage but the per-chunk transfer arrives through
    `on_event` as a MigrationProgress, then one MigrationDone or MigrationFailed. The texts
    carry what the target answered, escaped with engine.text.printable."""
    from ..engine.events import MigrationDone, MigrationFailed, MigrationProgress

    def emit(event) -> None:
        if on_event is not None:
            on_event(event)

    def progress(stage: str, info: dict) -> None:
        if stage == "transfer":
            return  # per chunk: too chatty for notifications
        detail = ", ".join(f"{k} {v}" for k, v in info.items() if not isinstance(v, dict))
        emit(MigrationProgress(agent_id, stage, printable(detail[:300])))

    def run() -> None:
        try:
            report = migrate_agent(engine, agent_id, target, pin, quant, move, progress)
            emit(MigrationDone(agent_id, target, printable(str(report.fidelity or "committed"))))
        except Exception as exc:  # noqa: BLE001 - reported to the person
            emit(MigrationFailed(agent_id, printable(str(exc) or type(exc).__name__)))

    thread = threading.Thread(target=run, name=f"migrate-{agent_id}", daemon=True)
    thread.start()
    return thread
