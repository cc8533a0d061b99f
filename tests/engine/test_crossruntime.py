"""`permeant usxf attach|capture --runtime llamacpp` end to end on the embedded model.

The handlers run in this process through the parsers `cli.crossruntime.register` adds (their
reports printed, errors raised as typed exceptions); one test goes through the `permeant`
command to check the wiring. Needs llama-cpp-python (`make test` installs it)."""

import argparse
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from permeant_tui.cli import crossruntime
from permeant_tui.engine.errors import ContextExhausted, UsxfInvalid
from permeant_tui.engine.llamacpp import attach_usxf
from permeant_tui.engine.usxf import PROBE_N

CLI = [sys.executable, "-m", "permeant_tui.cli"]


def run(*args, check=True):
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def usxf(*argv) -> int:
    """Parse `permeant usxf ARGV` with the module's own parsers and run its handler."""
    ap = argparse.ArgumentParser(prog="permeant usxf")
    crossruntime.register(ap.add_subparsers(dest="usxf_cmd", required=True))
    args = ap.parse_args([str(a) for a in argv])
    return args.func(args)


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
    assert "reply: " in captured["stdout"]
    r = run("import", captured["file"], "--workspace", captured["ws"], "--check-fidelity")
    assert "imported" in r.stdout
    # llama.cpp decoded the probe; MLX replays it on the attached state.
    assert f"fidelity: exact {PROBE_N}/{PROBE_N}" in r.stdout or "fidelity: diverged at" in r.stdout
    chat = run("chat", "captured", "And how do we fix it?", "--workspace", captured["ws"],
               "--json", "--max-tokens", "4")
    res = json.loads(chat.stdout)
    assert res["source"] in ("usxf", "snapshot")  # snapshot when --check-fidelity saved it
    assert res["tokens"]["cached"] > 40  # the captured state was reused, not re-prefilled


def test_attach_in_llamacpp_continues(captured, capsys):
    assert usxf("attach", captured["file"], "--runtime", "llamacpp", "--workspace",
                captured["ws"], "--continue", "8") == 0
    out = capsys.readouterr().out
    assert "warm start: attach est" in out and "re-prefill est" in out
    assert "continued 8 tokens in llama.cpp" in out
    # The captured probe was decoded by llama.cpp itself, in this run: attached back, it must
    # reproduce exactly (same build, same kernels, the f32 state restored bit for bit).
    assert f"{PROBE_N}/{PROBE_N} of the exporter's probe tokens reproduced" in out


def test_attach_report(captured):
    """The bridge returns what it did; it prints nothing."""
    from permeant_tui.engine.usxf.keys import WorkspaceKeys

    keys = WorkspaceKeys(captured["ws"] / "keys")
    r = attach_usxf(captured["file"], _embedded_gguf(), 4, keys, threads=1)
    assert len(r.continued) == 4 and isinstance(r.text, str)
    assert r.probe is not None and (r.probe.matched, r.probe.n) == (PROBE_N, PROBE_N)
    assert r.tokens > 40 and r.blob_bytes > 0 and r.decision in ("attach", "re-prefill")
    assert r.attach_ms > 0 and r.estimate_prefill_ms > 0


def test_attach_refuses_tampered_file_and_exhausted_context(captured):
    data = bytearray(captured["file"].read_bytes())
    data[-100] ^= 0x10
    bad = captured["dir"] / "bad.usxf"
    bad.write_bytes(bytes(data))
    with pytest.raises(UsxfInvalid, match="chunk-checksum"):
        usxf("attach", bad, "--runtime", "llamacpp", "--workspace", captured["ws"])
    with pytest.raises(ContextExhausted, match="context exhausted"):
        usxf("attach", captured["file"], "--runtime", "llamacpp", "--workspace",
             captured["ws"], "--continue", "100000")


def test_cli_prints_one_line_errors(captured):
    """Through the `permeant` command: a typed error is one line on stderr, no traceback."""
    r = run("usxf", "attach", captured["file"], "--runtime", "llamacpp", "--workspace",
            captured["ws"], "--continue", "100000", check=False)
    assert r.returncode != 0 and "context exhausted" in r.stderr and "Traceback" not in r.stderr


def _embedded_gguf():
    from permeant_tui.engine.models import default_model_path

    return default_model_path()


def _write(tmp_path, ident):
    from permeant_tui.engine.usxf import AgentRecord, KVPayload, write_usxf
    from permeant_tui.engine.usxf.keys import WorkspaceKeys

    n = 5
    shape = (ident.n_kv_heads, n, ident.head_dim)
    kv = KVPayload([np.zeros(shape, np.float32)] * ident.n_layers,
                   [np.zeros(shape, np.float32)] * ident.n_layers, "float32")
    keys = WorkspaceKeys(tmp_path / "ws" / "keys")
    keys.ensure()
    f = tmp_path / "tiny.usxf"
    write_usxf(f, identity=ident, token_ids=[1, 2, 3, 4, 5], kv=kv,
               agent=AgentRecord("t", "technical", "T", "", []), keys=keys)
    return f


def test_attach_refuses_a_state_from_another_model(tmp_path, tiny_model):
    """A file whose identity is not the GGUF's is refused before anything is attached."""
    f = _write(tmp_path, tiny_model.identity)
    with pytest.raises(UsxfInvalid, match="model-identity") as exc:
        usxf("attach", f, "--runtime", "llamacpp", "--workspace", tmp_path / "ws")
    assert "n_layers" in str(exc.value)


def test_attach_refuses_a_file_whose_layer_windows_differ(tmp_path):
    """The file's per-layer windows (USXF 1.1 attention.layers) must be the GGUF's as llama.cpp
    runs it: a state of sliding layers is refused for a full-attention GGUF, with one line."""
    from permeant_tui.engine.llamacpp import gguf_identity

    ident, _, windows = gguf_identity(_embedded_gguf())
    assert windows == [0] * ident.n_layers
    layers = [{"type": "sliding", "window": 64, "rope": {"base": ident.rope_theta}}] * \
        ident.n_layers
    f = _write(tmp_path, dataclasses.replace(ident, attention=json.dumps(layers)))
    with pytest.raises(UsxfInvalid, match="sliding windows") as exc:
        usxf("attach", f, "--runtime", "llamacpp", "--workspace", tmp_path / "ws")
    assert "\n" not in str(exc.value)


# --- Gemma 3 270M: sliding-window layers, llama.cpp's iSWA state, past the 512-token window --

@pytest.fixture(scope="module")
def gemma_captured(tmp_path_factory):
    """llama.cpp prefills a ~700-token prompt (past the window) and answers; its state (the
    SWA cache: the last 512 cells) is written as USXF."""
    d = tmp_path_factory.mktemp("xrt-gemma")
    prompt = d / "prompt.txt"
    prompt.write_text(" ".join(
        f"Incident note {i}: the payment API returned 502 errors while the connection pool "
        f"of 20 was exhausted and retries doubled the load." for i in range(24))
        + " What is the root cause?")
    out = d / "gemma.usxf"
    assert usxf("capture", "--runtime", "llamacpp", "--gguf", "gemma3-270m", "--prompt-file",
                prompt, "-o", out, "--workspace", d / "ws", "--max-tokens", "8",
                "--threads", "1") == 0
    return {"ws": d / "ws", "file": out}


@pytest.mark.real_model
def test_gemma_capture_attach_and_import_past_the_window(gemma_captured, capsys):
    from permeant_tui.engine.usxf import read_usxf
    from permeant_tui.engine.usxf.keys import WorkspaceKeys

    ws, f = gemma_captured["ws"], gemma_captured["file"]
    got = read_usxf(f, trusted=WorkspaceKeys(ws / "keys"))
    n = got.n_tokens
    kv = got.load_kv()
    windows = got.identity.layer_windows()
    assert n > 600 and windows.count(512) == 15
    assert [k.shape[1] for k in kv.keys] == [min(n, w) if w else n for w in windows]
    # attached back in llama.cpp, the probe llama.cpp decoded at capture reproduces exactly
    assert usxf("attach", f, "--runtime", "llamacpp", "--gguf", "gemma3-270m", "--workspace",
                ws, "--continue", "4", "--threads", "1") == 0
    out = capsys.readouterr().out
    assert f"{PROBE_N}/{PROBE_N} of the exporter's probe tokens reproduced" in out, out
    # and in MLX: imported (window layers rebuilt as rotating caches) and continued from it
    r = run("import", f, "--workspace", ws, "--model", "gemma3-270m", "--check-fidelity")
    assert "imported" in r.stdout
    assert f"fidelity: exact {PROBE_N}/{PROBE_N}" in r.stdout or "fidelity: diverged at" in r.stdout
    chat = run("chat", "captured", "And the fix?", "--workspace", ws, "--model", "gemma3-270m",
               "--json", "--max-tokens", "2")
    res = json.loads(chat.stdout)
    assert res["tokens"]["cached"] >= n  # the captured state was attached, not re-prefilled
