"""Workspace signing keys: creation, file modes, the shareable text form, trust round trips."""

from __future__ import annotations

import base64
import os
import stat

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from permeant_tui.engine.errors import UsxfInvalid
from permeant_tui.engine.usxf.keys import (
    WorkspaceKeys,
    key_id_of,
    parse_public_key,
    trusted_raw_keys,
)


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_ensure_creates_a_private_key_readable_only_by_its_owner(tmp_path):
    old = os.umask(0o022)
    try:
        k = WorkspaceKeys(tmp_path / "ws").ensure()
    finally:
        os.umask(old)
    assert mode(k.private_path) == 0o600
    assert k.private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert k.public_path.read_text().strip() == k.public_key_text
    assert len(k.public_key_bytes) == 32 and len(k.key_id) == 16
    assert k.key_id == key_id_of(k.public_key_bytes)
    assert [p.name for p in k.folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")] == []


def test_the_key_pair_is_stable_across_instances(tmp_path):
    a = WorkspaceKeys(tmp_path).ensure()
    b = WorkspaceKeys(tmp_path).ensure()
    assert a.key_id == b.key_id and a.public_key_bytes == b.public_key_bytes
    assert a.key_id != WorkspaceKeys(tmp_path / "other").key_id


def test_a_loose_private_key_is_tightened_to_0600(tmp_path):
    k = WorkspaceKeys(tmp_path).ensure()
    os.chmod(k.private_path, 0o644)
    again = WorkspaceKeys(tmp_path)
    assert again.key_id == k.key_id
    assert mode(k.private_path) == 0o600


def test_public_key_text_is_one_shareable_line(tmp_path):
    k = WorkspaceKeys(tmp_path)
    text = k.public_key_text
    assert text.startswith("ed25519:") and "\n" not in text
    assert base64.b64decode(text.removeprefix("ed25519:")) == k.public_key_bytes
    assert parse_public_key(text + "  alice@laptop\n") == k.public_key_bytes


def test_signatures_verify_with_the_public_key(tmp_path):
    k = WorkspaceKeys(tmp_path)
    sig = k.sign(b"message")
    Ed25519PublicKey.from_public_bytes(k.public_key_bytes).verify(sig, b"message")
    with pytest.raises(InvalidSignature):
        k.public_key.verify(sig, b"other message")


def test_trust_round_trip(tmp_path):
    alice = WorkspaceKeys(tmp_path / "alice").ensure()
    bob = WorkspaceKeys(tmp_path / "bob").ensure()
    assert set(bob.trusted()) == {bob.key_id}  # the own key is always trusted
    assert not bob.is_trusted(alice.key_id)
    kid = bob.trust(alice.public_key_text, label="alice")
    assert kid == alice.key_id and bob.is_trusted(kid)
    trusted = bob.trusted()
    assert set(trusted) == {alice.key_id, bob.key_id}
    assert isinstance(trusted[kid], Ed25519PublicKey)
    assert trusted_raw_keys(bob)[kid] == alice.public_key_bytes
    assert bob.trusted_texts()[kid] == alice.public_key_text
    # survives a new instance (it is on disk), and can be forgotten
    assert WorkspaceKeys(tmp_path / "bob").is_trusted(kid)
    assert bob.trust(alice.public_key_text) == kid  # idempotent
    assert bob.untrust(kid) and not bob.is_trusted(kid)
    assert not bob.untrust(kid) and not bob.untrust("../../etc") and not bob.untrust(bob.key_id)
    assert bob.is_trusted(bob.key_id)


def test_reading_trust_does_not_create_a_key_pair(tmp_path):
    k = WorkspaceKeys(tmp_path / "fresh")
    assert k.trusted() == {} and not k.private_path.exists()


def test_bad_public_key_texts_are_refused(tmp_path):
    k = WorkspaceKeys(tmp_path)
    for bad in ("", "ssh-ed25519 AAAA", "ed25519:not base64!", "ed25519:" + base64.b64encode(b"x" * 31).decode()):
        with pytest.raises(UsxfInvalid) as ei:
            k.trust(bad)
        assert ei.value.check == "public-key"


def test_a_damaged_trusted_entry_trusts_nothing(tmp_path):
    k = WorkspaceKeys(tmp_path).ensure()
    k.trusted_dir.mkdir(parents=True, exist_ok=True)
    (k.trusted_dir / "0123456789abcdef.pub").write_text("garbage")
    (k.trusted_dir / "fedcba9876543210.pub").write_bytes(b"\xff\xfe")
    assert set(k.trusted()) == {k.key_id}


def test_a_corrupt_private_key_is_a_clear_error(tmp_path):
    k = WorkspaceKeys(tmp_path).ensure()
    k.private_path.write_bytes(b"not a key")
    with pytest.raises(UsxfInvalid) as ei:
        WorkspaceKeys(tmp_path).ensure()
    assert ei.value.check == "private-key" and str(k.private_path) in str(ei.value)


def test_trusted_keys_argument_forms(tmp_path):
    k = WorkspaceKeys(tmp_path)
    forms = [[k.public_key], [k.public_key_bytes], [k.public_key_text], {k.key_id: k.public_key}]
    for form in forms:
        assert trusted_raw_keys(form) == {k.key_id: k.public_key_bytes}
    assert trusted_raw_keys(None) is None
    with pytest.raises(TypeError):
        trusted_raw_keys([42])
