"""USXF 1.1 past the sliding window, for every architecture the engine supports: an agent whose
conversation has left the window exports (a sliding layer carries only its window, in logical
order, with its start), verifies, imports into another workspace and continues exactly as the
source does; a re-signed file with a tampered per-layer length or start is refused (check
`layout`) and changes nothing; a 1.0 file of a full-attention model still imports."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import msgpack
import numpy as np
import pytest
import xxhash
from support.tiny_models import SLIDING, WINDOW, tiny_model
from support.usxf_files import fix_header

from permeant_tui.engine import snapshot as snapmod
from permeant_tui.engine.errors import UsxfInvalid
from permeant_tui.engine.usxf import read_usxf, verify_usxf
from permeant_tui.engine.usxf.keys import WorkspaceKeys
from permeant_tui.engine.usxf.spec import HEADER, HEADER_SIZE, SIGNATURE_DOMAIN, payload_offset_for
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace

ARCHS = ["llama", "qwen2", "qwen3", "phi3", "gemma3_text", "gemma3_text_q4", "llama_swa"]
MSGS = ("Our payment API returns 502 errors under load.", "Which service should we look at first?",
        "What would you log to confirm it?", "And after the fix?")
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


def engine(folder: Path, lm) -> Engine:
    e = Engine(folder, loaded=lm, eager_restore=False)
    e.start()
    e.wait_ready(60)
    return e


def ask(e: Engine, agent: str, msg: str):
    return e.submit_future(agent, msg, max_tokens=MAX_TOKENS)[1].result(300)


def saved_logits(folder: Path, lm, agent_id: str) -> np.ndarray:
    """Next-token logits of an agent's saved snapshot (verified and attached here)."""
    agent = Workspace.open(folder).agent(agent_id)
    states, _, _ = snapmod.read_snapshot(folder / f"agents/{agent_id}/kv.safetensors",
                                         lm.identity, agent.expected_ids(lm.tokenizer))
    out = lm.model(mx.array([[198]]), cache=snapmod.attach(lm.model, states))
    return np.array(out[0, -1].astype(mx.float32))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """Per architecture: a source workspace whose agent is 3 turns past the window, the USXF
    file it exported, and the source's own continuation afterwards (the reference)."""
    root = tmp_path_factory.mktemp("usxf11")
    made: dict = {}

    def get(arch):
        if arch not in made:
            lm = tiny_model(arch, tok)[1]
            src = engine(root / arch / "src", lm)
            try:
                for m in MSGS[:3]:
                    r = ask(src, "technical", m)
                assert r.in_cache > 2 * WINDOW
                out = root / arch / "tech.usxf"
                info = src.export("technical", str(out)).result(300)
                ref = ask(src, "technical", MSGS[3])  # the export left the live cache alone
            finally:
                src.shutdown()
            made[arch] = (root / arch / "src", out, info, ref)
        return made[arch]

    return get


def target(folder: Path, lm, src_folder: Path) -> Engine:
    e = engine(folder, lm)
    keys = WorkspaceKeys(folder / "keys")
    keys.ensure()
    keys.trust(WorkspaceKeys(src_folder / "keys").public_key_text)
    return e


@pytest.mark.parametrize("arch", ARCHS)
def test_past_the_window_exports_imports_and_continues_like_the_source(tok, exported, tmp_path,
                                                                      arch):
    lm = tiny_model(arch, tok)[1]
    src, out, info, ref = exported(arch)
    n = info.n_tokens
    m = info.manifest
    assert m["version"] == [1, 1]
    windows = lm.identity.layer_windows()
    assert [x["window"] for x in m["attention"]["layers"]] == windows
    for t in m["kv"]["tensors"]:  # a sliding layer carries only its window, with its start
        w = windows[t["layer"]]
        stored = min(n, w) if w else n
        assert t["shape"][1] == stored and t["start"] == n - stored
    assert (arch in SLIDING) == any(windows) and (not any(windows) or n > 2 * WINDOW)

    f = verify_usxf(out, WorkspaceKeys(src / "keys"), expected_identity=lm.identity)
    kv = read_usxf(out, trusted=WorkspaceKeys(src / "keys")).load_kv()
    assert [k.shape[1] for k in kv.keys] == [min(n, w) if w else n for w in windows]
    assert f.fidelity is not None and f.fidelity.n > 0

    dst = target(tmp_path / "dst", lm, src)
    try:
        dst.import_usxf(str(out), "migrated").result(300)
        assert dst.replay_fidelity("migrated").result(300) == f"exact {f.fidelity.n}/{f.fidelity.n}"
        got = ask(dst, "migrated", MSGS[3])
    finally:
        dst.shutdown()
    assert got.source == "usxf" and got.cached == ref.cached == n
    assert got.generated_ids == ref.generated_ids
    np.testing.assert_allclose(saved_logits(tmp_path / "dst", lm, "migrated"),
                               saved_logits(src, lm, "technical"), atol=1e-4)


def sections(data: bytes) -> dict:
    h = HEADER.unpack(data[:HEADER_SIZE])
    ml, po, pl = h[5], h[8], h[9]
    return {"manifest": (64, 64 + ml), "payload": (po, po + pl)}


def resign(data: bytes, keys: WorkspaceKeys, mutate, minor: int | None = None) -> bytes:
    """Edit a file's manifest (and optionally its header's minor version) and sign it again:
    what a key holder can do. Only the semantic checks remain to catch the edit."""
    s = sections(data)
    m = msgpack.unpackb(data[s["manifest"][0]:s["manifest"][1]], raw=False)
    mutate(m)
    payload = data[s["payload"][0]:s["payload"][1]]
    for _ in range(4):
        mb = msgpack.packb(m, use_bin_type=True)
        po = payload_offset_for(len(mb), 96)
        if m["payload"]["offset"] == po:
            break
        m["payload"]["offset"] = po
    fields = {} if minor is None else {"minor": minor}
    head = fix_header(data[:HEADER_SIZE], manifest_len=len(mb), payload_offset=po,
                      payload_len=len(payload), manifest_xxh3=xxhash.xxh3_64_intdigest(mb),
                      **fields)
    prefix = head + mb + keys.public_key_bytes + keys.sign(SIGNATURE_DOMAIN + head + mb)
    return prefix + bytes(po - len(prefix)) + payload


def _sliding_tensor(m: dict) -> dict:
    layers = m["attention"]["layers"]
    return next(t for t in m["kv"]["tensors"] if layers[t["layer"]]["type"] == "sliding")


def _shorter(m: dict) -> None:  # one position fewer, sizes kept consistent
    t = _sliding_tensor(m)
    t["shape"][1] -= 1
    t["start"] += 1
    t["nbytes"] = int(np.prod(t["shape"])) * 4 if m["kv"]["source_dtype"] == "float32" \
        else int(np.prod(t["shape"])) * 2


@pytest.mark.parametrize("mutate,detail", [
    (lambda m: _sliding_tensor(m).__setitem__("start", _sliding_tensor(m)["start"] - 1), "start"),
    (_shorter, "shape"),
    (lambda m: m["attention"]["layers"][0].__setitem__("window", WINDOW * 2), "attention.layers"),
    (lambda m: m["attention"]["layers"][2].__setitem__("type", "sliding"), "attention.layers"),
    (lambda m: m["attention"].pop("layers"), "attention.layers"),
    (lambda m: _sliding_tensor(m).pop("start"), "start"),
])
def test_tampered_per_layer_length_or_start_is_refused(tok, exported, tmp_path, mutate, detail):
    lm = tiny_model("gemma3_text", tok)[1]
    src, out, _, _ = exported("gemma3_text")
    src_keys = WorkspaceKeys(src / "keys")
    bad = tmp_path / "bad.usxf"
    bad.write_bytes(resign(out.read_bytes(), src_keys, mutate))
    with pytest.raises(UsxfInvalid) as ei:
        read_usxf(bad, trusted=src_keys)
    assert ei.value.check == "layout" and detail in ei.value.detail, ei.value
    dst = target(tmp_path / "dst", lm, src)
    try:
        with pytest.raises(UsxfInvalid) as ei:
            dst.import_usxf(str(bad), "migrated").result(300)
        assert ei.value.check == "layout"
        assert "migrated" not in {a.agent_id for a in dst.agents()}
    finally:
        dst.shutdown()
    assert not (tmp_path / "dst/agents/migrated").exists()


def _as_1_0(m: dict) -> None:
    m["version"] = [1, 0]
    m["attention"].pop("layers")
    for t in m["kv"]["tensors"]:
        t.pop("start")


def test_a_1_0_file_of_a_full_attention_model_still_imports(tok, exported, tmp_path):
    lm = tiny_model("llama", tok)[1]
    src, out, info, ref = exported("llama")
    old = tmp_path / "old.usxf"
    old.write_bytes(resign(out.read_bytes(), WorkspaceKeys(src / "keys"), _as_1_0, minor=0))
    f = read_usxf(old, trusted=WorkspaceKeys(src / "keys"))
    assert f.manifest["version"] == [1, 0] and f.n_tokens == info.n_tokens
    dst = target(tmp_path / "dst", lm, src)
    try:
        dst.import_usxf(str(old), "migrated").result(300)
        got = ask(dst, "migrated", MSGS[3])
    finally:
        dst.shutdown()
    assert got.source == "usxf" and got.cached == ref.cached
    assert got.generated_ids == ref.generated_ids


def test_a_1_0_reader_rule_refuses_a_sliding_file_marked_1_0(tok, exported, tmp_path):
    """The same sliding-window file relabelled 1.0: a 1.0 reader expects every layer to hold
    every token, so it refuses it (check layout) rather than attach it wrongly."""
    src, out, _, _ = exported("gemma3_text")
    old = tmp_path / "old.usxf"
    old.write_bytes(resign(out.read_bytes(), WorkspaceKeys(src / "keys"), _as_1_0, minor=0))
    with pytest.raises(UsxfInvalid) as ei:
        read_usxf(old, trusted=WorkspaceKeys(src / "keys"))
    assert ei.value.check == "layout"

