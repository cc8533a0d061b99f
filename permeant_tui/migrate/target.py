"""The migration target's state: the engine, the workspace keys, the TLS certificate, the staged
migrations and the nonce cache, with request authentication and the capabilities report.

The HTTP side is routes.py (the handlers) and guard.py (bounds and authentication before any
handler); serve.py starts it all. Stages (docs/MIGRATION.md): GET /capabilities; POST
/migrations (the signed USXF head: signature, model identity and room are checked, an id is
answered); PUT /migrations/{id}/chunks/{n} (each chunk checked against its signed SHA-256 as it
arrives; a retry is idempotent); GET /migrations/{id} (which chunks are present: an interrupted
transfer resumes from the first missing one); POST .../prepare (verify the whole staged file);
POST .../commit (import into the workspace, atomically, then replay the fidelity probe);
DELETE /migrations/{id} (abort: the staged data is removed).
"""

from __future__ import annotations

import re
import shutil
import time

from ..engine.names import is_agent_name
from ..engine.text import printable
from .protocol import (
    AUTH_HEADERS,
    DIGEST_RE,
    KEY_ID_RE,
    MIGRATION_ID_RE,
    MODES,
    NONCE_RE,
    PROTOCOL,
    Limits,
    signing_message,
    unb64,
)
from .staging import ACTIVE, Staged, drop_files, staging_root

TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")  # ASCII digits only: str.isdigit() takes "²"


def say(msg: str) -> None:
    """The target's log line on stdout; request-controlled text is escaped (engine/text.py)."""
    print(f"[serve {time.strftime('%H:%M:%S')}] {printable(msg)}", flush=True)


class Target:
    """Everything the request handlers share. Handlers run on the event loop; file work and
    hashing go to threads; MLX work goes to the engine worker (`engine.call`)."""

    def __init__(self, engine, cert, limits: Limits, speed: dict | None = None):
        from ..engine.usxf.keys import WorkspaceKeys

        self.engine = engine
        self.model = engine.model_info()  # the engine is ready: its model is loaded
        self.keys = WorkspaceKeys(engine.folder / "keys").ensure()
        self.cert = cert
        self.limits = limits
        self.speed = speed or {}
        self.staging = staging_root(engine.folder)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.migrations: dict[str, Staged] = {}
        self.nonces: dict[str, float] = {}
        self._trusted: tuple[float, dict[str, bytes]] = (0.0, {})

    # ---- authentication ----
    def trusted_raw(self) -> dict[str, bytes]:
        """Re-read at most every 2 s, so `permeant keys trust` applies without a restart."""
        at, keys = self._trusted
        if time.monotonic() - at > 2.0:
            from ..engine.usxf.keys import trusted_raw_keys

            keys = trusted_raw_keys(self.keys) or {}
            self._trusted = (time.monotonic(), keys)
        return keys

    def authenticate(self, scope: dict, headers: dict[str, str]) -> tuple[str | None, str]:
        """(key id, "") or (None, why) — the why is logged, never sent."""
        from ..engine.usxf.keys import verify_ed25519

        vals = [headers.get(h) for h in AUTH_HEADERS]
        if any(v is None for v in vals):
            return None, "missing authentication headers"
        kid, ts, nonce, digest, sig_text = vals
        if not (KEY_ID_RE.fullmatch(kid) and NONCE_RE.fullmatch(nonce)
                and DIGEST_RE.fullmatch(digest) and TIMESTAMP_RE.fullmatch(ts)):
            return None, "malformed authentication headers"
        raw = self.trusted_raw().get(kid)
        if raw is None:
            return None, f"key {kid} is not trusted"
        sig = unb64(sig_text, 64)
        if sig is None or len(sig) != 64:
            return None, "malformed signature"
        path = (scope.get("raw_path") or scope.get("path", "").encode()).decode("latin-1")
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

    def agent_names(self) -> set[str]:
        return {a.agent_id for a in self.engine.agents()}

    def expire(self) -> list[str]:
        now, gone = time.monotonic(), []
        for m in list(self.migrations.values()):
            if m.state in ("verifying", "committing"):
                continue  # never under a running operation
            if now - m.touched > self.limits.ttl_s:
                drop_files(m)
                del self.migrations[m.id]
                gone.append(f"migration {m.id}: " + (
                    "record of the commit forgotten" if m.state == "committed" else
                    f"{m.state}, idle for {self.limits.ttl_s:g} s: expired, staged data removed"))
        self.purge_nonces()
        return gone

    def free_name(self, wanted: str | None, fallback: str) -> tuple[str | None, str]:
        # casefolded, as the workspace compares names (macOS disks are case-insensitive)
        taken = {n.casefold() for n in self.agent_names() | {m.name for m in self.active()}}
        if wanted is not None:
            return (wanted, "") if wanted.casefold() not in taken else (
                None, f"an agent named {wanted!r} exists on the target")
        base = fallback if is_agent_name(fallback) else "agent"
        for i in range(1, 1000):
            cand = base if i == 1 else f"{base[:58]}-{i}"
            if cand.casefold() not in taken:
                return cand, ""
        return None, "no free agent name"

    def capabilities(self) -> dict:
        import mlx.core as mx
        import psutil

        from ..engine import runtime
        from ..engine.usxf import QUANTS

        lm = self.model
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
