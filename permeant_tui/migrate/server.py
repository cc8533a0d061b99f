"""`permeant serve`: the migration target. A Starlette app on uvicorn, over TLS with a
self-signed certificate the sources pin, holding one workspace and one model (an Engine).

Stages (docs/MIGRATION.md): GET /capabilities; POST /migrations (the signed USXF head: the
target verifies the signature, the model identity and the room, and answers with an id);
PUT /migrations/{id}/chunks/{n} (each payload chunk checked against its signed SHA-256 as it
arrives; a retry is idempotent); GET /migrations/{id} (which chunks are present: an interrupted
transfer resumes from the first missing one); POST .../prepare (verify the whole staged file);
POST .../commit (import into the workspace, atomically, then replay the fidelity probe);
DELETE /migrations/{id} (abort: the staged data is removed).

Staged data lives in <workspace>/migrate/staging/<id>/ and is never attached on its own: on
start the folder is emptied (a commit cut short by a crash is rolled back first), and a staged
migration idle for the TTL is removed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.errors import PermeantError, UsxfInvalid
from .protocol import (
    AGENT_NAME_RE,
    AUTH_HEADERS,
    DIGEST_RE,
    EMPTY_SHA256,
    H_DIGEST,
    KEY_ID_RE,
    MIGRATION_ID_RE,
    MODES,
    NONCE_RE,
    PROTOCOL,
    Limits,
    dtype_size,
    kv_bytes_per_token,
    parse_hostport,
    signing_message,
    to_ranges,
    unb64,
)

log = logging.getLogger("permeant.migrate")

STAGING = "staging"
PART = "file.usxf"
JOURNAL = "commit.json"
ACTIVE = ("receiving", "verifying", "prepared", "committing")


def _say(msg: str) -> None:
    print(f"[serve {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- a test-only model (a server process cannot share the test's tiny model) -------------------

def model_override_for_tests():
    """PERMEANT_TEST_TINY_MODEL=SEED: a 2-layer random llama with the real tokenizer, built as
    tests/conftest.py builds it (same seed, same weights, same identity). Tests only."""
    seed = os.environ.get("PERMEANT_TEST_TINY_MODEL")
    if not seed:
        return None
    from ..engine.models import load_model, random_llama

    return random_llama(load_model(None).tokenizer, int(seed), 2)


# ---- staged migrations ----------------------------------------------------------------------------

@dataclass
class Staged:
    id: str
    key_id: str
    mode: str
    name: str
    folder: Path
    header: object  # usxf.reader.Header
    parsed: object  # usxf.reader.Parsed
    turns: list
    n_chunks: int
    created: float = field(default_factory=time.time)
    touched: float = field(default_factory=time.monotonic)
    state: str = "receiving"
    present: bytearray = field(default_factory=bytearray)
    received_bytes: int = 0
    result: dict | None = None
    error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def file(self) -> Path:
        return self.folder / PART

    @property
    def size(self) -> int:
        return self.header.total_size if self.mode == "kv" else self.header.payload_offset

    @property
    def digest(self) -> str:
        return self.parsed.digest.hex()

    def chunk_range(self, n: int) -> tuple[int, int]:
        c, length = self.header.chunk_size, self.header.payload_len
        return n * c, min((n + 1) * c, length)

    def view(self, ttl: float) -> dict:
        missing = to_ranges([not p for p in self.present])
        return {
            "id": self.id, "state": self.state, "mode": self.mode, "name": self.name,
            "agent": self.parsed.agent.agent_id, "tokens": len(self.parsed.token_ids),
            "size": self.size, "chunk_size": self.header.chunk_size, "n_chunks": self.n_chunks,
            "present": to_ranges(self.present), "missing": missing,
            "first_missing": missing[0][0] if missing else None,
            "received_bytes": self.received_bytes, "digest": self.digest,
            "expires_in": max(0.0, ttl - (time.monotonic() - self.touched)),
            "result": self.result, "error": self.error,
        }


def recover_staging(workspace: Path) -> list[str]:
    """On start: roll back any commit a crash cut short (its agent folder, if the agent never got
    registered), then remove every staged migration. Nothing staged is ever attached."""
    from ..engine.settings import load_settings

    root = workspace / "migrate" / STAGING
    notes = []
    if not root.is_dir():
        return notes
    registered = {a.id for a in load_settings(workspace).agents} if workspace.exists() else set()
    for d in sorted(root.iterdir()):
        journal = d / JOURNAL
        if journal.exists():
            try:
                name = str(json.loads(journal.read_text())["agent"])
            except (OSError, ValueError, KeyError, TypeError):
                name = ""
            if AGENT_NAME_RE.fullmatch(name) and name not in registered:
                shutil.rmtree(workspace / "agents" / name, ignore_errors=True)
                notes.append(f"rolled back the unfinished commit of {name!r} ({d.name})")
            elif name in registered:
                notes.append(f"commit of {name!r} ({d.name}) had completed")
        shutil.rmtree(d, ignore_errors=True)
        notes.append(f"discarded staged migration {d.name}")
    return notes


# ---- the target -------------------------------------------------------------------------------------

class Target:
    """Everything the request handlers share: the engine, keys, certificate, staged migrations,
    the nonce cache. Handlers run on the event loop; file work and hashing go to threads; MLX
    work goes to the engine worker."""

    def __init__(self, engine, cert, limits: Limits, speed: dict | None = None):
        from ..engine.usxf.keys import WorkspaceKeys

        self.engine = engine
        self.ws = engine.ws
        self.keys = WorkspaceKeys(self.ws.keys_dir).ensure()
        self.cert = cert
        self.limits = limits
        self.speed = speed or {}
        self.staging = self.ws.folder / "migrate" / STAGING
        self.staging.mkdir(parents=True, exist_ok=True)
        self.migrations: dict[str, Staged] = {}
        self.nonces: dict[str, float] = {}
        self._trusted: tuple[float, dict[str, bytes]] = (0.0, {})

    # ---- authentication ----
    def trusted_raw(self) -> dict[str, bytes]:
        """Re-read at most every 2 s, so `permeant keys trust` applies without a restart."""
        at, keys = self._trusted
        if time.monotonic() - at > 2.0:
            keys = self.keys._trusted_raw()
            self._trusted = (time.monotonic(), keys)
        return keys

    def authenticate(self, scope: dict, headers: dict[str, str]) -> tuple[str | None, str]:
        """(key id, "") or (None, why) — the why is logged here, never sent."""
        from ..engine.usxf.keys import verify_ed25519

        vals = [headers.get(h) for h in AUTH_HEADERS]
        if any(v is None for v in vals):
            return None, "missing authentication headers"
        kid, ts, nonce, digest, sig_text = vals
        if not (KEY_ID_RE.fullmatch(kid) and NONCE_RE.fullmatch(nonce)
                and DIGEST_RE.fullmatch(digest) and ts.isdigit() and len(ts) <= 12):
            return None, "malformed authentication headers"
        raw = self.trusted_raw().get(kid)
        if raw is None:
            return None, f"key {kid} is not trusted"
        sig = unb64(sig_text, 64)
        if sig is None or len(sig) != 64:
            return None, "malformed signature"
        path = scope.get("raw_path") or scope.get("path", "").encode()
        path = path.decode("latin-1")
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        msg = signing_message(scope["method"], path, ts, nonce, digest, self.cert.fingerprint)
        if not verify_ed25519(raw, sig, msg):
            return None, f"bad signature for key {kid}"
        now = time.time()
        if abs(now - int(ts)) > self.limits.clock_skew_s:
            return None, f"timestamp {int(ts) - now:+.0f} s off (key {kid})"
        if nonce in self.nonces:
            return None, f"replayed nonce (key {kid})"
        if len(self.nonces) >= self.limits.max_nonces:
            self.purge_nonces()
            if len(self.nonces) >= self.limits.max_nonces:
                return None, "nonce cache full"
        self.nonces[nonce] = time.monotonic() + 2 * self.limits.clock_skew_s + 1
        return kid, ""

    def purge_nonces(self) -> None:
        now = time.monotonic()
        for k in [k for k, exp in self.nonces.items() if exp < now]:
            del self.nonces[k]

    # ---- bookkeeping ----
    def active(self) -> list[Staged]:
        return [m for m in self.migrations.values() if m.state in ACTIVE]

    def lookup(self, mid: str, key_id: str) -> Staged | None:
        m = self.migrations.get(mid) if MIGRATION_ID_RE.fullmatch(mid) else None
        return m if m is not None and m.key_id == key_id else None  # others' ids: not found

    def drop_files(self, m: Staged) -> None:
        shutil.rmtree(m.folder, ignore_errors=True)

    def expire(self) -> list[str]:
        now, gone = time.monotonic(), []
        for m in list(self.migrations.values()):
            if m.state in ("verifying", "committing"):
                continue  # never under a running operation
            if now - m.touched > self.limits.ttl_s:
                self.drop_files(m)
                del self.migrations[m.id]
                gone.append(f"migration {m.id}: " + (
                    "record of the commit forgotten" if m.state == "committed" else
                    f"{m.state}, idle for {self.limits.ttl_s:g} s: expired, staged data removed"))
        self.purge_nonces()
        return gone

    def capabilities(self) -> dict:
        import mlx.core as mx
        import psutil

        from ..engine import runtime
        from ..engine.usxf import QUANTS

        lm = self.engine.loaded
        vm = psutil.virtual_memory()
        disk = shutil.disk_usage(self.staging)
        return {
            "protocol": PROTOCOL,
            "server": "permeant",
            "model": lm.identity.to_dict(),
            "runtime": {"name": "mlx", "version": mx.__version__, "device": runtime.device_label(),
                        "blas": runtime.blas_label(), "weights": lm.weights_mode},
            "dtypes": {"kv": lm.identity.kv_dtype, "transfer": list(QUANTS),
                       "weights": lm.weights_mode},
            "context_limit": lm.context_limit,
            "memory": {"available": vm.available, "total": vm.total},
            "disk": {"free": disk.free, "staged": sum(m.size for m in self.active())},
            "prefill_tok_s": self.speed.get("prefill_tok_s"),
            "decode_tok_s": self.speed.get("decode_tok_s"),
            "verify_mb_s": self.speed.get("verify_mb_s"),
            "limits": self.limits.public(),
            "migrations": {"active": len(self.active()), "max": self.limits.max_migrations},
            "fingerprint": self.cert.fingerprint,
            "key_id": self.keys.key_id,
            "modes": list(MODES),
        }

    def free_name(self, wanted: str | None, fallback: str) -> tuple[str | None, str]:
        taken = set(self.ws.agents) | {m.name for m in self.active()}
        if wanted is not None:
            return (wanted, "") if wanted not in taken else (None, f"an agent named {wanted!r} "
                                                                   "exists on the target")
        base = fallback if AGENT_NAME_RE.fullmatch(fallback) else "agent"
        for i in range(1, 1000):
            cand = base if i == 1 else f"{base[:58]}-{i}"
            if cand not in taken:
                return cand, ""
        return None, "no free agent name"


# ---- worker-side steps (run on the engine thread) --------------------------------------------------

def check_record(engine, parsed) -> list:
    """The agent record must be a chat agent whose transcript renders to exactly the token ids
    (with this target's chat template). Returns the turns. Same rule as exchange.import_usxf."""
    from ..engine.agent import Agent, Turn

    lm = engine.loaded
    turns = []
    for i, t in enumerate(parsed.agent.turns):
        gen = t.get("generated_ids")
        if not isinstance(gen, list) or not all(isinstance(x, int) and x >= 0 for x in gen):
            raise UsxfInvalid("agent", f"turn {i} has no usable generated_ids: this state cannot "
                                       "be continued as a chat agent")
        turns.append(Turn(t["user"], t["reply"], tuple(gen)))
    a = parsed.agent
    probe = Agent(a.agent_id, a.role, a.title, a.system, turns)
    if probe.expected_ids(lm.tokenizer) != parsed.token_ids.tolist():
        raise UsxfInvalid("tokens", "the token ids do not match the transcript rendered with this "
                                    "target's chat template")
    return turns


def commit_on_worker(engine, m: Staged) -> dict:
    """Attach: the agent is registered last (one atomic settings write), so a failure before that
    leaves nothing; the fidelity probe then runs on the attached state and is reported."""
    from ..engine.agent import Agent
    from ..engine.exchange import compare_probe, import_usxf
    from ..engine.generation import new_cache, prefill
    from ..engine.settings import AgentSpec

    t0 = time.perf_counter()
    out: dict = {"agent": m.name, "mode": m.mode, "tokens": len(m.parsed.token_ids)}
    if m.mode == "kv":
        report = import_usxf(engine, str(m.file), m.name)  # verify again, copy, register
        out.update(key_id=report["key_id"], quant=report["quant"], digest=report["digest"])
        out["import_ms"] = (time.perf_counter() - t0) * 1000
        try:  # committed already: what follows is a report, never a failure of the commit
            t1 = time.perf_counter()
            agent = engine.ws.agent(m.name)
            restored = engine._restore(agent)  # read + attach: the state is resident now
            out["restore_ms"] = (time.perf_counter() - t1) * 1000
            out["restored_from"] = restored.source
            t2 = time.perf_counter()
            out["fidelity"] = compare_probe(engine.loaded, agent, m.parsed.fidelity)
            out["fidelity_ms"] = (time.perf_counter() - t2) * 1000
        except Exception as exc:  # noqa: BLE001
            out["fidelity"] = f"not checked: {type(exc).__name__}: {exc}"
        out["attach_ms"] = out["import_ms"] + out.get("restore_ms", 0.0)
        return out
    # reprefill: rebuild the KV from the signed transcript, check the probe, then register
    lm, ws = engine.loaded, engine.ws
    a = m.parsed.agent
    agent = Agent(m.name, a.role, a.title, a.system, list(m.turns))
    ids = agent.expected_ids(lm.tokenizer)
    agent.cache, agent.cache_ids = new_cache(lm.model), []
    prefill(lm.model, agent, ids)
    out["prefill_ms"] = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    fidelity = compare_probe(lm, agent, m.parsed.fidelity)
    out["fidelity_ms"] = (time.perf_counter() - t1) * 1000
    registered = ws.add_agent(AgentSpec(m.name, a.role, a.title, a.system), list(m.turns))
    registered.cache, registered.cache_ids = agent.cache, agent.cache_ids
    registered.source, registered.dirty = "prefill", True
    ws.enforce_residency(lm, keep=registered)
    out["fidelity"] = fidelity
    out["attach_ms"] = (time.perf_counter() - t0) * 1000
    return out


# ---- HTTP ---------------------------------------------------------------------------------------

def build_app(target: Target):
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    lim = target.limits

    def err(status: int, error: str, detail: str = "", **extra) -> JSONResponse:
        body = {"error": error}
        if detail:
            body["detail"] = detail
        body.update(extra)
        return JSONResponse(body, status_code=status)

    class BodyError(Exception):
        def __init__(self, response):
            self.response = response

    async def read_body(request: Request, limit: int, exact: int | None = None) -> bytes:
        """The whole body, bounded in size and time, hashing to the signed digest."""
        cl = request.headers.get("content-length")
        if request.headers.get("transfer-encoding") or cl is None:
            raise BodyError(err(411, "length-required"))
        if not cl.isdigit() or len(cl) > 15:
            raise BodyError(err(400, "bad-content-length"))
        n = int(cl)
        if n > limit:
            raise BodyError(err(413, "too-large", f"{n} bytes > {limit}"))
        if exact is not None and n != exact:
            raise BodyError(err(400, "bad-length", f"{n} bytes, expected {exact}"))
        buf = bytearray()

        async def collect():
            async for piece in request.stream():
                buf.extend(piece)
                if len(buf) > n:
                    raise BodyError(err(400, "bad-length", "more bytes than Content-Length"))

        try:
            await asyncio.wait_for(collect(), lim.body_timeout_s)
        except asyncio.TimeoutError:
            raise BodyError(err(408, "timeout", "the body took too long")) from None
        except ClientDisconnect:
            raise BodyError(err(400, "disconnected")) from None
        if len(buf) != n:
            raise BodyError(err(400, "bad-length", "fewer bytes than Content-Length"))
        return bytes(buf)

    def body_digest_ok(request: Request, data: bytes, digest: bytes | None = None) -> bool:
        d = (digest or hashlib.sha256(data).digest()).hex()
        return d == request.headers.get(H_DIGEST)

    async def read_json(request: Request, limit: int) -> dict:
        data = await read_body(request, limit)
        if not body_digest_ok(request, data):
            raise BodyError(err(400, "body-digest", "the body does not hash to the signed digest"))
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise BodyError(err(400, "bad-json")) from None
        if not isinstance(obj, dict):
            raise BodyError(err(400, "bad-json", "expected an object"))
        return obj

    open_lock = asyncio.Lock()

    def key_of(request: Request) -> str:
        return request.scope["permeant_key"]

    # ---- handlers ----
    async def capabilities(request: Request):
        return JSONResponse(await asyncio.to_thread(target.capabilities))

    async def open_migration(request: Request):
        from ..engine.usxf.reader import (
            check_signature,
            decode_manifest,
            parse_header,
            parse_manifest,
        )
        from ..engine.usxf.spec import HEADER_SIZE

        kid = key_of(request)
        body = await read_json(request, lim.max_head_bytes * 4 // 3 + lim.max_json_bytes)
        if body.get("protocol") != PROTOCOL:
            return err(400, "protocol", f"expected {PROTOCOL!r}")
        mode = body.get("mode", "kv")
        if mode not in MODES:
            return err(400, "bad-mode", f"mode must be one of {MODES}")
        name = body.get("name")
        if name is not None and not (isinstance(name, str) and AGENT_NAME_RE.fullmatch(name)):
            return err(400, "bad-name", "an agent name is 1-64 of A-Z a-z 0-9 _ . - "
                                        "(not starting with . _ -)")
        head = unb64(body.get("head"), lim.max_head_bytes)
        if head is None or len(head) < HEADER_SIZE:
            return err(400, "bad-head", "head must be base64 of the USXF file's first "
                                        f"payload_offset bytes, at most {lim.max_head_bytes}")
        try:
            header = parse_header(head[:HEADER_SIZE])
            if header.payload_offset != len(head):
                raise UsxfInvalid("bounds", f"head of {len(head)} bytes, the header's payload "
                                            f"offset is {header.payload_offset}")
            if head[HEADER_SIZE + header.prefix_len:].count(0) != len(head) - HEADER_SIZE - header.prefix_len:
                raise UsxfInvalid("padding", "non-zero bytes between the signature and the payload")
            manifest = head[HEADER_SIZE:HEADER_SIZE + header.manifest_len]
            sig_block = head[HEADER_SIZE + header.manifest_len:HEADER_SIZE + header.prefix_len]
            signer, _, _ = check_signature(header, manifest, sig_block, target.trusted_raw())
            parsed = await asyncio.to_thread(
                lambda: parse_manifest(decode_manifest(manifest), header, signer,
                                       expected_identity=target.engine.loaded.identity))
        except UsxfInvalid as exc:
            status = {"untrusted-key": 403, "model-identity": 409}.get(exc.check, 422)
            _say(f"refused a migration from key {kid}: {exc.check}: {exc.detail}")
            return err(status, exc.check, exc.detail)
        if mode == "kv" and header.chunk_size > lim.max_chunk_bytes:
            return err(413, "chunk-size", f"chunks of {header.chunk_size} bytes; this target "
                                          f"takes at most {lim.max_chunk_bytes}")
        n_tokens = len(parsed.token_ids)
        lm = target.engine.loaded
        fid = parsed.fidelity
        need_ctx = n_tokens + (len(fid.probe_prompt_ids) + fid.n if fid else 0)
        if need_ctx > lm.context_limit:
            return err(409, "context", f"{n_tokens} tokens (+ probe) do not fit this target's "
                                       f"context limit of {lm.context_limit}")
        async with open_lock:  # checks and registration as one step (no two take one name)
            return await _open_checked(kid, mode, name, head, header, parsed, n_tokens, lm)

    async def _open_checked(kid, mode, name, head, header, parsed, n_tokens, lm):
        # resume: the same signed state from the same key, still receiving
        for m in target.active():
            if (m.key_id == kid and m.digest == parsed.digest.hex() and m.mode == mode
                    and m.state == "receiving" and (name is None or name == m.name)):
                m.touched = time.monotonic()
                _say(f"migration {m.id}: resumed by key {kid}")
                return JSONResponse({**m.view(lim.ttl_s), "resumed": True})
        if len(target.active()) >= lim.max_migrations:
            return err(429, "busy", f"{lim.max_migrations} migrations are staged already; "
                                    "retry later", retry_after=5)
        size = header.total_size if mode == "kv" else header.payload_offset
        staged = sum(m.size for m in target.active())
        if mode == "kv" and staged + size > lim.max_staged_bytes:
            return err(507, "no-room", f"{(staged + size) >> 20} MiB staged would exceed the "
                                       f"target's {lim.max_staged_bytes >> 20} MiB")
        disk = shutil.disk_usage(target.staging)
        pending = sum(m.size for m in target.active() if m.mode == "kv")  # their import copies
        need_disk = (2 * size if mode == "kv" else 0) + pending + lim.disk_reserve_bytes
        if disk.free < need_disk:
            return err(507, "no-room", f"the target's disk has {disk.free >> 20} MiB free, this "
                                       f"needs {need_disk >> 20} MiB")
        import psutil

        kv_bytes = n_tokens * kv_bytes_per_token(parsed.identity.to_dict(),
                                                 dtype_size(lm.identity.kv_dtype))
        avail = psutil.virtual_memory().available
        if avail < 2 * kv_bytes + lim.memory_reserve_bytes:
            return err(507, "no-room", f"the target has {avail >> 20} MiB of memory available, "
                                       f"attaching needs about {(2 * kv_bytes) >> 20} MiB")
        chosen, why = target.free_name(name, parsed.agent.agent_id)
        if chosen is None:
            return err(409, "name-taken", why + "; choose another with --as NAME")
        try:
            turns = await asyncio.wrap_future(
                target.engine.call(lambda e: check_record(e, parsed)))
        except UsxfInvalid as exc:
            return err(422, exc.check, exc.detail)
        except Exception as exc:  # noqa: BLE001 - a record the chat template cannot render
            return err(422, "agent", f"the agent record is unusable here ({type(exc).__name__})")
        mid = secrets.token_hex(16)
        folder = target.staging / mid
        n_chunks = header.n_chunks if mode == "kv" else 0
        m = Staged(mid, kid, mode, chosen, folder, header, parsed, turns, n_chunks,
                   present=bytearray(n_chunks))

        def create():
            folder.mkdir(parents=True)
            fd = os.open(folder / PART, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                if mode == "kv":
                    try:
                        os.posix_fallocate(fd, 0, size)  # the disk room is reserved now
                    except OSError as exc:
                        if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                            raise
                        os.ftruncate(fd, size)  # a filesystem without fallocate
                os.pwrite(fd, head, 0)
            finally:
                os.close(fd)
            (folder / "meta.json").write_text(json.dumps(
                {"id": mid, "key_id": kid, "mode": mode, "name": chosen, "created": m.created,
                 "digest": m.digest, "size": size}))

        try:
            await asyncio.to_thread(create)
        except OSError as exc:
            target.drop_files(m)
            return err(507, "no-room", f"cannot stage: {exc.strerror or exc}")
        target.migrations[mid] = m
        _say(f"migration {mid}: opened by key {kid}: agent {parsed.agent.agent_id!r} as "
             f"{chosen!r}, {n_tokens} tokens, {size / 1e6:.1f} MB, {n_chunks} chunks, "
             f"quant {parsed.quant}, mode {mode}")
        return JSONResponse({**m.view(lim.ttl_s), "resumed": False}, status_code=201)

    async def status(request: Request):
        m = target.lookup(request.path_params["mid"], key_of(request))
        if m is None:
            return err(404, "not-found")
        return JSONResponse(m.view(lim.ttl_s))

    async def put_chunk(request: Request):
        m = target.lookup(request.path_params["mid"], key_of(request))
        if m is None:
            return err(404, "not-found")
        n = request.path_params["n"]
        if not 0 <= n < m.n_chunks:
            return err(404, "no-such-chunk", f"chunks are 0..{m.n_chunks - 1}")
        if m.state != "receiving":
            return err(409, "state", f"the migration is {m.state}")
        a, b = m.chunk_range(n)
        data = await read_body(request, lim.max_chunk_bytes, exact=b - a)
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).digest())
        if not body_digest_ok(request, data, digest):
            return err(400, "body-digest", "the body does not hash to the signed digest")
        if digest != m.parsed.chunk_digests[n]:
            _say(f"migration {m.id}: chunk {n} refused: checksum differs from the signed manifest")
            return err(422, "chunk-checksum", f"chunk {n} does not match the manifest's SHA-256",
                       chunk=n)
        m.touched = time.monotonic()
        if m.present[n]:
            return JSONResponse({"chunk": n, "duplicate": True, "received": sum(m.present),
                                 "n_chunks": m.n_chunks})

        def write():
            fd = os.open(m.file, os.O_WRONLY)
            try:
                os.pwrite(fd, data, m.header.payload_offset + a)
            finally:
                os.close(fd)

        try:
            await asyncio.to_thread(write)
        except OSError:
            return err(409, "state", "the migration is gone")
        if m.state != "receiving" or target.migrations.get(m.id) is not m:
            return err(409, "state", f"the migration is {m.state}")
        if not m.present[n]:
            m.present[n] = 1
            m.received_bytes += len(data)
        m.touched = time.monotonic()
        return JSONResponse({"chunk": n, "duplicate": False, "received": sum(m.present),
                             "n_chunks": m.n_chunks})

    async def prepare(request: Request):
        from ..engine.usxf import verify_usxf

        m = target.lookup(request.path_params["mid"], key_of(request))
        if m is None:
            return err(404, "not-found")
        async with m.lock:
            if m.state == "prepared":
                return JSONResponse(m.view(lim.ttl_s))
            if m.state != "receiving":
                return err(409, "state", f"the migration is {m.state}")
            if not all(m.present):
                return err(409, "incomplete", "chunks are missing",
                           missing=to_ranges([not p for p in m.present]))
            m.state = "verifying"
            t0 = time.perf_counter()
            if m.mode == "kv":
                def verify():
                    fd = os.open(m.file, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    f = verify_usxf(m.file, trusted=target.trusted_raw(),
                                    expected_identity=target.engine.loaded.identity)
                    if f.digest != m.digest:
                        raise UsxfInvalid("payload-digest", "the staged file is not the announced one")

                try:
                    await asyncio.to_thread(verify)
                except Exception as exc:  # noqa: BLE001 - UsxfInvalid, or the disk
                    check = exc.check if isinstance(exc, UsxfInvalid) else "io"
                    detail = exc.detail if isinstance(exc, UsxfInvalid) else type(exc).__name__
                    m.state, m.error = "failed", f"{check}: {detail}"
                    target.drop_files(m)
                    _say(f"migration {m.id}: verify failed: {m.error}")
                    return err(422, check, detail)
            m.state = "prepared"
            m.touched = time.monotonic()
            ms = (time.perf_counter() - t0) * 1000
            _say(f"migration {m.id}: prepared (verified in {ms:.0f} ms), staged as {m.name!r}")
            return JSONResponse({**m.view(lim.ttl_s), "verify_ms": ms})

    async def commit(request: Request):
        m = target.lookup(request.path_params["mid"], key_of(request))
        if m is None:
            return err(404, "not-found")
        async with m.lock:
            if m.state == "committed":
                return JSONResponse({**m.view(lim.ttl_s), "repeated": True})
            if m.state != "prepared":
                return err(409, "state", f"the migration is {m.state}")
            if m.name in target.ws.agents:
                return err(409, "name-taken", f"an agent named {m.name!r} appeared on the target")
            m.state = "committing"
            journal = m.folder / JOURNAL

            def write_journal():
                from ..engine.snapshot import fsync_dir

                with open(journal, "w") as fh:
                    fh.write(json.dumps({"agent": m.name, "at": time.time()}))
                    fh.flush()
                    os.fsync(fh.fileno())
                fsync_dir(m.folder)

            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(write_journal)
                result = await asyncio.wrap_future(
                    target.engine.call(lambda e: commit_on_worker(e, m)))
            except Exception as exc:  # noqa: BLE001 - nothing was registered: report and clean up
                m.state, m.error = "failed", f"{type(exc).__name__}: {exc}"
                target.drop_files(m)
                _say(f"migration {m.id}: commit failed: {m.error}")
                if isinstance(exc, UsxfInvalid):
                    return err(422, exc.check, exc.detail)
                if isinstance(exc, PermeantError):
                    return err(409, "refused", str(exc))
                return err(500, "internal", "the commit failed; nothing was attached")
            result["commit_ms"] = (time.perf_counter() - t0) * 1000
            m.state, m.result = "committed", result
            m.touched = time.monotonic()
            target.drop_files(m)  # the workspace holds its own copy now
            _say(f"migration {m.id}: committed as {m.name!r}; fidelity: {result.get('fidelity')}")
            return JSONResponse(m.view(lim.ttl_s))

    async def abort(request: Request):
        m = target.lookup(request.path_params["mid"], key_of(request))
        if m is None:
            return err(404, "not-found")
        async with m.lock:
            if m.state == "committed":
                return err(409, "state", "committed already: delete the agent on the target instead")
            target.drop_files(m)
            m.state = "aborted"
            target.migrations.pop(m.id, None)
        _say(f"migration {m.id}: aborted by the source; staged data removed")
        return JSONResponse({"id": m.id, "state": "aborted"})

    routes = [
        Route("/capabilities", capabilities, methods=["GET"]),
        Route("/migrations", open_migration, methods=["POST"]),
        Route("/migrations/{mid}", status, methods=["GET"]),
        Route("/migrations/{mid}", abort, methods=["DELETE"]),
        Route("/migrations/{mid}/chunks/{n:int}", put_chunk, methods=["PUT"]),
        Route("/migrations/{mid}/prepare", prepare, methods=["POST"]),
        Route("/migrations/{mid}/commit", commit, methods=["POST"]),
    ]

    async def on_body_error(request, exc: BodyError):
        return exc.response

    async def on_error(request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return err(500, "internal")

    async def sweeper():
        interval = max(0.25, min(lim.ttl_s / 4, 30.0))
        while True:
            await asyncio.sleep(interval)
            for what in target.expire():
                _say(what)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(sweeper())
        _say("ready")
        try:
            yield
        finally:
            task.cancel()

    inner = Starlette(routes=routes, lifespan=lifespan,
                      exception_handlers={BodyError: on_body_error, Exception: on_error})
    return AuthMiddleware(inner, target)


class AuthMiddleware:
    """Every HTTP request is authenticated before routing and before its body is read. Any
    failure is the same bare 401: what failed is logged on the target, never told."""

    def __init__(self, app, target: Target):
        self.app, self.target = app, target

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", []):
            try:
                headers[k.decode("latin-1").lower()] = v.decode("latin-1")
            except (AttributeError, UnicodeDecodeError):  # pragma: no cover - ASGI gives bytes
                pass
        kid, why = self.target.authenticate(scope, headers)
        if kid is None:
            client = scope.get("client") or ("?", 0)
            _say(f"unauthorized {scope.get('method')} {scope.get('path')} from {client[0]}: {why}")
            return await _send_json(send, 401, {"error": "unauthorized"})
        if scope["method"] in ("GET", "DELETE", "HEAD", "OPTIONS"):
            cl = headers.get("content-length", "0")
            if cl != "0" or "transfer-encoding" in headers or headers.get(H_DIGEST) != EMPTY_SHA256:
                return await _send_json(send, 400, {"error": "unexpected-body"})
        scope["permeant_key"] = kid
        return await self.app(scope, receive, send)


async def _send_json(send, status: int, obj: dict) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ---- start-up --------------------------------------------------------------------------------

def measure_speed(engine) -> dict:
    """Figures for the sources' cost model: prefill and decode tok/s (on the worker), and the
    SHA-256 rate of verification."""
    from ..engine.speed import quick_speed

    pf, dec = engine.call(lambda e: quick_speed(e.loaded, 256, 4)).result()
    data = os.urandom(16 << 20)
    t = time.perf_counter()
    hashlib.sha256(data).digest()
    sha = len(data) / 1e6 / (time.perf_counter() - t)
    return {"prefill_tok_s": round(pf, 1), "decode_tok_s": round(dec, 1),
            "verify_mb_s": round(sha * min(2, os.cpu_count() or 1), 1)}


def serve(args) -> int:
    import uvicorn

    from ..engine.worker import Engine
    from ..paths import resolve_workspace
    from .protocol import MigrationError
    from .tls import ensure_server_cert, load_server_cert

    folder = resolve_workspace(args.workspace)
    host, port = parse_hostport(args.listen)
    limits = Limits(ttl_s=float(args.staging_ttl), max_migrations=int(args.max_migrations),
                    max_chunk_bytes=int(args.max_chunk_mb) << 20,
                    max_head_bytes=int(args.max_manifest_mb) << 20,
                    disk_reserve_bytes=int(args.disk_reserve_mb) << 20)
    if limits.ttl_s <= 0 or limits.max_migrations < 1:
        raise MigrationError("--staging-ttl must be > 0 and --max-migrations >= 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise MigrationError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        cert = load_server_cert(args.tls_cert, args.tls_key)
    else:
        cert = ensure_server_cert(folder / "migrate" / "tls")
    if args.fingerprint:
        print(cert.display)
        return 0
    for note in recover_staging(folder):
        _say(note)
    engine = Engine(folder, args.model, eager_restore=False, loaded=model_override_for_tests())
    from ..engine.usxf.keys import WorkspaceKeys

    keys = WorkspaceKeys(folder / "keys").ensure()
    print(f"permeant serve: workspace {folder}", flush=True)
    print(f"  TLS certificate {'created: ' if cert.created else ''}{cert.cert_path}", flush=True)
    print(f"  fingerprint {cert.display}", flush=True)
    print(f"  sources pin it with: permeant migrate AGENT --to HOST:PORT --pin {cert.fingerprint}",
          flush=True)
    others = [k for k in keys.trusted() if k != keys.key_id]
    print(f"  accepts migrations signed by {len(others)} trusted key(s) besides its own "
          f"({keys.key_id}); add one with `permeant keys trust PUBKEY`", flush=True)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MigrationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    port = sock.getsockname()[1]
    engine.start()
    try:
        engine.wait_ready(600)
        speed = measure_speed(engine)
        lm = engine.loaded
        print(f"  model {lm.identity.name} ({lm.identity.fingerprint[:16]}), context "
              f"{lm.context_limit}, prefill {speed['prefill_tok_s']:.0f} tok/s, verify "
              f"{speed['verify_mb_s']:.0f} MB/s", flush=True)
        target = Target(engine, cert, limits, speed)
        app = build_app(target)
        config = uvicorn.Config(
            app, ssl_certfile=str(cert.cert_path), ssl_keyfile=str(cert.key_path),
            log_level="warning", access_log=False, lifespan="on", server_header=False,
            limit_concurrency=64, timeout_keep_alive=30, h11_max_incomplete_event_size=16384,
            timeout_graceful_shutdown=10)
        print(f"  listening on https://{host}:{port} (staged migrations expire after "
              f"{limits.ttl_s:g} s idle)", flush=True)

        def on_term(signum, frame):  # uvicorn re-raises SIGTERM after its graceful shutdown
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, on_term)
        uvicorn.Server(config).run(sockets=[sock])
    except SystemExit:
        pass
    finally:
        sock.close()
        from .commands import shutdown_engine

        shutdown_engine(engine)
        print("permeant serve: stopped", file=sys.stderr, flush=True)
    return 0
