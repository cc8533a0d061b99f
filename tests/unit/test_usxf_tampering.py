"""USXF verification: tampering, truncation, bounds, magic and version, identity and trust,
streaming. Every change is caught by the check docs/USXF.md 8 names."""

from __future__ import annotations

import hashlib
import random
import struct
import tracemalloc
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import xxhash
from support.usxf_files import (  # noqa: F401 (keys is a fixture)
    AGENT,
    FIDELITY,
    HD,
    HEADS,
    LAYERS,
    N,
    check_of,
    export,
    fix_header,
    keys,
    make_identity,
    make_kv,
    rewrite,
    sections,
    stream,
)

from permeant_tui.engine.errors import UsxfInvalid
from permeant_tui.engine.usxf import (
    AgentRecord,
    StreamVerifier,
    UsxfUntrustedKey,
    WorkspaceKeys,
    read_usxf,
    verify_usxf,
)
from permeant_tui.engine.usxf.spec import (
    HEADER_SIZE,
    MAGIC,
    SIGNATURE_DOMAIN,
    payload_offset_for,
)

# ---------------------------------------------------------------- tampering


@pytest.fixture
def valid(tmp_path, keys):
    info = export(tmp_path, keys, "none", kv=make_kv(n=40, hd=64), identity=make_identity(head_dim=64),
                  tokens=list(range(40)), agent=AgentRecord("a", "r", "t", "s", []), chunk_size=4096)
    return info.path, info.path.read_bytes()


def flipped(data: bytes, pos: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def test_every_header_bit_flip_is_caught(tmp_path, keys, valid):
    path, data = valid
    bad = tmp_path / "bad.usxf"
    for pos in range(HEADER_SIZE):
        for bit in range(8):
            check = check_of(read_usxf, rewrite(bad, flipped(data, pos, bit)), trusted=keys)
            if pos < 8:
                assert check == "magic"
            elif pos < 10:
                assert check == "version"
            else:
                assert check == "header"


@pytest.mark.parametrize("section,expected", [("manifest", "manifest"), ("signature", "signature"),
                                              ("padding", "padding"), ("payload", "chunk-checksum")])
def test_bit_flips_in_each_section_are_caught(tmp_path, keys, valid, section, expected):
    path, data = valid
    a, b = sections(data)[section]
    rng = random.Random(section)
    bad = tmp_path / "bad.usxf"
    for pos in sorted({a, b - 1, *(rng.randrange(a, b) for _ in range(40))}):
        flip = flipped(data, pos, rng.randrange(8))
        assert check_of(lambda f=flip: read_usxf(rewrite(bad, f), trusted=keys)) == expected
        assert check_of(lambda: verify_usxf(bad, keys)) == expected
        assert check_of(stream, flip, keys) == expected


def test_chunk_error_names_the_chunk(tmp_path, keys, valid):
    _, data = valid
    po = sections(data)["payload"][0]
    bad = rewrite(tmp_path / "bad.usxf", flipped(data, po + 3 * 4096 + 17))
    with pytest.raises(UsxfInvalid) as ei:
        read_usxf(bad, trusted=keys)
    assert ei.value.check == "chunk-checksum" and "chunk 3 " in ei.value.detail
    assert str(bad) in str(ei.value) and "\n" not in str(ei.value)


def forge(data: bytes, keys: WorkspaceKeys, mutate_manifest=None, payload=None) -> bytes:
    """Re-sign a file after editing its manifest and/or payload (what an attacker holding a
    key can do); offsets and checksums are made consistent so only the semantic checks remain."""
    s = sections(data)
    m = msgpack.unpackb(data[s["manifest"][0]:s["manifest"][1]], raw=False)
    if mutate_manifest:
        mutate_manifest(m)
    payload = data[s["payload"][0]:s["payload"][1]] if payload is None else payload
    for _ in range(4):
        mb = msgpack.packb(m, use_bin_type=True)
        po = payload_offset_for(len(mb), 96)
        if not isinstance(m.get("payload"), dict) or m["payload"].get("offset") == po:
            break
        m["payload"]["offset"] = po
    head = fix_header(data[:HEADER_SIZE], manifest_len=len(mb), payload_offset=po,
                      payload_len=len(payload), manifest_xxh3=xxhash.xxh3_64_intdigest(mb))
    sig = keys.sign(SIGNATURE_DOMAIN + head + mb)
    prefix = head + mb + keys.public_key_bytes + sig
    return prefix + bytes(po - len(prefix)) + payload


def test_forge_helper_reproduces_a_valid_file(tmp_path, keys, valid):
    _, data = valid
    assert forge(data, keys) == data


def test_deliberate_edits_with_fixed_checksums_fail_the_signature(tmp_path, keys, valid):
    _, data = valid
    s = sections(data)
    bad = tmp_path / "bad.usxf"
    # a token id changed in the manifest, manifest and header checksums recomputed
    m_bytes = bytearray(data[s["manifest"][0]:s["manifest"][1]])
    m = msgpack.unpackb(bytes(m_bytes), raw=False)
    ids = bytearray(m["sequence"]["token_ids"])
    i = bytes(m_bytes).index(bytes(ids))
    m_bytes[i] ^= 1
    head = fix_header(data[:HEADER_SIZE], manifest_xxh3=xxhash.xxh3_64_intdigest(bytes(m_bytes)))
    edited = head + bytes(m_bytes) + data[s["manifest"][1]:]
    assert check_of(lambda: read_usxf(rewrite(bad, edited), trusted=keys)) == "signature"
    # the payload changed and its chunk digest replaced in the manifest: the signature fails
    po = s["payload"][0]
    payload = bytearray(data[po:])
    payload[5] ^= 0xFF
    m["payload"]["chunks"][0] = hashlib.sha256(bytes(payload[:4096])).digest()
    m_new = msgpack.packb(m, use_bin_type=True)
    assert len(m_new) == len(m_bytes)
    head = fix_header(data[:HEADER_SIZE], manifest_xxh3=xxhash.xxh3_64_intdigest(m_new))
    edited = head + m_new + data[s["manifest"][1]:po] + bytes(payload)
    assert check_of(lambda: read_usxf(rewrite(bad, edited), trusted=keys)) == "signature"


def test_resigned_payload_edit_fails_the_payload_digest(tmp_path, keys, valid):
    """A key holder who edits a chunk and its digest but not the whole-payload digest."""
    _, data = valid
    s = sections(data)
    payload = bytearray(data[s["payload"][0]:])
    payload[5] ^= 0xFF

    def mutate(m):
        m["payload"]["chunks"][0] = hashlib.sha256(bytes(payload[:4096])).digest()

    bad = rewrite(tmp_path / "bad.usxf", forge(data, keys, mutate, bytes(payload)))
    assert check_of(lambda: read_usxf(bad, trusted=keys)) == "payload-digest"


@pytest.mark.parametrize("mutate,check", [
    (lambda m: m["blocks"]["hashes"].__setitem__(1, b"\0" * 16), "block-hash"),
    (lambda m: m["model"].__setitem__("n_layers", 7), "model-identity"),
    (lambda m: m["attention"].__setitem__("n_kv_heads", 9), "layout"),
    (lambda m: m["kv"]["tensors"][2].__setitem__("offset", 64), "layout"),
    (lambda m: m["agent"]["turns"].append({"user": "", "reply": "", "span": [0, 41]}), "agent"),
    (lambda m: m["signature"].__setitem__("key_id", "0" * 16), "signature"),
    (lambda m: m["sequence"].__setitem__("token_ids", struct.pack("<40I", *([2000] * 40))), "tokens"),
    (lambda m: m.pop("provenance"), "manifest"),
    (lambda m: m["provenance"].__setitem__("host", {"nested": 1}), "manifest"),
    (lambda m: m["agent"].__setitem__("turns", [{"user": "u", "reply": 7, "span": [0, 1]}]), "agent"),
    (lambda m: m["agent"].__setitem__("turns", [{"user": "u", "reply": "", "span": [5, 9]},
                                                {"user": "u", "reply": "", "span": [3, 4]}]), "agent"),
    (lambda m: m["fidelity"].__setitem__("expected_ids", [-1]), "fidelity"),
    (lambda m: m["payload"]["chunks"].__setitem__(0, "not bytes"), "manifest"),
    (lambda m: m["payload"].__setitem__("chunk_size", 8192), "bounds"),
    (lambda m: m["kv"].__setitem__("source_dtype", "float64"), "manifest"),
    (lambda m: m["kv"]["tensors"][0].__setitem__("dtype", "float16"), "layout"),
    (lambda m: m["kv"]["tensors"][1].__setitem__("shape", [2, 40, 32]), "layout"),
    (lambda m: m.__setitem__("version", [1, 0]), "manifest"),
    (lambda m: m["kv"]["tensors"][0].__setitem__("start", 1), "layout"),
    (lambda m: m["kv"]["tensors"][3].pop("start"), "layout"),
    (lambda m: m["attention"]["layers"][0].__setitem__("rope_theta", 1.0), "layout"),
    (lambda m: m["attention"]["layers"][2].update(type="sliding", window=4), "layout"),
    (lambda m: m["attention"]["layers"].pop(), "layout"),
    (lambda m: m["quant"].__setitem__("method", "q4"), "manifest"),
])
def test_signed_but_inconsistent_manifests_are_refused(tmp_path, keys, valid, mutate, check):
    _, data = valid
    bad = rewrite(tmp_path / "bad.usxf", forge(data, keys, mutate))
    assert check_of(lambda: read_usxf(bad, trusted=keys)) == check


# ---------------------------------------------------------------- truncation, bounds, magic, version


def test_truncation_at_every_boundary_and_random_points(tmp_path, keys, valid):
    _, data = valid
    s = sections(data)
    cuts = {0, 1, 7, 8, 12, 63, 64, s["manifest"][1], s["signature"][1], s["padding"][1] - 1,
            s["payload"][0] + 4096, s["payload"][0] + 4096 * 2, len(data) - 1}
    cuts |= {s["manifest"][1] - 1, s["manifest"][1] + 1}
    rng = random.Random(1)
    cuts |= {rng.randrange(len(data)) for _ in range(30)}
    bad = tmp_path / "bad.usxf"
    for cut in sorted(cuts):
        rewrite(bad, data[:cut])
        assert check_of(lambda: read_usxf(bad, trusted=keys)) == "truncated", cut
        assert check_of(lambda: verify_usxf(bad, keys)) == "truncated", cut
        sv = StreamVerifier(keys)
        sv.feed(data[:cut])
        assert check_of(sv.finish) == "truncated", cut


def test_trailing_bytes_are_refused(tmp_path, keys, valid):
    _, data = valid
    bad = rewrite(tmp_path / "bad.usxf", data + b"\0")
    assert check_of(lambda: read_usxf(bad, trusted=keys)) == "trailing-data"
    sv = StreamVerifier(keys)
    assert check_of(lambda: sv.feed(data + b"x")) == "trailing-data"


def test_wrong_magic_and_version(tmp_path, keys, valid):
    _, data = valid
    bad = tmp_path / "bad.usxf"
    assert check_of(lambda: read_usxf(rewrite(bad, b"PK\x03\x04" + data[4:]), trusted=keys)) == "magic"
    assert check_of(lambda: read_usxf(rewrite(bad, b"hello"), trusted=keys)) == "magic"
    assert check_of(lambda: read_usxf(rewrite(bad, MAGIC[:5]), trusted=keys)) == "truncated"
    for major in (0, 2, 65535):
        v = fix_header(data[:HEADER_SIZE], major=major) + data[HEADER_SIZE:]
        with pytest.raises(UsxfInvalid) as ei:
            read_usxf(rewrite(bad, v), trusted=keys)
        assert ei.value.check == "version" and f"{major}.1" in ei.value.detail
    newer_minor = fix_header(data[:HEADER_SIZE], minor=7) + data[HEADER_SIZE:]
    # a newer minor version is accepted by the header check; the signed manifest still says 1.1,
    # so the signature (which covers the header) is what refuses this edited file
    assert check_of(lambda: read_usxf(rewrite(bad, newer_minor), trusted=keys)) == "signature"


@pytest.mark.parametrize("field,value", [
    ("manifest_len", 2**40), ("manifest_len", 2**64 - 1), ("manifest_len", 0),
    ("payload_len", 2**41), ("chunk_size", 3 << 20), ("chunk_size", 1 << 31), ("chunk_size", 512),
    ("sig_len", 2**31), ("payload_offset", 2**50),
])
def test_absurd_declared_lengths_are_refused_before_allocating(tmp_path, keys, valid, field, value):
    _, data = valid
    bad = rewrite(tmp_path / "bad.usxf", fix_header(data[:HEADER_SIZE], **{field: value}) + data[HEADER_SIZE:])
    tracemalloc.start()
    try:
        for fn in (lambda: read_usxf(bad, trusted=keys), lambda: verify_usxf(bad, keys)):
            assert check_of(fn) == "bounds"
        sv = StreamVerifier(keys)
        assert check_of(lambda: sv.feed(bad.read_bytes()[:HEADER_SIZE])) == "bounds"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_declared_manifest_beyond_the_file_is_truncated_not_allocated(tmp_path, keys, valid):
    _, data = valid
    big = 60 << 20
    head = fix_header(data[:HEADER_SIZE], manifest_len=big, payload_offset=payload_offset_for(big, 96))
    bad = rewrite(tmp_path / "bad.usxf", head + data[HEADER_SIZE:])
    tracemalloc.start()
    try:
        assert check_of(lambda: read_usxf(bad, trusted=keys)) == "truncated"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_missing_file_and_directory_are_io_errors(tmp_path, keys):
    assert check_of(lambda: read_usxf(tmp_path / "nope.usxf", trusted=keys)) == "io"
    assert check_of(lambda: verify_usxf(tmp_path, keys)) == "io"


# ---------------------------------------------------------------- identity and trust


def test_file_from_another_model_is_refused(tmp_path, keys):
    info = export(tmp_path, keys)
    other = replace(make_identity(), weights_digest="ee" * 16, head_dim=HD, rope_theta=500000.0)
    with pytest.raises(UsxfInvalid) as ei:
        read_usxf(info.path, trusted=keys, expected_identity=other)
    assert ei.value.check == "model-identity"
    assert "weights_digest" in ei.value.detail and "rope_theta" in ei.value.detail
    renamed = replace(make_identity(), name="same weights, other name", context_limit=99)
    assert read_usxf(info.path, trusted=keys, expected_identity=renamed).digest == info.digest


def test_unknown_key_is_untrusted_not_invalid(tmp_path, keys):
    stranger = WorkspaceKeys(tmp_path / "stranger")
    info = export(tmp_path, stranger)
    with pytest.raises(UsxfUntrustedKey) as ei:
        read_usxf(info.path, trusted=keys)
    assert ei.value.check == "untrusted-key" and ei.value.key_id == stranger.key_id
    assert ei.value.public_key_text == stranger.public_key_text
    for fn in (lambda: verify_usxf(info.path, keys), lambda: verify_usxf(info.path, [keys.public_key])):
        assert check_of(fn) == "untrusted-key"
    # no trust decision: the signature is still verified, but the result says it is not trusted
    f = read_usxf(info.path, trusted=None)
    assert f.key_id == stranger.key_id and not f.signer_trusted
    assert check_of(lambda: read_usxf(rewrite(tmp_path / "bad.usxf", flipped(
        info.path.read_bytes(), sections(info.path.read_bytes())["signature"][1] - 1)), trusted=None)) == "signature"
    keys.trust(stranger.public_key_text)
    assert read_usxf(info.path, trusted=keys).signer_trusted
    assert read_usxf(info.path, trusted=[stranger.public_key_text]).signer_trusted
    assert read_usxf(info.path, trusted={stranger.key_id: stranger.public_key_bytes}).signer_trusted


def test_embedded_key_swapped_for_a_trusted_one_fails_the_signature(tmp_path, keys):
    stranger = WorkspaceKeys(tmp_path / "stranger")
    data = export(tmp_path, stranger).path.read_bytes()
    a, _ = sections(data)["signature"]
    swapped = data[:a] + keys.public_key_bytes + data[a + 32:]
    bad = rewrite(tmp_path / "bad.usxf", swapped)
    assert check_of(lambda: read_usxf(bad, trusted=keys)) == "signature"


# ---------------------------------------------------------------- streaming


def test_stream_in_random_pieces_matches_the_whole_file_reader(tmp_path, keys, valid):
    path, data = valid
    whole = read_usxf(path, trusted=keys)
    rng = random.Random(3)
    for _ in range(5):
        sv = StreamVerifier(keys, keep_payload=True)
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 7, 63, 64, 65, 500, 4096, 10000])
            sv.feed(data[pos:pos + step])
            pos += step
        r = sv.finish()
        assert (r.digest, r.manifest, r.token_ids, r.key_id) == (whole.digest, whole.manifest,
                                                                 whole.token_ids, whole.key_id)
        assert sv.chunks_verified == len(whole.manifest["payload"]["chunks"])
        assert all(np.array_equal(a, b) for a, b in zip(r.load_kv().values, whole.load_kv().values, strict=True))
    no_payload = StreamVerifier(keys)
    no_payload.feed(data)
    assert check_of(no_payload.finish().load_kv) == "io"


def test_stream_rejects_a_bad_chunk_as_soon_as_it_completes(tmp_path, keys, valid):
    _, data = valid
    po = sections(data)["payload"][0]
    chunk = 3
    end = po + (chunk + 1) * 4096
    bad = flipped(data, po + chunk * 4096 + 100)
    sv = StreamVerifier(keys)
    sv.feed(bad[:end - 1])  # everything up to the last byte of the bad chunk: no verdict yet
    assert sv.chunks_verified == chunk
    with pytest.raises(UsxfInvalid) as ei:
        sv.feed(bad[end - 1:end])
    assert ei.value.check == "chunk-checksum" and f"chunk {chunk} " in ei.value.detail
    with pytest.raises(UsxfInvalid) as again:  # a failed verifier stays failed
        sv.feed(bad[end:])
    assert again.value is ei.value
    assert check_of(sv.finish) == "chunk-checksum"


def test_stream_refuses_bad_magic_on_the_first_byte_and_bad_header_at_64(keys, valid):
    _, data = valid
    sv = StreamVerifier(keys)
    assert check_of(lambda: sv.feed(b"X")) == "magic"
    sv = StreamVerifier(keys)
    sv.feed(data[:63])
    assert check_of(lambda: sv.feed(bytes([data[63] ^ 1]))) == "header"


def test_stream_checks_trust_and_identity_before_the_payload(tmp_path, keys, valid):
    _, data = valid
    end_of_prefix = sections(data)["signature"][1]
    sv = StreamVerifier(WorkspaceKeys(tmp_path / "other"))  # an empty trust folder: no key at all
    assert check_of(lambda: sv.feed(data[:end_of_prefix])) == "untrusted-key"
    sv = StreamVerifier(keys, expected_identity=make_identity(weights_digest="00" * 16))
    assert check_of(lambda: sv.feed(data[:end_of_prefix])) == "model-identity"


def test_payload_digest_follows_the_documented_definition(tmp_path, keys, valid):
    path, data = valid
    s = sections(data)
    payload, c = data[s["payload"][0]:], s["chunk_size"]
    ds = [hashlib.sha256(payload[i:i + c]).digest() for i in range(0, len(payload), c)]
    want = hashlib.sha256(b"usxf.payload.v1\x00" + struct.pack("<QI", len(payload), c) + b"".join(ds))
    assert read_usxf(path, trusted=keys).digest == want.hexdigest()
