"""The target's HTTP routes: one method per stage (docs/MIGRATION.md), on the Starlette app that
`TargetRoutes.app()` builds behind guard.py's authentication. Handlers run on the event loop:
file work goes to threads (staging.py), MLX work to the engine worker (commit.py)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import shutil
import time
from contextlib import asynccontextmanager

from ..engine.errors import PermeantError, UsxfInvalid
from ..engine.names import AGENT_NAME_RULE, is_agent_name
from ..engine.text import printable
from . import staging
from .commit import check_record, commit_staged, verify_staged
from .guard import (
    AuthMiddleware,
    BodyError,
    body_digest_ok,
    error_response,
    open_body_limit,
    read_body,
    read_json,
)
from .protocol import MODES, PROTOCOL, dtype_size, kv_bytes_per_token, to_ranges, unb64
from .staging import Staged
from .target import Target, say

log = logging.getLogger("permeant.migrate")
err = error_response


class TargetRoutes:
    """The request handlers of one target."""

    def __init__(self, target: Target):
        self.target = target
        self.limits = target.limits
        self.engine = target.engine
        self.open_lock = asyncio.Lock()  # open's checks and registration as one step

    def app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [
            Route("/capabilities", self.capabilities, methods=["GET"]),
            Route("/migrations", self.open_migration, methods=["POST"]),
            Route("/migrations/{mid}", self.status, methods=["GET"]),
            Route("/migrations/{mid}", self.abort, methods=["DELETE"]),
            Route("/migrations/{mid}/chunks/{n:int}", self.put_chunk, methods=["PUT"]),
            Route("/migrations/{mid}/prepare", self.prepare, methods=["POST"]),
            Route("/migrations/{mid}/commit", self.commit, methods=["POST"]),
        ]
        inner = Starlette(routes=routes, lifespan=self.lifespan,
                          exception_handlers={BodyError: self.on_body_error,
                                              Exception: self.on_error})
        return AuthMiddleware(inner, self.target)

    # ---- plumbing ----
    @asynccontextmanager
    async def lifespan(self, app):
        task = asyncio.create_task(self.sweeper())
        say("ready")
        try:
            yield
        finally:
            task.cancel()

    async def sweeper(self) -> None:
        interval = max(0.25, min(self.limits.ttl_s / 4, 30.0))
        while True:
            await asyncio.sleep(interval)
            for what in self.target.expire():
                say(what)

    async def on_body_error(self, request, exc: BodyError):
        return exc.response

    async def on_error(self, request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, printable(request.url.path))
        return err(500, "internal")

    def reply(self, m: Staged, status: int = 200, **extra):
        """The migration's state as the source sees it."""
        from starlette.responses import JSONResponse

        return JSONResponse({**m.view(self.limits.ttl_s), **extra}, status_code=status)

    def lookup(self, request) -> Staged | None:
        return self.target.lookup(request.path_params["mid"], request.scope["permeant_key"])

    # ---- GET /capabilities ----
    async def capabilities(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse(await asyncio.to_thread(self.target.capabilities))

    # ---- POST /migrations: the signed head ----
    async def open_migration(self, request):
        from ..engine.usxf.reader import (
            check_signature,
            decode_manifest,
            parse_header,
            parse_manifest,
        )
        from ..engine.usxf.spec import HEADER_SIZE

        lim, kid = self.limits, request.scope["permeant_key"]
        body = await read_json(request, open_body_limit(lim), lim.body_timeout_s)
        if body.get("protocol") != PROTOCOL:
            return err(400, "protocol", f"expected {PROTOCOL!r}")
        mode = body.get("mode", "kv")
        if mode not in MODES:
            return err(400, "bad-mode", f"mode must be one of {MODES}")
        name = body.get("name")
        if name is not None and not is_agent_name(name):
            return err(400, "bad-name", f"an agent name is {AGENT_NAME_RULE}")
        head = unb64(body.get("head"), lim.max_head_bytes)
        if head is None or len(head) < HEADER_SIZE:
            return err(400, "bad-head", "head must be base64 of the USXF file's first "
                                        f"payload_offset bytes, at most {lim.max_head_bytes}")
        try:
            header = parse_header(head[:HEADER_SIZE])
            if header.payload_offset != len(head):
                raise UsxfInvalid("bounds", f"head of {len(head)} bytes, the header's payload "
                                            f"offset is {header.payload_offset}")
            pad = head[HEADER_SIZE + header.prefix_len:]
            if pad.count(0) != len(pad):
                raise UsxfInvalid("padding", "non-zero bytes between the signature and the payload")
            manifest = head[HEADER_SIZE:HEADER_SIZE + header.manifest_len]
            sig_block = head[HEADER_SIZE + header.manifest_len:HEADER_SIZE + header.prefix_len]
            signer, _, _ = check_signature(header, manifest, sig_block, self.target.trusted_raw())
            identity = self.target.model.identity
            parsed = await asyncio.to_thread(
                lambda: parse_manifest(decode_manifest(manifest), header, signer,
                                       expected_identity=identity))
        except UsxfInvalid as exc:
            status = {"untrusted-key": 403, "model-identity": 409}.get(exc.check, 422)
            say(f"refused a migration from key {kid}: {exc.check}: {exc.detail}")
            return err(status, exc.check, exc.detail)
        if mode == "kv" and header.chunk_size > lim.max_chunk_bytes:
            return err(413, "chunk-size", f"chunks of {header.chunk_size} bytes; this target "
                                          f"takes at most {lim.max_chunk_bytes}")
        n_tokens = len(parsed.token_ids)
        context_limit = self.target.model.context_limit
        fid = parsed.fidelity
        need_ctx = n_tokens + (len(fid.probe_prompt_ids) + fid.n if fid else 0)
        if need_ctx > context_limit:
            return err(409, "context", f"{n_tokens} tokens (+ probe) do not fit this target's "
                                       f"context limit of {context_limit}")
        async with self.open_lock:
            return await self._open_checked(kid, mode, name, head, header, parsed)

    def _resumable(self, kid: str, mode: str, name: str | None, parsed) -> Staged | None:
        """The same signed state from the same key, still receiving (a source that restarted)."""
        for m in self.target.active():
            if (m.key_id == kid and m.digest == parsed.digest.hex() and m.mode == mode
                    and m.state == "receiving" and (name is None or name == m.name)):
                return m
        return None

    def _room(self, mode: str, size: int, n_tokens: int, parsed):
        """None, or the refusal when the target lacks the staged slot, disk or memory."""
        import psutil

        lim, active = self.limits, self.target.active()
        if len(active) >= lim.max_migrations:
            return err(429, "busy", f"{lim.max_migrations} migrations are staged already; "
                                    "retry later", retry_after=5)
        staged = sum(m.size for m in active)
        if mode == "kv" and staged + size > lim.max_staged_bytes:
            return err(507, "no-room", f"{(staged + size) >> 20} MiB staged would exceed the "
                                       f"target's {lim.max_staged_bytes >> 20} MiB")
        disk = shutil.disk_usage(self.target.staging)
        pending = sum(m.size for m in active if m.mode == "kv")  # their import copies
        need_disk = (2 * size if mode == "kv" else 0) + pending + lim.disk_reserve_bytes
        if disk.free < need_disk:
            return err(507, "no-room", f"the target's disk has {disk.free >> 20} MiB free, this "
                                       f"needs {need_disk >> 20} MiB")
        kv_bytes = n_tokens * kv_bytes_per_token(parsed.identity.to_dict(),
                                                 dtype_size(self.target.model.identity.kv_dtype))
        avail = psutil.virtual_memory().available
        if avail < 2 * kv_bytes + lim.memory_reserve_bytes:
            return err(507, "no-room", f"the target has {avail >> 20} MiB of memory available, "
                                       f"attaching needs about {(2 * kv_bytes) >> 20} MiB")
        return None

    async def _open_checked(self, kid, mode, name, head, header, parsed):
        m = self._resumable(kid, mode, name, parsed)
        if m is not None:
            m.touch()
            say(f"migration {m.id}: resumed by key {kid}")
            return self.reply(m, resumed=True)
        n_tokens = len(parsed.token_ids)
        size = header.total_size if mode == "kv" else header.payload_offset
        refusal = self._room(mode, size, n_tokens, parsed)
        if refusal is not None:
            return refusal
        chosen, why = self.target.free_name(name, parsed.agent.agent_id)
        if chosen is None:
            return err(409, "name-taken", why + "; choose another with --as NAME")
        try:
            turns = await asyncio.wrap_future(self.engine.call(lambda ctx: check_record(ctx, parsed)))
        except UsxfInvalid as exc:
            return err(422, exc.check, exc.detail)
        except Exception as exc:  # noqa: BLE001 - a record the chat template cannot render
            return err(422, "agent", f"the agent record is unusable here ({type(exc).__name__})")
        mid = secrets.token_hex(16)
        n_chunks = header.n_chunks if mode == "kv" else 0
        m = Staged(mid, kid, mode, chosen, self.target.staging / mid, header, parsed, turns,
                   n_chunks, present=bytearray(n_chunks))
        try:
            await asyncio.to_thread(staging.create_files, m, head)
        except OSError as exc:
            staging.drop_files(m)
            return err(507, "no-room", f"cannot stage: {exc.strerror or exc}")
        self.target.migrations[mid] = m
        say(f"migration {mid}: opened by key {kid}: agent {parsed.agent.agent_id!r} as "
            f"{chosen!r}, {n_tokens} tokens, {size / 1e6:.1f} MB, {n_chunks} chunks, "
            f"quant {parsed.quant}, mode {mode}")
        return self.reply(m, 201, resumed=False)

    # ---- GET /migrations/{id} ----
    async def status(self, request):
        m = self.lookup(request)
        if m is None:
            return err(404, "not-found")
        return self.reply(m)

    # ---- PUT /migrations/{id}/chunks/{n} ----
    async def put_chunk(self, request):
        from starlette.responses import JSONResponse

        m = self.lookup(request)
        if m is None:
            return err(404, "not-found")
        n = request.path_params["n"]
        if not 0 <= n < m.n_chunks:
            return err(404, "no-such-chunk", f"chunks are 0..{m.n_chunks - 1}")
        if m.state != "receiving":
            return err(409, "state", f"the migration is {m.state}")
        a, b = m.chunk_range(n)
        data = await read_body(request, self.limits.max_chunk_bytes, self.limits.body_timeout_s,
                               exact=b - a)
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).digest())
        if not body_digest_ok(request, digest):
            return err(400, "body-digest", "the body does not hash to the signed digest")
        if digest != m.parsed.chunk_digests[n]:
            say(f"migration {m.id}: chunk {n} refused: checksum differs from the signed manifest")
            return err(422, "chunk-checksum", f"chunk {n} does not match the manifest's SHA-256",
                       chunk=n)
        m.touch()

        def progress(duplicate: bool):
            return JSONResponse({"chunk": n, "duplicate": duplicate, "received": sum(m.present),
                                 "n_chunks": m.n_chunks})

        if m.present[n]:
            return progress(True)
        try:
            await asyncio.to_thread(staging.write_chunk, m, n, data)
        except OSError:
            return err(409, "state", "the migration is gone")
        if m.state != "receiving" or self.target.migrations.get(m.id) is not m:
            return err(409, "state", f"the migration is {m.state}")
        if not m.present[n]:
            m.present[n] = 1
            m.received_bytes += len(data)
        m.touch()
        return progress(False)

    # ---- POST /migrations/{id}/prepare ----
    async def prepare(self, request):
        m = self.lookup(request)
        if m is None:
            return err(404, "not-found")
        async with m.lock:
            if m.state == "prepared":
                return self.reply(m)
            if m.state != "receiving":
                return err(409, "state", f"the migration is {m.state}")
            if not all(m.present):
                return err(409, "incomplete", "chunks are missing",
                           missing=to_ranges([not p for p in m.present]))
            m.state = "verifying"
            t0 = time.perf_counter()
            if m.mode == "kv":
                try:
                    await asyncio.to_thread(verify_staged, m, self.target.trusted_raw(),
                                            self.target.model.identity)
                except Exception as exc:  # noqa: BLE001 - UsxfInvalid, or the disk
                    check = exc.check if isinstance(exc, UsxfInvalid) else "io"
                    detail = exc.detail if isinstance(exc, UsxfInvalid) else type(exc).__name__
                    m.state, m.error = "failed", f"{check}: {detail}"
                    staging.drop_files(m)
                    say(f"migration {m.id}: verify failed: {m.error}")
                    return err(422, check, detail)
            m.state = "prepared"
            m.touch()
            ms = (time.perf_counter() - t0) * 1000
            say(f"migration {m.id}: prepared (verified in {ms:.0f} ms), staged as {m.name!r}")
            return self.reply(m, verify_ms=ms)

    # ---- POST /migrations/{id}/commit ----
    async def commit(self, request):
        m = self.lookup(request)
        if m is None:
            return err(404, "not-found")
        async with m.lock:
            if m.state == "committed":
                return self.reply(m, repeated=True)
            if m.state != "prepared":
                return err(409, "state", f"the migration is {m.state}")
            if m.name.casefold() in {n.casefold() for n in self.target.agent_names()}:
                return err(409, "name-taken", f"an agent named {m.name!r} appeared on the target")
            m.state = "committing"
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(staging.write_journal, m)
                result = await asyncio.to_thread(commit_staged, self.engine, m)
            except Exception as exc:  # noqa: BLE001 - nothing was registered: report, clean up
                m.state, m.error = "failed", f"{type(exc).__name__}: {exc}"
                staging.drop_files(m)
                say(f"migration {m.id}: commit failed: {m.error}")
                if isinstance(exc, UsxfInvalid):
                    return err(422, exc.check, exc.detail)
                if isinstance(exc, PermeantError):
                    return err(409, "refused", str(exc))
                return err(500, "internal", "the commit failed; nothing was attached")
            result["commit_ms"] = (time.perf_counter() - t0) * 1000
            m.state, m.result = "committed", result
            m.touch()
            staging.drop_files(m)  # the workspace holds its own copy now
            say(f"migration {m.id}: committed as {m.name!r}; fidelity: {result.get('fidelity')}")
            return self.reply(m)

    # ---- DELETE /migrations/{id} ----
    async def abort(self, request):
        from starlette.responses import JSONResponse

        m = self.lookup(request)
        if m is None:
            return err(404, "not-found")
        async with m.lock:
            if m.state == "committed":
                return err(409, "state", "committed already: delete the agent on the target instead")
            staging.drop_files(m)
            m.state = "aborted"
            self.target.migrations.pop(m.id, None)
        say(f"migration {m.id}: aborted by the source; staged data removed")
        return JSONResponse({"id": m.id, "state": "aborted"})
