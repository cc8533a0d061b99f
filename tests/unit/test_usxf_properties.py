"""Property tests: whatever bytes a USXF reader is given, it returns a verified result or raises
UsxfInvalid (never another exception, never the `malformed` safety net), and a changed file is
never accepted."""

from __future__ import annotations

import atexit
import copy
import shutil
import tempfile
from pathlib import Path

import msgpack
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from permeant_tui.engine.errors import UsxfInvalid
from permeant_tui.engine.identity import ModelIdentity
from permeant_tui.engine.usxf import (
    AgentRecord,
    Fidelity,
    KVPayload,
    StreamVerifier,
    WorkspaceKeys,
    read_usxf,
    verify_usxf,
    write_usxf,
)
from permeant_tui.engine.usxf import quant as q
from permeant_tui.engine.usxf.spec import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    SIGNATURE_DOMAIN,
    payload_offset_for,
)

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

IDENTITY = ModelIdentity(
    name="prop", architecture="llama", n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
    hidden_size=16, vocab_size=500, rope_theta=10000.0, rope_scaling="null",
    rope_layout="half-split", sliding_window=0, context_limit=512, weights_digest="w" * 32,
    tokenizer_digest="t" * 32, kv_dtype="float32",
)
WORKDIR = Path(tempfile.mkdtemp(prefix="usxf-props-"))
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)
KEYS = WorkspaceKeys(WORKDIR / "keys").ensure()


def _valid_file(quant: str = "none", n: int = 12) -> bytes:
    rng = np.random.default_rng(n)
    kv = KVPayload([rng.standard_normal((1, n, 8)).astype(np.float32) for _ in range(2)],
                   [rng.standard_normal((1, n, 8)).astype(np.float32) for _ in range(2)], "float32")
    info = write_usxf(WORKDIR / f"valid_{quant}_{n}.usxf", identity=IDENTITY,
                      token_ids=list(range(n)), kv=kv,
                      agent=AgentRecord("a", "r", "t", "s", [{"user": "u", "reply": "r", "span": [0, n]}]),
                      keys=KEYS, quant=quant, fidelity=Fidelity([1], [2], 1, 100), chunk_size=4096)
    return info.path.read_bytes()


VALID = {m: _valid_file(m) for m in ("none", "int8", "kivi8")}
VALID_BIG = _valid_file("none", n=300)  # several 4 KiB chunks


def outcome(data: bytes, path: Path) -> tuple[str, object]:
    """("ok", digest) or ("invalid", check) from all three readers, which must agree."""
    path.write_bytes(data)
    results = []
    for read in (lambda: read_usxf(path, trusted=KEYS),
                 lambda: verify_usxf(path, KEYS)):
        try:
            r = read()
            results.append(("ok", r.digest))
            assert_well_formed(r)
        except UsxfInvalid as e:
            assert e.check != "malformed", e
            assert "\n" not in str(e)
            results.append(("invalid", e.check))
    sv = StreamVerifier(KEYS)
    try:
        for i in range(0, len(data), 777):
            sv.feed(data[i:i + 777])
        stream = ("ok", sv.finish().digest)
    except UsxfInvalid as e:
        assert e.check != "malformed", e
        stream = ("invalid", e.check)
    assert results[0] == results[1]
    assert (stream[0] == "ok") == (results[0][0] == "ok")
    event(f"{results[0][0]}: {results[0][1] if results[0][0] == 'invalid' else 'verified'}")
    return results[0]


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def assert_well_formed(r) -> None:
    """What a caller may rely on once a file verified: typed records, spans inside the
    sequence, tensors of the declared shapes."""
    a = r.agent
    assert all(isinstance(x, str) for x in (a.agent_id, a.role, a.title, a.system))
    prev = 0
    for t in a.turns:
        assert isinstance(t["user"], str) and isinstance(t["reply"], str)
        start, end = t["span"]
        assert prev <= start <= end <= len(r.token_ids)
        prev = end
    if r.fidelity is not None:
        assert all(isinstance(x, int) for x in r.fidelity.probe_prompt_ids + r.fidelity.expected_ids)
        assert r.fidelity.n == len(r.fidelity.expected_ids) and isinstance(r.fidelity.note, str)
    assert all(0 <= t < r.identity.vocab_size for t in r.token_ids)
    kv = r.load_kv()
    assert len(kv.keys) == len(kv.values) == r.identity.n_layers
    for k in kv.keys:
        assert k.shape == (r.identity.n_kv_heads, len(r.token_ids), r.identity.head_dim)


@pytest.fixture
def scratch(tmp_path) -> Path:
    return tmp_path / "x.usxf"


@SETTINGS
@given(st.one_of(st.binary(max_size=5000), st.binary(min_size=50, max_size=200).map(lambda b: MAGIC + b)))
def test_random_bytes_are_refused(scratch, data):
    assert outcome(data, scratch)[0] == "invalid"


@SETTINGS
@given(st.binary(min_size=1, max_size=2000), st.binary(max_size=3000), st.data())
def test_random_sections_behind_a_well_formed_header_are_refused(scratch, manifest, payload, data):
    """A checksummed header whose lengths are plausible (or anything), random manifest, signature
    and payload behind it: each check in turn gets random input."""
    plausible = data.draw(st.booleans())
    ml = len(manifest) if plausible else data.draw(st.integers(0, 2**64 - 1))
    sl = 96 if plausible else data.draw(st.integers(0, 2**32 - 1))
    cs = data.draw(st.sampled_from([4096, 1 << 16]) if plausible else st.integers(0, 2**32 - 1))
    po = payload_offset_for(len(manifest), 96) if plausible else data.draw(st.integers(0, 2**64 - 1))
    pl = len(payload) if plausible else data.draw(st.integers(0, 2**64 - 1))
    mx = xxhash.xxh3_64_intdigest(manifest) if data.draw(st.booleans()) else data.draw(
        st.integers(0, 2**64 - 1))
    if data.draw(st.booleans()):  # a real MessagePack map, so the decoder is exercised too
        manifest = msgpack.packb(data.draw(st.dictionaries(st.text(max_size=8), values, max_size=6)))
        ml, mx = len(manifest), xxhash.xxh3_64_intdigest(manifest)
        po = payload_offset_for(ml, 96)
    raw = HEADER.pack(MAGIC, 1, data.draw(st.sampled_from([0, 1, 9])), 1, 0, ml, sl, cs, po, pl, mx, 0)
    head = raw[:56] + xxhash.xxh3_64_intdigest(raw[:56]).to_bytes(8, "little")
    if data.draw(st.booleans()):  # signed by the trusted key: the decoder and parser get it
        sig = KEYS.public_key_bytes + KEYS.sign(SIGNATURE_DOMAIN + head + manifest)
    else:
        sig = KEYS.public_key_bytes + data.draw(st.binary(min_size=64, max_size=64))
    prefix = head + manifest + sig
    blob = prefix + bytes(max(0, po - len(prefix)) if po < 1 << 20 else 0) + payload
    assert outcome(blob, scratch)[0] == "invalid"


SPAN = 10**6  # positions are drawn in 0..SPAN and scaled to the file's length
position = st.integers(0, SPAN).map(lambda x: x * 7919 % (SPAN + 1))  # spread over the whole file
mutation = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(0, 7)),
    st.tuples(st.just("flip"), position, st.integers(0, 7)),
    st.tuples(st.just("set"), position, st.integers(0, 255)),
    st.tuples(st.just("cut"), position, st.just(0)),
    st.tuples(st.just("insert"), position, st.integers(0, 255)),
    st.tuples(st.just("delete"), position, st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 5000), st.integers(0, 255)),
)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, val in ops:
        if not b and op != "append":
            continue
        i = min(pos * len(b) // SPAN, len(b) - 1)
        if op == "flip":
            b[i] ^= 1 << val
        elif op == "set":
            b[i] = val
        elif op == "cut":
            del b[i:]
        elif op == "insert":
            b.insert(i, val)
        elif op == "delete":
            del b[i]
        else:
            b += bytes([val]) * pos
    return bytes(b)


@SETTINGS
@given(st.sampled_from(["none", "int8", "kivi8", "big"]), st.lists(mutation, min_size=1, max_size=4))
def test_a_changed_file_is_never_accepted(scratch, which, ops):
    original = VALID_BIG if which == "big" else VALID[which]
    data = mutate(original, ops)
    result = outcome(data, scratch)
    if data == original:
        assert result[0] == "ok"
    else:
        assert result[0] == "invalid"


# ---- hostile manifests: signed by a key the reader trusts, content anything


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:6]):
            yield from _paths(v, prefix + (i,))


def nudge(v, data):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + data.draw(st.sampled_from([-64, -1, 1, 2, 64, 4096, -v, 2**32]))
    if isinstance(v, float):
        return data.draw(st.sampled_from([v * 2, -v, 0.0, float("nan"), float("inf")]))
    if isinstance(v, bytes) and v:
        i = data.draw(st.integers(0, len(v) - 1))
        return v[:i] + bytes([v[i] ^ 1]) + v[i + 1:] if data.draw(st.booleans()) else v[:i]
    if isinstance(v, str):
        return data.draw(st.sampled_from([v + "x", "", v.upper(), "float16", "int8", "k", "v"]))
    if isinstance(v, list) and v:
        i = data.draw(st.integers(0, len(v) - 1))
        return v[:i] + v[i + 1:] if data.draw(st.booleans()) else v + [v[i]]
    return data.draw(values)


def _resign(data: bytes, manifest: dict, fix_offset: bool) -> bytes:
    h = list(HEADER.unpack(data[:HEADER_SIZE]))
    po, pl = h[8], h[9]
    payload = data[po:po + pl]
    for _ in range(4):
        mb = msgpack.packb(manifest, use_bin_type=True)
        new_po = payload_offset_for(len(mb), 96)
        pay = manifest.get("payload")
        if not fix_offset or not isinstance(pay, dict) or pay.get("offset") == new_po:
            break
        pay["offset"] = new_po
    h[5], h[8], h[10], h[11] = len(mb), new_po, xxhash.xxh3_64_intdigest(mb), 0
    raw = HEADER.pack(*h)
    head = raw[:56] + xxhash.xxh3_64_intdigest(raw[:56]).to_bytes(8, "little")
    prefix = head + mb + KEYS.public_key_bytes + KEYS.sign(SIGNATURE_DOMAIN + head + mb)
    return prefix + bytes(new_po - len(prefix)) + payload


@SETTINGS
@given(st.sampled_from(["none", "int8", "kivi8"]), st.data())
def test_hostile_signed_manifests_never_crash_the_reader(scratch, which, data):
    original = VALID[which]
    ml = HEADER.unpack(original[:HEADER_SIZE])[5]
    manifest = msgpack.unpackb(original[HEADER_SIZE:HEADER_SIZE + ml], raw=False)
    edited = copy.deepcopy(manifest)
    paths = [p for p in _paths(edited) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = edited
        try:
            for k in path[:-1]:
                parent = parent[k]
            how = data.draw(st.sampled_from(["drop", "replace", "nudge", "nudge"]))
            if how == "drop" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif how == "nudge":  # a plausible value of the same type: reaches the semantic checks
                parent[path[-1]] = nudge(parent[path[-1]], data)
            else:
                parent[path[-1]] = data.draw(values)
        except (KeyError, IndexError, TypeError):
            continue
    try:
        blob = _resign(original, edited, fix_offset=data.draw(st.booleans()))
    except (ValueError, TypeError, OverflowError):
        assume(False)  # msgpack cannot encode it: not a file anyone can produce
    outcome(blob, scratch)  # asserts: UsxfInvalid or a verified, loadable result


@SETTINGS
@given(st.integers(0, 40), st.integers(1, 3), st.sampled_from(["f16", "bf16", "int8", "kivi8"]),
       st.floats(1e-3, 1e3), st.data())
def test_quantization_error_is_what_the_manifest_records(tmp_path_factory, n, heads, method, scale, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    hd = data.draw(st.sampled_from([2, 8, 64, 128]))
    ident = ModelIdentity(**{**IDENTITY.__dict__, "n_kv_heads": heads, "head_dim": hd})
    kv = KVPayload([(rng.standard_normal((heads, n, hd)) * scale).astype(np.float32) for _ in range(2)],
                   [(rng.standard_normal((heads, n, hd)) * scale).astype(np.float32) for _ in range(2)],
                   "float32")
    d = tmp_path_factory.mktemp("q")
    info = write_usxf(d / "q.usxf", identity=ident, token_ids=[1] * n, kv=kv,
                      agent=AgentRecord("a", "r", "t", "s", []), keys=KEYS, quant=method)
    f = read_usxf(info.path, trusted=KEYS)
    out = f.load_kv()
    diff = np.concatenate([(a.astype(np.float64) - b).ravel()
                           for a, b in zip(out.keys + out.values, kv.keys + kv.values, strict=True)])
    err = f.manifest["quant"]["error"]
    got = float(np.max(np.abs(diff))) if diff.size else 0.0
    assert got == pytest.approx(err["max_abs"], rel=1e-6, abs=1e-30)
    # kivi8: half a step of a group spanning at most 2 max|x| (zero rounded down, scale up)
    bound = {"f16": 2**-11, "bf16": 2**-8, "int8": 1 / 254, "kivi8": 1 / 255 + 2**-9}[method]
    assert got <= bound * err["source_max_abs"] * 1.0001 + 1e-30
    if method in ("f16", "bf16"):  # relative rounding error per value
        src = np.concatenate([b.ravel() for b in kv.keys + kv.values]).astype(np.float64)
        assert np.all(np.abs(diff) <= np.abs(src) * bound + 6e-8)
    assert q.stored_dtype("float32", method) == f.manifest["kv"]["tensors"][0]["dtype"]
