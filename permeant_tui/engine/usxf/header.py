"""USXF header and signature block: parsed and checked before anything else is trusted
(docs/USXF.md 1.1-1.3). Every declared length is checked against its limit before use, and the
manifest's signature is verified before the manifest is decoded."""

from __future__ import annotations

from dataclasses import dataclass, field

import xxhash

from ..errors import UsxfInvalid
from .keys import key_id_of, public_key_text, verify_ed25519
from .spec import (
    CHECK_BOUNDS,
    CHECK_HEADER,
    CHECK_MAGIC,
    CHECK_MANIFEST,
    CHECK_SIGNATURE,
    CHECK_TRAILING,
    CHECK_TRUNCATED,
    CHECK_VERSION,
    ED25519_PUBLIC_LEN,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_MANIFEST,
    MAX_PAYLOAD,
    MIN_CHUNK_SIZE,
    SIG_ALG_ED25519,
    SIG_LEN_ED25519,
    SIGNATURE_DOMAIN,
    VERSION_MAJOR,
    UsxfUntrustedKey,
    payload_offset_for,
)


@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    sig_alg: int
    flags: int
    manifest_len: int
    sig_len: int
    chunk_size: int
    payload_offset: int
    payload_len: int
    manifest_xxh3: int
    header_xxh3: int
    raw: bytes = field(repr=False)

    @property
    def prefix_len(self) -> int:
        """Bytes from the end of the header to the end of the signature block."""
        return self.manifest_len + self.sig_len

    @property
    def total_size(self) -> int:
        return self.payload_offset + self.payload_len

    @property
    def n_chunks(self) -> int:
        return -(-self.payload_len // self.chunk_size)




def check_magic(raw: bytes, path: str | None = None) -> None:
    """The bytes seen so far (possibly fewer than 8) must begin like the magic."""
    n = min(len(raw), len(MAGIC))
    if raw[:n] != MAGIC[:n]:
        raise UsxfInvalid(CHECK_MAGIC, "not a USXF file (magic bytes differ)", path)


def parse_header(raw: bytes, path: str | None = None) -> Header:
    """Magic, version, header checksum, then every declared length against its limit."""
    check_magic(raw, path)
    if len(raw) < HEADER_SIZE:
        raise UsxfInvalid(CHECK_TRUNCATED, f"{len(raw)} bytes, shorter than the {HEADER_SIZE}-byte header", path)
    raw = bytes(raw[:HEADER_SIZE])
    (_, major, minor, sig_alg, flags, manifest_len, sig_len, chunk_size, payload_offset,
     payload_len, manifest_xxh3, header_xxh3) = HEADER.unpack(raw)
    if major != VERSION_MAJOR:
        raise UsxfInvalid(CHECK_VERSION, f"format version {major}.{minor}; this reader supports "
                                         f"{VERSION_MAJOR}.x", path)
    if xxhash.xxh3_64_intdigest(raw[:56]) != header_xxh3:
        raise UsxfInvalid(CHECK_HEADER, "header checksum mismatch (the header is damaged)", path)
    if sig_alg != SIG_ALG_ED25519:
        raise UsxfInvalid(CHECK_HEADER, f"unknown signature algorithm {sig_alg}", path)
    if flags != 0:
        raise UsxfInvalid(CHECK_HEADER, f"reserved flags {flags:#x} set", path)
    if not 1 <= manifest_len <= MAX_MANIFEST:
        raise UsxfInvalid(CHECK_BOUNDS, f"manifest length {manifest_len} outside 1..{MAX_MANIFEST}", path)
    if sig_len != SIG_LEN_ED25519:
        raise UsxfInvalid(CHECK_BOUNDS, f"signature block of {sig_len} bytes, Ed25519 needs "
                                        f"{SIG_LEN_ED25519}", path)
    if (not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
        raise UsxfInvalid(CHECK_BOUNDS, f"chunk size {chunk_size} is not a power of two in "
                                        f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}", path)
    if payload_offset != payload_offset_for(manifest_len, sig_len):
        raise UsxfInvalid(CHECK_BOUNDS, f"payload offset {payload_offset} is not "
                                        f"{payload_offset_for(manifest_len, sig_len)}", path)
    if payload_len > MAX_PAYLOAD or -(-payload_len // chunk_size) > MAX_CHUNKS:
        raise UsxfInvalid(CHECK_BOUNDS, f"payload length {payload_len} over the limit "
                                        f"({MAX_PAYLOAD} bytes, {MAX_CHUNKS} chunks)", path)
    return Header(major, minor, sig_alg, flags, manifest_len, sig_len, chunk_size, payload_offset,
                  payload_len, manifest_xxh3, header_xxh3, raw)


def check_size(header: Header, size: int, path: str | None = None) -> None:
    if size < header.total_size:
        raise UsxfInvalid(CHECK_TRUNCATED, f"{size} bytes, the header declares {header.total_size}", path)
    if size > header.total_size:
        raise UsxfInvalid(CHECK_TRAILING, f"{size - header.total_size} bytes after the payload's end", path)


def check_signature(header: Header, manifest_bytes: bytes, sig_block: bytes,
                    trusted: dict[str, bytes] | None, path: str | None = None) -> tuple[str, bytes, bool]:
    """(key id, public key, trusted?) or UsxfInvalid; runs before the manifest is decoded."""
    if xxhash.xxh3_64_intdigest(manifest_bytes) != header.manifest_xxh3:
        raise UsxfInvalid(CHECK_MANIFEST, "manifest checksum mismatch (the manifest is damaged)", path)
    pub, sig = bytes(sig_block[:ED25519_PUBLIC_LEN]), bytes(sig_block[ED25519_PUBLIC_LEN:])
    kid = key_id_of(pub)
    message = SIGNATURE_DOMAIN + header.raw + manifest_bytes
    if trusted is not None and kid in trusted:
        if not verify_ed25519(trusted[kid], sig, message):
            raise UsxfInvalid(CHECK_SIGNATURE, f"signature invalid for trusted key {kid}: the file "
                                               f"was altered or not signed by that key", path)
        return kid, trusted[kid], True
    if not verify_ed25519(pub, sig, message):
        raise UsxfInvalid(CHECK_SIGNATURE, f"signature invalid (key {kid}): the file was altered", path)
    if trusted is not None:
        raise UsxfUntrustedKey(kid, public_key_text(pub), path)
    return kid, pub, False
