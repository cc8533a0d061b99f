"""KV snapshots: the round trip is bit-exact, and every kind of damage is rejected with the name
of the failed check; through the engine, a rejected snapshot means a rebuild by prefill, an
intact transcript and the same next reply as an undamaged run."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_tiny_model

from permeant_tui.engine import kvcache
from permeant_tui.engine import snapshot as snapmod
from permeant_tui.engine.agent import Agent, Turn
from permeant_tui.engine.errors import ModelMismatch, SnapshotCorrupt, SnapshotInvalid
from permeant_tui.engine.events import AgentRestored, Notice
from permeant_tui.engine.generation import common_prefix, prefill
from permeant_tui.engine.snapshot import attach, read_header, read_snapshot, write_snapshot
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace

TEXT = "The payment API returns 502 on retries; the queue backs up. " * 3


# ---- helpers ----------------------------------------------------------------------------------
def layout(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header) of a safetensors file."""
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    return 8 + hlen, json.loads(raw[8:8 + hlen])


def flip(path: Path, pos: int, bit: int = 0) -> None:
    b = bytearray(path.read_bytes())
    b[pos] ^= 1 << bit
    path.write_bytes(bytes(b))


def header_pos(path: Path, needle: str) -> int:
    """Absolute file position of the first character of `needle`'s value inside the header."""
    raw = path.read_bytes()
    start, _ = layout(path)
    i = raw.index(needle.encode(), 8)
    assert i < start
    return i + len(needle)


def as_np(states) -> list[tuple[np.ndarray, np.ndarray]]:
    """(K, V) of each layer state, as numpy."""
    return [(np.array(st.keys), np.array(st.values)) for st in states]


@pytest.fixture
def snap(tmp_path, tiny_model):
    """A snapshot of a 2-layer cache holding TEXT; returns (path, ids, cache, arrays)."""
    tok = tiny_model.tokenizer
    agent = Agent("technical", "technical", "Technical", "system")
    ids = tok.encode(TEXT)
    prefill(tiny_model.model, agent, ids)
    path = tmp_path / "kv.safetensors"
    info = write_snapshot(path, agent.cache, ids, tiny_model.identity, "technical")
    assert info.tokens == len(ids) and info.bytes == path.stat().st_size
    arrays = as_np(kvcache.layer_states(agent.cache))
    return path, ids, agent.cache, arrays


def expect(exc_type, check: str, path: Path, identity, ids, *words: str,
           prefix: bool = False) -> SnapshotInvalid:
    with pytest.raises(exc_type) as ei:
        read_snapshot(path, identity, ids, prefix=prefix)
    err = ei.value
    assert err.check == check, f"expected the {check} check to fail, got {err.check}: {err}"
    msg = str(err)
    assert f"{check} check failed" in msg and str(path) in msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return err


# ---- unit: round trip ---------------------------------------------------------------------------
def test_round_trip_is_bit_exact_and_continues_identically(snap, tiny_model):
    path, ids, cache, arrays = snap
    pairs, got_ids, meta = read_snapshot(path, tiny_model.identity, ids)
    assert got_ids == ids
    assert meta["identity"] == tiny_model.identity.fingerprint and meta["tokens"] == str(len(ids))
    for (k, v), (rk, rv) in zip(as_np(pairs), arrays, strict=True):
        assert np.array_equal(k, rk) and np.array_equal(v, rv)
    restored = attach(tiny_model.model, pairs)
    assert kvcache.offsets(restored) == [len(ids)] * len(restored)
    nxt = mx.array([[ids[-1]]])
    a = tiny_model.model(nxt, cache=cache)
    b = tiny_model.model(nxt, cache=restored)
    assert mx.array_equal(a, b).item(), "logits after restore differ from the live cache's"


def test_format_1_snapshot_still_loads(snap, tiny_model, tmp_path):
    """Snapshots written before per-layer meta (permeant-kv/1: every layer's full K/V) attach."""
    path, ids, cache, arrays = snap
    old = tmp_path / "v1.safetensors"
    tensors = {"token_ids": mx.array(np.asarray(ids, dtype=np.int32))}
    ordered = []
    for i, (k, v) in enumerate(arrays):
        tensors[f"k.{i}"], tensors[f"v.{i}"] = mx.array(k), mx.array(v)
        ordered += [tensors[f"k.{i}"], tensors[f"v.{i}"]]
    meta = {"format": "permeant-kv/1", "agent": "technical",
            "identity": tiny_model.identity.fingerprint, "model": tiny_model.identity.name,
            "tokens": str(len(ids)), "tokens_digest": snapmod.ids_digest(ids),
            "kv_dtype": tiny_model.identity.kv_dtype, "layers": str(len(arrays)),
            "checksum": snapmod._tensor_checksum(ordered), "created": "0"}
    mx.save_safetensors(str(old), tensors, metadata=meta)
    states, got, _ = read_snapshot(old, tiny_model.identity, ids)
    assert got == ids and [s.length for s in states] == [len(ids)] * len(arrays)
    restored = attach(tiny_model.model, states)
    nxt = mx.array([[ids[-1]]])
    assert mx.array_equal(tiny_model.model(nxt, cache=kvcache.copy_cache(cache)),
                          tiny_model.model(nxt, cache=restored)).item()
    tensors["k.1"] = tensors["k.1"][..., :-1, :]  # the old layout check still holds
    ordered[2] = tensors["k.1"]
    meta["checksum"] = snapmod._tensor_checksum(ordered)
    old.unlink()
    mx.save_safetensors(str(old), tensors, metadata=meta)
    expect(SnapshotCorrupt, "layout", old, tiny_model.identity, ids, "token count")


def test_atomic_write_keeps_the_old_snapshot_on_failure(snap, tiny_model, monkeypatch):
    path, ids, cache, _ = snap
    before = path.read_bytes()

    def boom(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(snapmod.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_snapshot(path, cache, ids[:10], tiny_model.identity, "technical")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name], "a temp file was left behind"
    read_snapshot(path, tiny_model.identity, ids)


def test_stale_temp_files_of_dead_processes_are_removed(snap, tiny_model):
    path, ids, cache, _ = snap
    dead = path.with_name(f".{path.name}.999999999.safetensors")  # no such pid
    dead.write_bytes(b"half a snapshot")
    write_snapshot(path, cache, ids, tiny_model.identity, "technical")
    assert not dead.exists()
    read_snapshot(path, tiny_model.identity, ids)


# ---- unit: every kind of damage names its check -----------------------------------------------
def test_missing(tmp_path, tiny_model):
    expect(SnapshotInvalid, "exists", tmp_path / "kv.safetensors", tiny_model.identity, None)


def test_empty(snap, tiny_model):
    path, ids, *_ = snap
    path.write_bytes(b"")
    expect(SnapshotCorrupt, "format", path, tiny_model.identity, ids, "empty")


@pytest.mark.parametrize("where", ["in-length", "in-header", "end-of-header", "in-data",
                                   "last-byte"])
def test_truncated(snap, tiny_model, where):
    path, ids, *_ = snap
    start, _ = layout(path)
    size = path.stat().st_size
    cut = {"in-length": 5, "in-header": start // 2, "end-of-header": start,
           "in-data": (start + size) // 2, "last-byte": size - 1}[where]
    path.write_bytes(path.read_bytes()[:cut])
    expect(SnapshotCorrupt, "format", path, tiny_model.identity, ids)


def test_trailing_garbage(snap, tiny_model):
    path, ids, *_ = snap
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    expect(SnapshotCorrupt, "format", path, tiny_model.identity, ids, "truncated")


def test_bit_flip_in_kv_data(snap, tiny_model):
    path, ids, *_ = snap
    start, header = layout(path)
    for name in ("k.0", "v.1"):
        a, b = header[name]["data_offsets"]
        flip(path, start + (a + b) // 2, 3)
        expect(SnapshotCorrupt, "checksum", path, tiny_model.identity, ids, "bit rot")
        flip(path, start + (a + b) // 2, 3)  # undo
    read_snapshot(path, tiny_model.identity, ids)


def test_bit_flip_in_token_ids(snap, tiny_model):
    path, ids, *_ = snap
    start, header = layout(path)
    a, _ = header["token_ids"]["data_offsets"]
    flip(path, start + a + 4, 0)  # the second token id, low bit
    expect(SnapshotCorrupt, "tokens", path, tiny_model.identity, None, "digest")


@pytest.mark.parametrize("needle,check,exc", [
    ('"checksum":"', "checksum", SnapshotCorrupt),
    ('"tokens_digest":"', "tokens", SnapshotCorrupt),
    ('"tokens":"', "tokens", SnapshotCorrupt),  # the count itself: must not raise ValueError
    ('"identity":"', "identity", ModelMismatch),
    ('"format":"', "format", SnapshotCorrupt),
    ('"data_offsets":[', "format", SnapshotCorrupt),
    ('"shape":[1,', "format", SnapshotCorrupt),
])
def test_bit_flip_in_header_field(snap, tiny_model, needle, check, exc):
    path, ids, *_ = snap
    flip(path, header_pos(path, needle), 6)  # '4' -> 't', 'a' -> '!', ... stays valid JSON
    expect(exc, check, path, tiny_model.identity, ids)


def test_bit_flip_in_header_json_syntax(snap, tiny_model):
    path, ids, *_ = snap
    flip(path, 8, 1)  # the opening '{' -> 'y'
    expect(SnapshotCorrupt, "format", path, tiny_model.identity, ids, "unreadable header")


def test_every_header_bit_flip_is_rejected_or_changes_nothing(snap, tiny_model, tmp_path):
    """Flip one bit at every position of the length prefix and the header: read_snapshot either
    raises SnapshotInvalid or returns exactly the original data (a flip in a display-only field
    such as `created` or `model`). Never another exception, never different K/V or ids."""
    path, ids, _, arrays = snap
    raw = path.read_bytes()
    start, _ = layout(path)
    probe = tmp_path / "probe.safetensors"
    rejected = harmless = 0
    for pos in range(start):
        b = bytearray(raw)
        b[pos] ^= 1 << (pos % 8)
        probe.write_bytes(bytes(b))
        try:
            pairs, got, _ = read_snapshot(probe, tiny_model.identity, ids)
        except SnapshotInvalid:
            rejected += 1
            continue
        assert got == ids
        for (k, v), (rk, rv) in zip(as_np(pairs), arrays, strict=True):
            assert np.array_equal(k, rk) and np.array_equal(v, rv), f"flip at {pos} accepted"
        harmless += 1
    assert rejected > 0.7 * start, (rejected, harmless)


def test_every_kv_byte_is_covered_by_the_checksum(snap, tiny_model):
    path, ids, *_ = snap
    start, header = layout(path)
    size = path.stat().st_size
    raw = path.read_bytes()
    rng = np.random.default_rng(0)
    for pos in rng.integers(start, size, 40):
        b = bytearray(raw)
        b[pos] ^= 1 << int(pos % 8)
        path.write_bytes(bytes(b))
        with pytest.raises(SnapshotCorrupt) as ei:
            read_snapshot(path, tiny_model.identity, ids)
        a, e = header["token_ids"]["data_offsets"]
        assert ei.value.check == ("tokens" if start + a <= pos < start + e else "checksum")


def test_other_model(snap, tiny_model):
    path, ids, *_ = snap
    other = make_tiny_model(tiny_model.tokenizer, seed=1)
    assert other.identity.fingerprint != tiny_model.identity.fingerprint
    err = expect(ModelMismatch, "identity", path, other.identity, ids, "tiny-random-0",
                 "tiny-random-1")
    assert "loaded model" in str(err)


def test_stale_and_different_token_ids(snap, tiny_model):
    path, ids, *_ = snap
    expect(SnapshotInvalid, "tokens", path, tiny_model.identity, ids + [42, 43], "stale",
           f"holds {len(ids)} tokens", f"has {len(ids) + 2}")
    other = list(ids)
    other[3] += 1
    err = expect(SnapshotInvalid, "tokens", path, tiny_model.identity, other, "differ")
    assert "stale" not in err.detail
    # Asked for a prefix (what a restart does), the stale snapshot loads with its own ids; one
    # whose ids are not the transcript's first ones still does not.
    _, got, _ = read_snapshot(path, tiny_model.identity, ids + [42, 43], prefix=True)
    assert got == ids
    expect(SnapshotInvalid, "tokens", path, tiny_model.identity, other + [42], "differ",
           prefix=True)
    expect(SnapshotInvalid, "tokens", path, tiny_model.identity, ids[:-1], "differ", prefix=True)


def test_header_reader_bounds(snap):
    path, *_ = snap
    assert read_header(path)["__metadata__"]["format"] == snapmod.FORMAT
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", 1 << 40)  # a header length far beyond the file
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotCorrupt, match="does not fit"):
        read_header(path)


# ---- integration: the engine rebuilds from the transcript -------------------------------------
MSGS = ("Our payment API returns 502 errors under load.", "Which service should we look at first?",
        "What would you log to confirm it?", "And after the fix?")
MAX_TOKENS = 10


def kv_now(engine: Engine, agent_id: str) -> tuple[list[int], list]:
    """(token ids, [(K, V) per layer]) of the agent's live cache, copied off the worker."""
    def grab(ctx):
        a = ctx.workspace.agent(agent_id)
        return list(a.cache_ids), as_np(kvcache.layer_states(a.cache, len(a.cache_ids)))

    return engine.call(grab).result(60)


def session(folder: Path, loaded, msgs, agent="technical", **kw):
    """A fresh Engine (a restart) on `folder`: run `msgs` on `agent`, return (results, events, kv)."""
    events: list = []
    engine = Engine(folder, loaded=loaded, eager_restore=False, on_event=events.append, **kw)
    engine.start()
    try:
        engine.wait_ready(60)
        results = [engine.submit_future(agent, m, max_tokens=MAX_TOKENS)[1].result(120)
                   for m in msgs]
        kv = kv_now(engine, agent)
    finally:
        engine.shutdown()
    return results, events, kv


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model):
    """A workspace with two saved turns, and an uninterrupted 4-turn run as the reference."""
    root = tmp_path_factory.mktemp("corrupt")
    ref, _, ref_kv = session(root / "ref", tiny_model, MSGS)
    two, _, _ = session(root / "two", tiny_model, MSGS[:2])
    assert [r.generated_ids for r in two] == [r.generated_ids for r in ref[:2]]
    stale_line = (root / "ref/agents/technical/transcript.jsonl").read_bytes().splitlines()[2]
    # The same transcript, snapshotted by another model (identity is the only check that differs).
    other = make_tiny_model(tiny_model.tokenizer, seed=1)
    shutil.copytree(root / "two", root / "other")
    (root / "other/agents/technical/kv.safetensors").unlink()
    e = Engine(root / "other", loaded=other, eager_restore=False)
    e.start()
    e.wait_ready(60)
    e.restore("technical").result(60)
    e.shutdown()  # saves the rebuilt agent with the other model's identity
    return {"root": root, "ref": ref, "ref_kv": ref_kv, "stale_line": stale_line,
            "other_snapshot": root / "other/agents/technical/kv.safetensors"}


def _corrupt(kind: str, snap_path: Path, base) -> None:
    start, header = layout(snap_path)
    if kind == "truncated":
        snap_path.write_bytes(snap_path.read_bytes()[: snap_path.stat().st_size - 100])
    elif kind == "bitflip-data":
        a, b = header["v.0"]["data_offsets"]
        flip(snap_path, start + (a + b) // 2, 5)
    elif kind == "bitflip-header":
        flip(snap_path, header_pos(snap_path, '"checksum":"'), 0)
    elif kind == "empty":
        snap_path.write_bytes(b"")
    elif kind == "other-model":
        shutil.copyfile(base["other_snapshot"], snap_path)
    elif kind == "stale":
        transcript = snap_path.with_name("transcript.jsonl")
        with open(transcript, "ab") as f:
            f.write(base["stale_line"] + b"\n")
    else:
        raise AssertionError(kind)


def test_stale_snapshot_is_attached_and_only_the_missing_turn_prefilled(base, tiny_model,
                                                                          tmp_path):
    """A turn recorded after the last durable save (a crash between the two): the snapshot's
    ids are the transcript's first ones, so it is attached and only the last turn prefilled."""
    folder = tmp_path / "ws"
    shutil.copytree(base["root"] / "two", folder)
    d = folder / "agents/technical"
    _corrupt("stale", d / "kv.safetensors", base)
    held = len(read_snapshot(d / "kv.safetensors", tiny_model.identity, None)[1])
    want = len(Workspace.open(folder).agent("technical").expected_ids(tiny_model.tokenizer))
    results, events, kv = session(folder, tiny_model, [MSGS[3]])
    [restored] = [e for e in events if isinstance(e, AgentRestored)]
    assert (restored.source, restored.reason, restored.tokens, restored.prefilled) == \
        ("snapshot", None, want, want - held)
    assert results[0].generated_ids == base["ref"][3].generated_ids
    (ids, kv), (ref_ids, ref_kv) = kv, base["ref_kv"]
    assert ids == ref_ids
    for (k, v), (rk, rv) in zip(kv, ref_kv, strict=True):
        np.testing.assert_allclose(k, rk, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(v, rv, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,check,words", [
    ("truncated", "format", ["truncated"]),
    ("bitflip-data", "checksum", ["checksum"]),
    ("bitflip-header", "checksum", ["checksum"]),
    ("empty", "format", ["empty"]),
    ("other-model", "identity", ["tiny-random-1", "tiny-random-0"]),
])
def test_damaged_snapshot_is_rebuilt_by_prefill(base, tiny_model, tmp_path, kind, check, words):
    folder = tmp_path / "ws"
    shutil.copytree(base["root"] / "two", folder)
    d = folder / "agents/technical"
    _corrupt(kind, d / "kv.safetensors", base)
    transcript_before = (d / "transcript.jsonl").read_bytes()
    done = 2
    results, events, kv = session(folder, tiny_model, [MSGS[done]])
    r = results[0]

    restored = [e for e in events if isinstance(e, AgentRestored) and e.agent_id == "technical"]
    assert len(restored) == 1 and restored[0].source == "prefill", restored
    reason = restored[0].reason or ""
    assert reason.startswith(f"{check} check failed"), reason
    for w in words:
        assert w in reason, (w, reason)
    # (The TUI and the CLI turn AgentRestored.reason into the message a person sees.)
    assert not [e for e in events if isinstance(e, Notice) and e.level == "error"]
    assert r.source == "prefill"

    # The transcript is intact: the old bytes, then exactly one new line.
    after = (d / "transcript.jsonl").read_bytes()
    assert after.startswith(transcript_before)
    new_lines = after[len(transcript_before):].splitlines()
    assert len(new_lines) == 1
    assert Turn.from_json(json.loads(new_lines[0])).generated_ids == r.generated_ids

    # The next reply equals the undamaged run's, and so does the KV state (up to float noise:
    # a one-shot prefill and incremental turns add in a different order).
    ref = base["ref"][done]
    assert r.generated_ids == ref.generated_ids and r.reply == ref.reply
    (ids, kv), (ref_ids, ref_kv) = kv, base["ref_kv"]
    n = common_prefix(ids, ref_ids)
    assert n >= len(ids) - r.generated, (n, len(ids))  # at least the whole prompt of this turn
    for (k, v), (rk, rv) in zip(kv, ref_kv, strict=True):
        np.testing.assert_allclose(k[..., :n, :], rk[..., :n, :], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(v[..., :n, :], rv[..., :n, :], rtol=1e-4, atol=1e-5)

    # The rebuilt agent was saved again: a valid snapshot matching the transcript.
    agent = Workspace.open(folder).agent("technical")
    read_snapshot(d / "kv.safetensors", tiny_model.identity,
                  agent.expected_ids(tiny_model.tokenizer))
