"""USXF format: round trips, every check, tampering, truncation, streaming, block hashes, RoPE."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
import tracemalloc
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import xxhash

from permeant_tui.engine.errors import PermeantError, UsxfInvalid
from permeant_tui.engine.identity import ModelIdentity
from permeant_tui.engine.usxf import (
    QUANTS,
    AgentRecord,
    Fidelity,
    KVPayload,
    StreamVerifier,
    UsxfUntrustedKey,
    UsxfWriteError,
    WorkspaceKeys,
    block_hashes,
    convert_rope_layout,
    read_usxf,
    rope_permutation,
    verify_usxf,
    write_usxf,
)
from permeant_tui.engine.usxf import quant as q
from permeant_tui.engine.usxf.spec import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    PAYLOAD_ALIGN,
    SIGNATURE_DOMAIN,
    payload_offset_for,
)

LAYERS, HEADS, N, HD = 3, 2, 17, 8


def make_identity(**kw) -> ModelIdentity:
    base = dict(
        name="fake-model", architecture="llama", n_layers=LAYERS, n_heads=4, n_kv_heads=HEADS,
        head_dim=HD, hidden_size=32, vocab_size=1000, rope_theta=10000.0, rope_scaling="null",
        rope_layout="interleaved", sliding_window=0, context_limit=2048,
        weights_digest="ab" * 16, tokenizer_digest="cd" * 16, kv_dtype="float32",
    )
    base.update(kw)
    return ModelIdentity(**base)


def make_kv(seed=0, n=N, layers=LAYERS, heads=HEADS, hd=HD, dtype="float32") -> KVPayload:
    rng = np.random.default_rng(seed)

    def one():
        x = rng.standard_normal((heads, n, hd)).astype(np.float32)
        if dtype == "float16":
            return x.astype(np.float16)
        if dtype == "bfloat16":
            return q.f32_to_bf16_bits(x)
        return x

    return KVPayload([one() for _ in range(layers)], [one() for _ in range(layers)], dtype)


AGENT = AgentRecord("tech-1", "technical", "Technical specialist", "You are precise.",
                    [{"user": "hello", "reply": "hi", "span": [0, 9]},
                     {"user": "more", "reply": "sure", "span": [9, N]}])
FIDELITY = Fidelity(probe_prompt_ids=[5, 6, 7], expected_ids=[8, 9], n=2, context_room=2031, note="t")


@pytest.fixture
def keys(tmp_path) -> WorkspaceKeys:
    return WorkspaceKeys(tmp_path / "keys").ensure()


def export(tmp_path, keys, quant="none", name="a.usxf", kv=None, tokens=None, identity=None, **kw):
    kv = kv if kv is not None else make_kv()
    n = kv.keys[0].shape[1]
    tokens = tokens if tokens is not None else [(i * 37) % 1000 for i in range(n)]
    agent = kw.pop("agent", AGENT if n == N else AgentRecord("x", "r", "t", "s", []))
    return write_usxf(tmp_path / name, identity=identity or make_identity(kv_dtype=kv.dtype),
                      token_ids=tokens, kv=kv, agent=agent, keys=keys, quant=quant,
                      fidelity=kw.pop("fidelity", FIDELITY), **kw)


def rewrite(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def fix_header(head: bytes, **fields) -> bytes:
    """A header with fields replaced and its checksum recomputed (a deliberate edit)."""
    names = ["magic", "major", "minor", "sig_alg", "flags", "manifest_len", "sig_len", "chunk_size",
             "payload_offset", "payload_len", "manifest_xxh3", "header_xxh3"]
    vals = dict(zip(names, HEADER.unpack(head[:HEADER_SIZE]), strict=True))
    vals.update(fields)
    raw = HEADER.pack(*[vals[n] for n in names])
    return raw[:56] + xxhash.xxh3_64_intdigest(raw[:56]).to_bytes(8, "little")


def sections(data: bytes) -> dict:
    h = HEADER.unpack(data[:HEADER_SIZE])
    ml, sl, po, pl = h[5], h[6], h[8], h[9]
    return {"manifest": (64, 64 + ml), "signature": (64 + ml, 64 + ml + sl),
            "padding": (64 + ml + sl, po), "payload": (po, po + pl), "chunk_size": h[7]}


def stream(data: bytes, trusted) -> object:
    sv = StreamVerifier(trusted)
    sv.feed(data)
    return sv.finish()


def check_of(fn, *args, **kw) -> str:
    with pytest.raises(UsxfInvalid) as ei:
        fn(*args, **kw)
    return ei.value.check


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("method", QUANTS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_every_quant_and_source_dtype(tmp_path, keys, method, dtype):
    kv = make_kv(dtype=dtype)
    ident = make_identity(kv_dtype=dtype)
    info = export(tmp_path, keys, method, kv=kv, identity=ident)
    f = read_usxf(info.path, trusted=keys, expected_identity=ident)
    assert f.digest == info.digest and f.size == info.size == info.path.stat().st_size
    assert f.key_id == keys.key_id and f.signer_trusted
    assert f.token_ids == [(i * 37) % 1000 for i in range(N)]
    assert f.agent == AGENT and f.fidelity == FIDELITY and f.identity == ident
    assert f.quant == method and f.manifest["quant"]["method"] == method
    out = f.load_kv()
    assert out.dtype == dtype
    err = f.manifest["quant"]["error"]
    diffs = []
    for a, b in zip(out.keys + out.values, kv.keys + kv.values, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        diffs.append(q.to_float32(a, dtype).astype(np.float64) - q.to_float32(b, dtype))
    d = np.concatenate([x.ravel() for x in diffs])
    lossless = method == "none" or q.stored_dtype(dtype, method) == dtype
    if lossless:
        assert all(np.array_equal(a, b) for a, b in zip(out.keys + out.values, kv.keys + kv.values, strict=True))
        assert err["max_abs"] == 0 and err["rms"] == 0
    else:
        assert err["max_abs"] < 0.1 * err["source_max_abs"]
        assert err["max_abs"] > 0 or (dtype, method) == ("bfloat16", "f16")  # bf16 -> f16 is often exact
        assert np.max(np.abs(d)) == pytest.approx(err["max_abs"], rel=1e-6)
        assert np.sqrt(np.mean(d**2)) == pytest.approx(err["rms"], rel=1e-4)
    assert err["source_max_abs"] > 1 and 0.5 < err["source_rms"] < 2


def test_quantized_sizes_shrink_as_documented(tmp_path, keys):
    kv = make_kv(n=64, hd=64)
    ident = make_identity(head_dim=64)
    sizes = {m: export(tmp_path, keys, m, name=f"{m}.usxf", kv=kv, identity=ident).manifest["payload"]["length"]
             for m in QUANTS}
    values = 2 * LAYERS * HEADS * 64 * 64
    assert sizes["none"] == values * 4
    assert sizes["f16"] == sizes["bf16"] == values * 2
    assert sizes["int8"] == values + values // 64 * 4  # float32 scale per group of 64


def test_none_keeps_nan_bits_and_lossy_refuses_them(tmp_path, keys):
    kv = make_kv()
    kv.keys[1][0, 3, 2] = np.nan
    kv.values[0][1, 0, 0] = -np.inf
    f = read_usxf(export(tmp_path, keys, "none", kv=kv).path, trusted=keys).load_kv()
    assert np.array_equal(f.keys[1].view(np.uint32), kv.keys[1].view(np.uint32))
    for method in ("f16", "bf16", "int8"):
        with pytest.raises(UsxfWriteError) as ei:
            export(tmp_path, keys, method, name=f"{method}.usxf", kv=kv)
        assert ei.value.check == "kv-values"
    assert not list(tmp_path.glob("*f16*")) and not list(tmp_path.glob(".*tmp"))


def test_f16_refuses_values_beyond_its_range(tmp_path, keys):
    kv = make_kv()
    kv.keys[0][0, 0, 0] = 70000.0
    with pytest.raises(UsxfWriteError) as ei:
        export(tmp_path, keys, "f16", kv=kv)
    assert ei.value.check == "kv-values"
    export(tmp_path, keys, "bf16", kv=kv)  # bf16 has float32's range


def test_bf16_rounds_to_nearest_even():
    one = 0x3F800000
    cases = {
        one: 0x3F80,
        one + 0x8000: 0x3F80,  # exactly halfway, 0x3F80 is even: stays
        one + 0x18000: 0x3F82,  # halfway above odd 0x3F81: up to even
        one + 0x8001: 0x3F81,  # just above halfway: up
        one + 0x7FFF: 0x3F80,  # just below halfway: down
        0x7F7FFFFF: 0x7F80,  # max float32 rounds to inf
        0x80000001: 0x8000,  # tiny negative subnormal -> -0
    }
    x = np.array(list(cases), dtype=np.uint32).view(np.float32)
    assert q.f32_to_bf16_bits(x).tolist() == list(cases.values())
    nan = q.f32_to_bf16_bits(np.array([np.nan], np.float32))
    assert np.isnan(q.bf16_bits_to_f32(nan))[0]


def test_int8_all_zero_and_group_scales(tmp_path, keys):
    kv = make_kv(hd=HD)
    kv.keys[0][:] = 0
    f = read_usxf(export(tmp_path, keys, "int8", kv=kv).path, trusted=keys)
    assert f.manifest["quant"]["group_size"] == HD  # 64 does not divide 8
    out = f.load_kv()
    assert not out.keys[0].any()
    t = f.manifest["kv"]["tensors"][0]
    assert t["dtype"] == "int8" and t["scales"]["shape"] == [HEADS, N, 1]


def test_empty_sequence_round_trips(tmp_path, keys):
    kv = make_kv(n=0)
    info = export(tmp_path, keys, "int8", kv=kv, tokens=[], fidelity=None)
    f = read_usxf(info.path, trusted=keys)
    assert f.token_ids == [] and f.manifest["payload"]["length"] == 0
    assert f.load_kv().keys[0].shape == (HEADS, 0, HD)


def test_payload_is_page_aligned_and_memmappable(tmp_path, keys):
    info = export(tmp_path, keys, "none")
    po = info.manifest["payload"]["offset"]
    assert po % PAYLOAD_ALIGN == 0
    t = info.manifest["kv"]["tensors"][3]
    assert t["offset"] % 64 == 0
    mm = np.memmap(info.path, dtype="<f4", mode="r", offset=po + t["offset"], shape=tuple(t["shape"]))
    assert np.array_equal(mm, make_kv().values[1])


def test_multi_chunk_file_and_writer_load_kv(tmp_path, keys):
    kv = make_kv(n=100, hd=64)
    info = export(tmp_path, keys, "none", kv=kv, identity=make_identity(head_dim=64), chunk_size=4096)
    assert len(info.manifest["payload"]["chunks"]) == -(-info.manifest["payload"]["length"] // 4096) > 20
    f = verify_usxf(info.path, keys)
    assert f.digest == info.digest
    for r in (f, info):  # results without a payload re-read with every check
        out = r.load_kv()
        assert all(np.array_equal(a, b) for a, b in zip(out.keys, kv.keys, strict=True))


def test_progress_is_monotonic_and_ends_at_one(tmp_path, keys):
    seen: list[float] = []
    export(tmp_path, keys, "int8", progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 5


def test_manifest_records_what_the_issue_lists(tmp_path, keys):
    m = export(tmp_path, keys, "int8", provenance={"runtime": "mlx", "runtime_version": "0.32"}).manifest
    assert m["version"] == [1, 1]
    assert m["model"]["fingerprint"] == make_identity().fingerprint
    assert m["attention"]["rope_layout"] == "interleaved" and m["attention"]["n_kv_heads"] == HEADS
    assert np.frombuffer(m["sequence"]["token_ids"], "<u4").tolist() == [(i * 37) % 1000 for i in range(N)]
    assert m["blocks"]["block_size"] == 16 and len(m["blocks"]["hashes"]) == 2
    assert m["kv"]["source_dtype"] == "float32" and len(m["kv"]["tensors"]) == 2 * LAYERS
    assert m["provenance"]["runtime"] == "mlx" and m["provenance"]["host"] and m["provenance"]["created_at"]
    assert m["agent"]["turns"][1]["span"] == [9, N]
    assert m["fidelity"]["expected_ids"] == [8, 9]
    assert m["signature"] == {"alg": "ed25519", "key_id": keys.key_id}


# ---------------------------------------------------------------- writer refusals and atomicity


def test_writer_refuses_inconsistent_input(tmp_path, keys):
    cases = {
        "kv-shape": dict(kv=make_kv(layers=2)),
        "tokens": dict(tokens=[5000] * N),
        "agent": dict(agent=AgentRecord("a", "r", "t", "s", [{"user": "", "reply": "", "span": [3, 40]}])),
        "fidelity": dict(fidelity=Fidelity([1], [2, 3], n=5, context_room=0)),
        "quant": dict(quant="q4"),
    }
    for check, kw in cases.items():
        with pytest.raises(UsxfWriteError) as ei:
            export(tmp_path, keys, **({"quant": "none"} | kw))
        assert ei.value.check == check, check
        assert isinstance(ei.value, PermeantError)
    assert list(tmp_path.iterdir()) == [tmp_path / "keys"]


def test_failed_export_leaves_the_previous_file_and_no_temp(tmp_path, keys):
    good = export(tmp_path, keys, "none")
    before = good.path.read_bytes()

    def boom(frac: float) -> None:
        if frac > 0.6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(tmp_path, keys, "none", kv=make_kv(seed=9), progress=boom)
    assert good.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.usxf", "keys"]


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


# ---------------------------------------------------------------- block hashes and RoPE


def test_block_hash_chain_changes_from_the_edited_block_on():
    fp = make_identity().fingerprint
    ids = list(range(100, 180))  # 80 tokens: 5 blocks of 16
    base = block_hashes(ids, fp, 16)
    assert len(base) == 5 and len(set(base)) == 5 and all(len(h) == 16 for h in base)
    for pos in (0, 15, 16, 40, 79):
        edited = list(ids)
        edited[pos] += 1
        h = block_hashes(edited, fp, 16)
        b = pos // 16
        assert h[:b] == base[:b], pos
        assert all(x != y for x, y in zip(h[b:], base[b:], strict=True)), pos
    assert block_hashes(ids[:35], fp, 16)[:2] == base[:2]  # a prefix has the same hashes
    assert len(block_hashes(ids[:35], fp, 16)) == 3  # the partial last block is hashed too
    other = replace(make_identity(), weights_digest="ff" * 16).fingerprint
    assert all(x != y for x, y in zip(block_hashes(ids, other, 16), base, strict=True))
    assert block_hashes(ids, fp, 32)[0] != base[1]


def test_block_hashes_follow_the_documented_definition():
    fp = make_identity().fingerprint
    ids = [1, 2, 3, 70000]
    root = xxhash.xxh3_128_digest(b"usxf.blocks.v1\x00" + fp.encode() + struct.pack("<I", 2))
    h0 = xxhash.xxh3_128_digest(root + struct.pack("<2I", 1, 2))
    h1 = xxhash.xxh3_128_digest(h0 + struct.pack("<2I", 3, 70000))
    assert block_hashes(ids, fp, 2) == [h0, h1]


def test_payload_digest_follows_the_documented_definition(tmp_path, keys, valid):
    path, data = valid
    s = sections(data)
    payload, c = data[s["payload"][0]:], s["chunk_size"]
    ds = [hashlib.sha256(payload[i:i + c]).digest() for i in range(0, len(payload), c)]
    want = hashlib.sha256(b"usxf.payload.v1\x00" + struct.pack("<QI", len(payload), c) + b"".join(ds))
    assert read_usxf(path, trusted=keys).digest == want.hexdigest()


def _rope_half(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def _rope_interleaved(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def test_rope_permutation_is_an_inverse_pair_and_matches_the_rotations():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 5, 8))
    assert rope_permutation(8, "interleaved", "half-split").tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    there = convert_rope_layout(k, "interleaved", "half-split")
    assert np.array_equal(convert_rope_layout(there, "half-split", "interleaved"), k)
    assert np.array_equal(convert_rope_layout(k, "half-split", "half-split"), k)
    # the same vector in the two conventions: rotating then permuting == permuting then rotating,
    # and attention scores are unchanged when q and k are both converted
    x, qv = rng.standard_normal(8), rng.standard_normal(8)
    for pos in (0, 1, 17, 300):
        as_half = _rope_half(x, pos)
        as_inter = _rope_interleaved(convert_rope_layout(x, "half-split", "interleaved"), pos)
        assert np.allclose(convert_rope_layout(as_inter, "interleaved", "half-split"), as_half)
        qi = _rope_interleaved(convert_rope_layout(qv, "half-split", "interleaved"), 300)
        assert np.isclose(qi @ as_inter, _rope_half(qv, 300) @ as_half)
    partial = rope_permutation(10, "interleaved", "half-split", rotary_dim=4).tolist()
    assert partial == [0, 2, 1, 3, 4, 5, 6, 7, 8, 9]
    assert np.argsort(partial).tolist() == rope_permutation(10, "half-split", "interleaved", 4).tolist()
    with pytest.raises(ValueError):
        rope_permutation(8, "interleaved", "neox")


def test_bf16_source_carried_as_uint16(tmp_path, keys):
    kv = make_kv(dtype="bfloat16")
    assert kv.keys[0].dtype == np.uint16
    out = read_usxf(export(tmp_path, keys, "none", kv=kv, identity=make_identity(kv_dtype="bfloat16")).path,
                    trusted=keys).load_kv()
    assert out.keys[0].dtype == np.uint16 and np.array_equal(out.keys[0], kv.keys[0])


def test_written_file_is_not_world_writable_and_temp_names_are_hidden(tmp_path, keys):
    info = export(tmp_path, keys)
    mode = stat.S_IMODE(os.stat(info.path).st_mode)
    assert not mode & 0o002
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
