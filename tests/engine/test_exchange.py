"""Export an agent as USXF, import it elsewhere, continue exactly; refuse anything unverified."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import make_tiny_model

from permeant_tui.engine.errors import UsxfInvalid
from permeant_tui.engine.exchange import PROBE_N
from permeant_tui.engine.worker import Engine


def _engine(path, lm):
    e = Engine(path, loaded=lm, eager_restore=False)
    e.start()
    e.wait_ready(60)
    return e


def keys_of(engine):
    """The workspace's signing key and trusted keys."""
    from permeant_tui.engine.usxf.keys import WorkspaceKeys

    return WorkspaceKeys(engine.call(lambda ctx: ctx.workspace.keys_dir).result(60))


def agent_ids(engine) -> set[str]:
    return {a.agent_id for a in engine.agents()}


@pytest.fixture
def source(tmp_path, tiny_model):
    e = _engine(tmp_path / "src", tiny_model)
    e.submit_future("technical", "We have a critical API bug.", max_tokens=10)[1].result(60)
    e.submit_future("technical", "What first?", max_tokens=10)[1].result(60)
    yield e
    e.shutdown()


@pytest.mark.parametrize("quant", ["none", "f16", "bf16", "int8"])
def test_export_import_continues_like_the_source(source, tmp_path, tiny_model, quant):
    out = tmp_path / f"tech-{quant}.usxf"
    info = source.export("technical", str(out), quant).result(60)
    assert out.exists() and info.size == out.stat().st_size

    # The same continuation on the source (reference) ...
    ref = source.submit_future("technical", "And then?", max_tokens=10)[1].result(60)

    target = _engine(tmp_path / "dst", tiny_model)
    # Trust the source's key (each workspace has its own).
    keys_of(target).ensure()
    keys_of(target).trust(keys_of(source).public_key_text)
    report = target.import_usxf(str(out), "migrated").result(60)
    assert report["tokens"] == info.n_tokens > 0
    fid = target.replay_fidelity("migrated").result(60)
    got = target.submit_future("migrated", "And then?", max_tokens=10)[1].result(60)
    target.shutdown()
    assert got.source == "usxf"
    assert got.cached == ref.cached  # every imported token reused, nothing re-prefilled
    if quant == "none":
        assert fid == f"exact {PROBE_N}/{PROBE_N}"
        assert got.generated_ids == ref.generated_ids


def test_import_refuses_untrusted_key_and_changes_nothing(source, tmp_path, tiny_model):
    out = tmp_path / "t.usxf"
    source.export("technical", str(out)).result(60)
    target = _engine(tmp_path / "dst", tiny_model)
    before = sorted(p.name for p in (tmp_path / "dst").rglob("*"))
    with pytest.raises(UsxfInvalid, match="untrusted"):
        target.import_usxf(str(out)).result(60)
    assert sorted(p.name for p in (tmp_path / "dst").rglob("*") if "keys" not in str(p)) == \
        [n for n in before if n not in ("keys",) and not n.endswith((".key", ".pub"))]
    assert agent_ids(target) == {"technical", "business", "coordinator"}
    target.shutdown()


def test_import_refuses_another_model(source, tmp_path, tiny_model):
    out = tmp_path / "t.usxf"
    source.export("technical", str(out)).result(60)
    other = make_tiny_model(tiny_model.tokenizer, seed=7)
    target = _engine(tmp_path / "dst", other)
    keys_of(target).ensure()
    keys_of(target).trust(keys_of(source).public_key_text)
    with pytest.raises(UsxfInvalid, match="model-identity"):
        target.import_usxf(str(out), "x").result(60)
    assert "x" not in agent_ids(target) and not (tmp_path / "dst" / "agents" / "x").exists()
    target.shutdown()


def test_perturbed_payload_is_caught_and_changes_the_probe(source, tmp_path, tiny_model):
    """Negative control: flipping payload bytes is caught by checksum; with the checksums
    recomputed (re-signed as the source), the probe no longer matches."""
    from permeant_tui.engine.exchange import compare_probe
    from permeant_tui.engine.snapshot import attach
    from permeant_tui.engine.usxf import KVPayload, read_usxf, write_usxf

    out = tmp_path / "t.usxf"
    source.export("technical", str(out)).result(60)
    data = bytearray(out.read_bytes())
    data[-200] ^= 0xFF
    bad = tmp_path / "bad.usxf"
    bad.write_bytes(bytes(data))
    with pytest.raises(UsxfInvalid):
        read_usxf(bad, trusted=keys_of(source))

    f = read_usxf(out, trusted=keys_of(source))
    kv = f.load_kv()
    rng = np.random.default_rng(0)
    shuffled = KVPayload([rng.permutation(k, axis=1) for k in kv.keys],
                         [rng.permutation(v, axis=1) for v in kv.values], kv.dtype)
    forged = tmp_path / "forged.usxf"
    write_usxf(forged, identity=f.identity, token_ids=f.token_ids, kv=shuffled, agent=f.agent,
               keys=keys_of(source), fidelity=f.fidelity)
    g = read_usxf(forged, trusted=keys_of(source))  # verifies: checksums redone

    def probe(file):
        import mlx.core as mx

        from permeant_tui.engine.agent import Agent

        kvp = file.load_kv()
        a = Agent("p", "p", "p", "")
        a.cache = attach(tiny_model.model, [(mx.array(k)[None], mx.array(v)[None])
                                            for k, v in zip(kvp.keys, kvp.values, strict=False)])
        a.cache_ids = list(file.token_ids)
        return compare_probe(tiny_model, a, file.fidelity)

    assert probe(f) == f"exact {PROBE_N}/{PROBE_N}"
    assert probe(g).startswith("diverged at")


def test_usxf_verify_cli_exit_codes(source, tmp_path):
    out = tmp_path / "t.usxf"
    source.export("technical", str(out)).result(60)
    ws = str(source.folder)
    ok = subprocess.run([sys.executable, "-m", "permeant_tui.cli", "usxf", "verify", str(out),
                         "--workspace", ws], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")
    other = subprocess.run([sys.executable, "-m", "permeant_tui.cli", "usxf", "verify", str(out),
                            "--workspace", str(tmp_path / "elsewhere")],
                           capture_output=True, text=True)
    assert other.returncode != 0 and "not trusted" in other.stderr
    data = bytearray(out.read_bytes())
    data[10] ^= 1
    (tmp_path / "b.usxf").write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "permeant_tui.cli", "usxf", "verify",
                          str(tmp_path / "b.usxf"), "--workspace", ws],
                         capture_output=True, text=True)
    assert bad.returncode not in (0, 6) and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
