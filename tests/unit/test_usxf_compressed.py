"""kivi8, the compressed transfer (docs/USXF.md 5.1), and the probe settings (section 7): the
round trip stays within the documented bound, the file stays at or below 0.27x of float32,
every malformed kivi8 table is refused with UsxfInvalid, and the probe's length and divergence
report are what the user asked for."""

from __future__ import annotations

import copy
import math

import msgpack
import numpy as np
import pytest
import xxhash
from support.usxf_files import fix_header

from permeant_tui.engine.errors import UsxfInvalid
from permeant_tui.engine.identity import ModelIdentity
from permeant_tui.engine.usxf import (
    AgentRecord,
    Fidelity,
    KVPayload,
    WorkspaceKeys,
    kivi,
    read_usxf,
    verify_usxf,
    write_usxf,
)
from permeant_tui.engine.usxf.quant import f32_to_bf16_bits, to_float32
from permeant_tui.engine.usxf.spec import HEADER, HEADER_SIZE, SIGNATURE_DOMAIN, payload_offset_for

IDENTITY = ModelIdentity(
    name="kivi", architecture="llama", n_layers=2, n_heads=4, n_kv_heads=3, head_dim=64,
    hidden_size=256, vocab_size=1000, rope_theta=10000.0, rope_scaling="null",
    rope_layout="interleaved", sliding_window=0, context_limit=8192, weights_digest="w" * 32,
    tokenizer_digest="t" * 32, kv_dtype="float32",
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return WorkspaceKeys(tmp_path_factory.mktemp("keys")).ensure()


def kv_like_a_model(n: int, seed: int = 0, heads: int = 3, d: int = 64) -> KVPayload:
    """Keys with a few large channels and a low-norm sink at position 0, values per token."""
    rng = np.random.default_rng(seed)

    def k():
        x = rng.standard_normal((heads, n, d)) * rng.uniform(0.5, 12, (heads, 1, d))
        x[:, :1] *= 0.2
        return x.astype(np.float32)

    def v():
        return (rng.standard_normal((heads, n, d)) * 2).astype(np.float32)

    return KVPayload([k(), k()], [v(), v()], "float32")


def write(tmp_path, keys, kv, quant="kivi8", n=None, identity=IDENTITY, **kw):
    n = kv.keys[0].shape[1] if n is None else n
    return write_usxf(tmp_path / f"{quant}-{n}.usxf", identity=identity, token_ids=[7] * n, kv=kv,
                      agent=AgentRecord("a", "r", "t", "s", []), keys=keys, quant=quant, **kw)


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 129, 300])
def test_round_trip_within_the_documented_bound(tmp_path, keys, n):
    kv = kv_like_a_model(n, seed=n)
    info = write(tmp_path, keys, kv)
    got = read_usxf(info.path, trusted=keys).load_kv()
    assert verify_usxf(info.path, keys).quant == "kivi8"
    worst = 0.0
    for kind, src, out in [("k", a, b) for a, b in zip(kv.keys, got.keys, strict=True)] + \
                          [("v", a, b) for a, b in zip(kv.values, got.values, strict=True)]:
        enc = kivi.encode(src, kind, kivi.KEY_GROUP, kivi.VALUE_GROUP)
        # the file holds exactly what the codec makes, and that is within the bound
        assert np.array_equal(out, kivi.decode(enc.codes, enc.scales, enc.zeros, enc.kept,
                                               enc.kept_values, kind, kivi.KEY_GROUP,
                                               kivi.VALUE_GROUP))
        assert out.shape == src.shape and out.dtype == np.float32
        assert np.all(np.abs(out - src) <= kivi.error_bound(src, enc, kind, kivi.KEY_GROUP,
                                                            kivi.VALUE_GROUP))
        worst = max(worst, float(np.abs(out - src).max()) if n else 0.0)
    assert info.manifest["quant"]["error"]["max_abs"] == pytest.approx(worst, rel=1e-6, abs=1e-30)


def test_sinks_and_low_norm_positions_stay_exact_in_float16():
    kv = kv_like_a_model(400)
    k = kv.keys[0]
    k[:, 123] *= 0.01  # a secondary sink: small key
    enc = kivi.encode(k, "k")
    assert enc.kept[0] == 0 and 123 in enc.kept
    assert len(enc.kept) == kivi.KEEP_FIRST + round(kivi.KEEP_FRACTION * 400)
    out = kivi.decode(enc.codes, enc.scales, enc.zeros, enc.kept, enc.kept_values, "k",
                      kivi.KEY_GROUP, kivi.VALUE_GROUP)
    assert np.array_equal(out[:, enc.kept], k[:, enc.kept].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_sources_come_back_in_their_dtype(tmp_path, keys, dtype):
    kv32 = kv_like_a_model(70)
    conv = (lambda a: a.astype(np.float16)) if dtype == "float16" else f32_to_bf16_bits
    kv = KVPayload([conv(a) for a in kv32.keys], [conv(a) for a in kv32.values], dtype)
    ident = ModelIdentity(**{**IDENTITY.__dict__, "kv_dtype": dtype})
    got = read_usxf(write(tmp_path, keys, kv, identity=ident).path, trusted=keys).load_kv()
    assert got.dtype == dtype
    for a, b in zip(kv.keys + kv.values, got.keys + got.values, strict=True):
        assert b.dtype == a.dtype
        x, y = to_float32(a, dtype), to_float32(b, dtype)
        assert np.abs(x - y).max() <= 0.01 * np.abs(x).max()


@pytest.mark.parametrize("n", [200, 1000, 4000])
def test_size_is_at_most_0_27_of_float32(tmp_path, keys, n):
    """The payload (the file less its first page or two of header and manifest, which the
    real model's 46 KB per token makes negligible: bench/fidelity.py prints file sizes)."""
    kv = kv_like_a_model(n)
    info = write(tmp_path, keys, kv)
    assert info.manifest["payload"]["length"] <= 0.27 * kv.nbytes
    int8 = write(tmp_path, keys, kv, quant="int8")
    assert info.size <= int8.size * 1.02  # about int8's size, at a fifth of its key error


def test_writer_refuses_what_kivi8_cannot_carry(tmp_path, keys):
    kv = kv_like_a_model(10)
    for bad in (np.nan, np.inf, 70000.0):
        k = kv.keys[0].copy()
        k[0, 3, 5] = bad
        with pytest.raises(UsxfInvalid, match="kv-values"):
            write(tmp_path, keys, KVPayload([k, kv.keys[1]], kv.values, "float32"))


# ---- hostile kivi8 tables: signed by the trusted key, so only the manifest checks stand


def resign(data: bytes, manifest: dict, keys) -> bytes:
    h = HEADER.unpack(data[:HEADER_SIZE])
    payload = data[h[8]:h[8] + h[9]]
    for _ in range(4):
        mb = msgpack.packb(manifest, use_bin_type=True)
        po = payload_offset_for(len(mb), 96)
        if manifest["payload"]["offset"] == po:
            break
        manifest["payload"]["offset"] = po
    head = fix_header(data, manifest_len=len(mb), payload_offset=po,
                      manifest_xxh3=xxhash.xxh3_64_intdigest(mb))
    prefix = head + mb + keys.public_key_bytes + keys.sign(SIGNATURE_DOMAIN + head + mb)
    return prefix + bytes(po - len(prefix)) + payload


def _t(m, i=0):
    return m["kv"]["tensors"][i]


BAD_TABLES = {
    "kept not increasing": lambda m: _t(m).update(kept=np.array([0, 5, 5], "<u4").tobytes()),
    "kept past the end": lambda m: _t(m).update(kept=np.array([0, 300], "<u4").tobytes()),
    "kept not uint32": lambda m: _t(m).update(kept=b"\x00\x01\x02"),
    "kept not bin": lambda m: _t(m).update(kept=[0, 1]),
    "kept missing": lambda m: _t(m).pop("kept"),
    "scales shape": lambda m: _t(m)["scales"].update(shape=[3, 2, 64]),
    "zeros dtype": lambda m: _t(m)["zeros"].update(dtype="float32"),
    "zeros missing": lambda m: _t(m).pop("zeros"),
    "kept values shape": lambda m: _t(m, 1)["kept_values"].update(shape=[3, 0, 64]),
    "kept values overlap": lambda m: _t(m)["kept_values"].update(offset=_t(m)["zeros"]["offset"]),
    "codes nbytes": lambda m: _t(m).update(nbytes=_t(m)["nbytes"] + 64),
    "codes dtype": lambda m: _t(m).update(dtype="int8"),
    "value group": lambda m: m["quant"].update(group_size=48),
    "key group": lambda m: m["quant"].update(key_group=0),
    "key group missing": lambda m: m["quant"].pop("key_group"),
    "scale dtype": lambda m: m["quant"].update(scale_dtype="float32"),
    "scales region outside": lambda m: _t(m, 3)["zeros"].update(offset=1 << 40),
}


@pytest.mark.parametrize("name", sorted(BAD_TABLES))
def test_malformed_kivi8_tables_are_refused(tmp_path, keys, name):
    info = write(tmp_path, keys, kv_like_a_model(300))
    data = info.path.read_bytes()
    manifest = copy.deepcopy(read_usxf(info.path, trusted=keys).manifest)
    BAD_TABLES[name](manifest)
    bad = tmp_path / "bad.usxf"
    bad.write_bytes(resign(data, manifest, keys))
    for reader in (lambda: read_usxf(bad, trusted=keys), lambda: verify_usxf(bad, keys)):
        with pytest.raises(UsxfInvalid) as e:
            reader()
        assert e.value.check in ("layout", "manifest"), e.value


def test_a_resigned_valid_kivi8_table_still_reads(tmp_path, keys):
    """The helper above changes nothing by itself: the refusals are the edits'."""
    info = write(tmp_path, keys, kv_like_a_model(300))
    manifest = copy.deepcopy(read_usxf(info.path, trusted=keys).manifest)
    good = tmp_path / "good.usxf"
    good.write_bytes(resign(info.path.read_bytes(), manifest, keys))
    assert read_usxf(good, trusted=keys).load_kv().keys[0].shape == (3, 300, 64)


# ---- the fidelity record's margins (optional key, docs/USXF.md 7)


@pytest.mark.parametrize("margins, ok", [([0.5, 0.0], True), (None, True), ([0.5], False),
                                         ([0.5, -1.0], False), ([0.5, float("nan")], False),
                                         (["x", 1.0], False), ([True, 1.0], False)])
def test_fidelity_margins_are_checked(tmp_path, keys, margins, ok):
    info = write(tmp_path, keys, kv_like_a_model(5), quant="none",
                 fidelity=Fidelity([1], [2, 3], 2, 100, margins=[0.5, 0.0]))
    manifest = copy.deepcopy(read_usxf(info.path, trusted=keys).manifest)
    if margins is None:
        del manifest["fidelity"]["margins"]
    else:
        manifest["fidelity"]["margins"] = margins
    f = tmp_path / "m.usxf"
    f.write_bytes(resign(info.path.read_bytes(), manifest, keys))
    if ok:
        assert read_usxf(f, trusted=keys).fidelity.margins == margins
    else:
        with pytest.raises(UsxfInvalid, match="fidelity"):
            read_usxf(f, trusted=keys)


def test_probe_verdict_names_the_position_and_the_source_margin():
    from permeant_tui.engine.exchange import probe_verdict

    assert probe_verdict([1, 2, 3], [1, 2, 3], [1.0, 2.0, 3.0]) == "exact 3/3"
    assert probe_verdict([1, 9, 3], [1, 2, 3], [1.0, 0.0312, 3.0]) == \
        "diverged at 1 (1/3 matched; source top-2 margin 0.0312 there)"
    assert probe_verdict([9], [1], None) == "diverged at 0 (0/1 matched; no source margins recorded)"
    assert math.isclose(float(probe_verdict([1, 9], [1, 2], [4.0, 0.25]).split("margin ")[1]
                              .split(" ")[0]), 0.25)
