"""The workspace's Ed25519 signing key pair and the public keys it trusts (docs/USXF.md 10).

folder/usxf_ed25519        private key, PKCS#8 PEM, mode 0600
folder/usxf_ed25519.pub    "ed25519:<base64 raw key>", the line to share
folder/trusted/<id>.pub    one trusted key per file, same text form
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..atomic import create_private, write_atomic
from ..errors import UsxfInvalid

PRIVATE_NAME = "usxf_ed25519"
PUBLIC_NAME = "usxf_ed25519.pub"
TRUSTED_DIR = "trusted"
TEXT_PREFIX = "ed25519:"


class UsxfKeyError(UsxfInvalid):
    """A key file or a shared public-key text is unusable."""


def key_id_of(public_key_bytes: bytes) -> str:
    """16 hex characters: the first 8 bytes of SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(public_key_bytes).digest()[:8].hex()


def public_key_text(public_key_bytes: bytes) -> str:
    return TEXT_PREFIX + base64.b64encode(public_key_bytes).decode("ascii")


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def parse_public_key(text: str) -> bytes:
    """Raw 32 bytes from "ed25519:<base64>" (a trailing comment after a space is allowed)."""
    parts = text.strip().split()
    if not parts or not parts[0].startswith(TEXT_PREFIX):
        raise UsxfKeyError("public-key", f"expected '{TEXT_PREFIX}<base64>', got {text[:40]!r}")
    try:
        raw = base64.b64decode(parts[0][len(TEXT_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise UsxfKeyError("public-key", "the key is not valid base64") from None
    if len(raw) != 32:
        raise UsxfKeyError("public-key", f"an Ed25519 public key is 32 bytes, this one is {len(raw)}")
    return raw


def verify_ed25519(public_key_bytes: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key_bytes).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _write_private(path: Path, data: bytes) -> None:
    create_private(path, data)


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


class WorkspaceKeys:
    """One Ed25519 key pair per workspace, plus the folder of public keys it trusts.

    The key pair is created on first use (`ensure()`, or any property that needs it)."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self._private: Ed25519PrivateKey | None = None

    @property
    def private_path(self) -> Path:
        return self.folder / PRIVATE_NAME

    @property
    def public_path(self) -> Path:
        return self.folder / PUBLIC_NAME

    @property
    def trusted_dir(self) -> Path:
        return self.folder / TRUSTED_DIR

    def ensure(self) -> WorkspaceKeys:
        """Load the key pair, creating it (private key mode 0600) when absent."""
        if self._private is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.private_path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            try:
                _write_private(self.private_path, pem)
            except FileExistsError:
                pass  # created concurrently: load theirs below
        self._private = self._load_private()
        pub = raw_public_key(self._private.public_key())
        if not self.public_path.exists() or self.public_path.read_text().strip() != public_key_text(pub):
            _write_text(self.public_path, public_key_text(pub) + "\n")
        return self

    def _load_private(self) -> Ed25519PrivateKey:
        p = self.private_path
        try:
            mode = stat.S_IMODE(p.stat().st_mode)
            if mode & 0o077:
                os.chmod(p, 0o600)  # a private key readable by others is tightened, not tolerated
            key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise UsxfKeyError("private-key", f"cannot load {p}: {e}", str(p)) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise UsxfKeyError("private-key", f"{p} is not an Ed25519 private key", str(p))
        return key

    @property
    def public_key_bytes(self) -> bytes:
        self.ensure()
        assert self._private is not None
        return raw_public_key(self._private.public_key())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.public_key_bytes)

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key_bytes)

    @property
    def public_key_text(self) -> str:
        return public_key_text(self.public_key_bytes)

    def sign(self, data: bytes) -> bytes:
        self.ensure()
        assert self._private is not None
        return self._private.sign(data)

    def trust(self, text: str, label: str = "") -> str:
        """Trust a public key given in its shared text form; returns its key id."""
        raw = parse_public_key(text)
        kid = key_id_of(raw)
        self.trusted_dir.mkdir(parents=True, exist_ok=True)
        line = public_key_text(raw) + (f" {label.strip()}" if label.strip() else "")
        _write_text(self.trusted_dir / f"{kid}.pub", line + "\n")
        return kid

    def untrust(self, key_id: str) -> bool:
        """Forget a trusted key; the workspace's own key cannot be untrusted."""
        if not re.fullmatch(r"[0-9a-f]{16}", key_id):
            return False
        p = self.trusted_dir / f"{key_id}.pub"
        if not p.exists():
            return False
        p.unlink()
        return True

    def _trusted_raw(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        if self.trusted_dir.is_dir():
            for p in sorted(self.trusted_dir.glob("*.pub")):
                try:
                    raw = parse_public_key(p.read_text())
                except (OSError, UnicodeDecodeError, UsxfKeyError):
                    continue  # a damaged entry trusts nothing
                out[key_id_of(raw)] = raw
        if self._private is not None or self.private_path.exists():
            own = self.public_key_bytes
            out[key_id_of(own)] = own
        return out

    def trusted(self) -> dict[str, Ed25519PublicKey]:
        """key id -> public key, the workspace's own key included (when it exists)."""
        return {k: Ed25519PublicKey.from_public_bytes(v) for k, v in self._trusted_raw().items()}

    def trusted_texts(self) -> dict[str, str]:
        """key id -> shareable text, for listing."""
        return {k: public_key_text(v) for k, v in self._trusted_raw().items()}

    def is_trusted(self, key_id: str) -> bool:
        return key_id in self._trusted_raw()


TrustedKeys = (WorkspaceKeys | Mapping[str, Ed25519PublicKey | bytes | str]
               | Iterable[Ed25519PublicKey | bytes | str] | None)


def trusted_raw_keys(trusted: TrustedKeys) -> dict[str, bytes] | None:
    """Normalise the `trusted` argument of the readers to key id -> raw 32 bytes (None = no
    trust decision). Accepts WorkspaceKeys, a mapping or an iterable of Ed25519PublicKey, raw
    bytes or "ed25519:..." texts."""
    if trusted is None:
        return None
    if isinstance(trusted, WorkspaceKeys):
        return trusted._trusted_raw()
    items = trusted.values() if isinstance(trusted, Mapping) else trusted
    out: dict[str, bytes] = {}
    for k in items:
        if isinstance(k, Ed25519PublicKey):
            raw = raw_public_key(k)
        elif isinstance(k, (bytes, bytearray)) and len(k) == 32:
            raw = bytes(k)
        elif isinstance(k, str):
            raw = parse_public_key(k)
        else:
            raise TypeError(f"a trusted key must be Ed25519PublicKey, 32 raw bytes or text, got {type(k)}")
        out[key_id_of(raw)] = raw
    return out
