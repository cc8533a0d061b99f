"""`permeant usxf attach|capture --runtime llamacpp` end to end on the embedded model."""

import subprocess
import sys

import pytest

from permeant_tui.engine.exchange import PROBE_N

CLI = [sys.executable, "-m", "permeant_tui.cli"]


def run(*args, check=True):
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    d = tmp_path_factory.mktemp("xrt")
    ws = d / "ws"
    prompt = d / "prompt.txt"
    prompt.write_text("Why might a database connection pool be exhausted?")
    out = d / "cap.usxf"
    r = run("usxf", "capture", "--runtime", "llamacpp", "--prompt-file", prompt, "-o", out,
            "--workspace", ws, "--max-tokens", "12")
    return {"ws": ws, "file": out, "stdout": r.stdout, "dir": d}


def test_capture_in_llamacpp_then_import_and_continue_in_mlx(captured):
    assert captured["file"].exists() and "captured" in captured["stdout"]
    r = run("import", captured["file"], "--workspace", captured["ws"], "--check-fidelity")
    assert "imported" in r.stdout
    # llama.cpp decoded the probe; MLX replays it on the attached state.
    assert f"fidelity: exact {PROBE_N}/{PROBE_N}" in r.stdout or "fidelity: diverged at" in r.stdout
    import json

    chat = run("chat", "captured", "And how do we fix it?", "--workspace", captured["ws"],
               "--json", "--max-tokens", "4")
    res = json.loads(chat.stdout)
    assert res["source"] in ("usxf", "snapshot")  # snapshot when --check-fidelity saved it
    assert res["tokens"]["cached"] > 40  # the captured state was reused, not re-prefilled


def test_attach_in_llamacpp_continues(captured):
    r = run("usxf", "attach", captured["file"], "--runtime", "llamacpp", "--workspace",
            captured["ws"], "--continue", "8")
    assert "warm start: attach est" in r.stdout and "re-prefill est" in r.stdout
    assert "continued 8 tokens in llama.cpp" in r.stdout
    # The captured probe was decoded by llama.cpp itself: attached back, it must reproduce.
    assert f"{PROBE_N}/{PROBE_N} of the exporter's probe tokens reproduced" in r.stdout


def test_attach_refuses_tampered_file_and_exhausted_context(captured):
    data = bytearray(captured["file"].read_bytes())
    data[-100] ^= 0x10
    bad = captured["dir"] / "bad.usxf"
    bad.write_bytes(bytes(data))
    r = run("usxf", "attach", bad, "--runtime", "llamacpp", "--workspace", captured["ws"],
            check=False)
    assert r.returncode != 0 and "chunk-checksum" in r.stderr and "Traceback" not in r.stderr
    r = run("usxf", "attach", captured["file"], "--runtime", "llamacpp", "--workspace",
            captured["ws"], "--continue", "100000", check=False)
    assert r.returncode != 0 and "context exhausted" in r.stderr and "Traceback" not in r.stderr


def test_attach_refuses_a_state_from_another_model(tmp_path, tiny_model):
    """A file whose identity is not the GGUF's is refused before anything is attached."""
    import numpy as np

    from permeant_tui.engine.usxf import AgentRecord, KVPayload, write_usxf
    from permeant_tui.engine.usxf.keys import WorkspaceKeys

    ident = tiny_model.identity
    n = 5
    shape = (ident.n_kv_heads, n, ident.head_dim)
    kv = KVPayload([np.zeros(shape, np.float32)] * ident.n_layers,
                   [np.zeros(shape, np.float32)] * ident.n_layers, "float32")
    keys = WorkspaceKeys(tmp_path / "ws" / "keys")
    keys.ensure()
    f = tmp_path / "tiny.usxf"
    write_usxf(f, identity=ident, token_ids=[1, 2, 3, 4, 5], kv=kv,
               agent=AgentRecord("t", "technical", "T", "", []), keys=keys)
    r = run("usxf", "attach", f, "--runtime", "llamacpp", "--workspace", tmp_path / "ws",
            check=False)
    assert r.returncode != 0 and "model-identity" in r.stderr and "n_layers" in r.stderr
