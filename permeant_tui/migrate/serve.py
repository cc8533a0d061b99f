"""`permeant serve`: start the migration target. One workspace, one model (an Engine), a
Starlette app (routes.py) on uvicorn with httptools and bounded request heads (guard.py), over
TLS with a self-signed certificate the sources pin (tls.py)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .protocol import Limits, MigrationError, parse_hostport
from .target import say


@dataclass(frozen=True)
class ServeOptions:
    workspace: str | None
    model: str | None
    listen: str = "127.0.0.1:8765"
    tls_cert: str | None = None
    tls_key: str | None = None
    fingerprint_only: bool = False
    limits: Limits = field(default_factory=Limits)


def measure_speed(engine) -> dict:
    """Figures for the sources' cost model: prefill and decode tok/s (on the worker), and the
    SHA-256 rate of verification."""
    from ..engine.speed import quick_speed

    pf, dec = engine.call(lambda ctx: quick_speed(ctx.model, 256, 4)).result()
    data = os.urandom(16 << 20)
    t = time.perf_counter()
    hashlib.sha256(data).digest()
    sha = len(data) / 1e6 / (time.perf_counter() - t)
    return {"prefill_tok_s": round(pf, 1), "decode_tok_s": round(dec, 1),
            "verify_mb_s": round(sha * min(2, os.cpu_count() or 1), 1)}


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MigrationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def serve(opts: ServeOptions) -> int:
    import uvicorn

    from ..engine.lock import WorkspaceLock
    from ..engine.usxf.keys import WorkspaceKeys
    from ..engine.worker import Engine
    from ..paths import resolve_workspace
    from .guard import bounded_protocol
    from .routes import TargetRoutes
    from .staging import recover_staging
    from .target import Target
    from .testing import model_override_for_tests
    from .tls import ensure_server_cert, load_server_cert

    folder = Path(resolve_workspace(opts.workspace))
    host, port = parse_hostport(opts.listen)
    limits = opts.limits
    if limits.ttl_s <= 0 or limits.max_migrations < 1:
        raise MigrationError("--staging-ttl must be > 0 and --max-migrations >= 1")
    if bool(opts.tls_cert) != bool(opts.tls_key):
        raise MigrationError("--tls-cert and --tls-key go together")
    # The workspace's one writer from here on (engine/lock.py): before the certificate and
    # staging are touched; the engine holds it until shutdown.
    wlock = WorkspaceLock(folder, "permeant serve").acquire()
    try:
        if opts.tls_cert:
            cert = load_server_cert(opts.tls_cert, opts.tls_key)
        else:
            cert = ensure_server_cert(folder / "migrate" / "tls")
        if opts.fingerprint_only:
            print(cert.display)
            wlock.release()
            return 0
        for note in recover_staging(folder):
            say(note)
        engine = Engine(folder, opts.model, eager_restore=False,
                        loaded=model_override_for_tests(), workspace_lock=wlock)
    except BaseException:
        wlock.release()
        raise
    keys = WorkspaceKeys(folder / "keys").ensure()
    print(f"permeant serve: workspace {folder}", flush=True)
    print(f"  TLS certificate {'created: ' if cert.created else ''}{cert.cert_path}", flush=True)
    print(f"  fingerprint {cert.display}", flush=True)
    print(f"  sources pin it with: permeant migrate AGENT --to HOST:PORT --pin {cert.fingerprint}",
          flush=True)
    others = [k for k in keys.trusted() if k != keys.key_id]
    print(f"  accepts migrations signed by {len(others)} trusted key(s) besides its own "
          f"({keys.key_id}); add one with `permeant keys trust PUBKEY`", flush=True)
    sock = _listen(host, port)
    port = sock.getsockname()[1]
    engine.start()
    try:
        engine.wait_ready(600)
        speed = measure_speed(engine)
        info = engine.model_info()
        print(f"  model {info.identity.name} ({info.identity.fingerprint[:16]}), context "
              f"{info.context_limit}, prefill {speed['prefill_tok_s']:.0f} tok/s, verify "
              f"{speed['verify_mb_s']:.0f} MB/s", flush=True)
        app = TargetRoutes(Target(engine, cert, limits, speed)).app()
        config = uvicorn.Config(
            app, ssl_certfile=str(cert.cert_path), ssl_keyfile=str(cert.key_path),
            http=bounded_protocol(limits), log_level="warning", access_log=False,
            lifespan="on", server_header=False, limit_concurrency=256, timeout_keep_alive=30,
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
        engine.shutdown()
        print("permeant serve: stopped", file=sys.stderr, flush=True)
    return 0
