"""USXF format: round trips, writer refusals, block hashes, RoPE (tampering, truncation, trust
and streaming: test_usxf_tampering.py)."""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import replace

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

from permeant_tui.engine.errors import PermeantError
from permeant_tui.engine.usxf import (
    QUANTS,
    AgentRecord,
    Fidelity,
    UsxfWriteError,
    block_hashes,
    convert_rope_layout,
    read_usxf,
    rope_permutation,
    verify_usxf,
)
from permeant_tui.engine.usxf import quant as q
from permeant_tui.engine.usxf.spec import (
    PAYLOAD_ALIGN,
)

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
