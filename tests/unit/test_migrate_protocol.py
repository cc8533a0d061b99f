"""The migration protocol's pure parts: fingerprints, addresses, chunk ranges, the cost model,
request signing, the TLS certificate, and the start-up sweep of staged data (no server)."""

import json
import ssl

import pytest

from permeant_tui.engine.settings import AgentSpec, load_settings, save_settings
from permeant_tui.migrate.protocol import (
    MigrationError,
    decide,
    estimate_size,
    format_fingerprint,
    from_ranges,
    normalize_fingerprint,
    parse_hostport,
    signing_message,
    to_ranges,
)
from permeant_tui.migrate.staging import recover_staging
from permeant_tui.migrate.tls import ensure_server_cert, pem_fingerprint

SMOL = {"n_layers": 30, "n_kv_heads": 3, "head_dim": 64, "kv_dtype": "float32"}


def test_fingerprints_normalize_from_every_printed_form():
    hexfp = "ab" * 32
    for text in (hexfp, hexfp.upper(), format_fingerprint(hexfp), "sha256:" + hexfp,
                 " ".join(hexfp[i:i + 2] for i in range(0, 64, 2))):
        assert normalize_fingerprint(text) == hexfp
    for bad in ("", "ab" * 31, "zz" * 32, "md5:" + hexfp):
        with pytest.raises(MigrationError):
            normalize_fingerprint(bad)


def test_hostport():
    assert parse_hostport("example.org:8765") == ("example.org", 8765)
    assert parse_hostport("[::1]:9") == ("::1", 9)
    assert parse_hostport(":7") == ("127.0.0.1", 7)
    assert parse_hostport("8765") == ("127.0.0.1", 8765)
    for bad in ("host", "host:99999", "a:b:c", ""):
        with pytest.raises(MigrationError):
            parse_hostport(bad)


def test_ranges_round_trip():
    flags = [True, True, False, True, False, False, True]
    assert to_ranges(flags) == [[0, 2], [3, 4], [6, 7]]
    assert from_ranges(to_ranges(flags), len(flags)) == flags
    assert to_ranges([]) == [] and from_ranges([[0, 99]], 3) == [True] * 3


def test_cost_model_picks_the_cheaper_way_and_force_overrides():
    size = estimate_size(SMOL, 2048, "none")
    assert abs(size - 2048 * 46080) / size < 0.01  # float32 KV of the default model: 46 KB/token
    assert estimate_size(SMOL, 2048, "int8") < estimate_size(SMOL, 2048, "f16") < size
    slow_prefill = {"prefill_tok_s": 150.0, "verify_mb_s": 800.0}
    d = decide(2048, size, slow_prefill, link_mb_s=100.0)
    assert d.mode == "kv" and d.link_measured and d.reprefill_s == pytest.approx(2048 / 150)
    d = decide(2048, size, slow_prefill, link_mb_s=1.0)  # a thin link: 94 s against 14 s
    assert d.mode == "reprefill" and "re-prefill" in d.reason
    assert decide(2048, size, slow_prefill, 1.0, force="kv").mode == "kv"
    assert decide(2048, size, slow_prefill, 100.0, force="reprefill").mode == "reprefill"
    d = decide(2048, size, {}, None)  # nothing known: assume 50 MB/s, no prefill figure
    assert d.mode == "kv" and not d.link_measured and d.link_mb_s == 50.0


def test_signed_message_binds_every_field():
    base = ("PUT", "/migrations/ab/chunks/1", 1700000000, "0" * 32, "1" * 64, "2" * 64)
    msgs = {signing_message(*base)}
    for i in range(len(base)):
        changed = list(base)
        changed[i] = str(changed[i]) + "x" if i != 2 else base[2] + 1
        msgs.add(signing_message(*changed))
    assert len(msgs) == len(base) + 1


def test_server_certificate_is_made_once_with_a_private_key(tmp_path):
    a = ensure_server_cert(tmp_path / "tls")
    assert a.created and (a.key_path.stat().st_mode & 0o777) == 0o600
    assert a.fingerprint == pem_fingerprint(a.cert_path.read_bytes())
    b = ensure_server_cert(tmp_path / "tls")
    assert not b.created and b.fingerprint == a.fingerprint
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(b.cert_path, b.key_path)  # the pair matches


def test_start_up_sweep_rolls_back_unfinished_commits_only(tmp_path):
    ws = tmp_path / "ws"
    s = load_settings(ws)
    s.agents.append(AgentSpec("done", "r", "t", "s"))
    save_settings(ws, s)
    staging = ws / "migrate" / "staging"
    for mid, agent in (("a" * 32, "half"), ("b" * 32, "done"), ("c" * 32, None)):
        (staging / mid).mkdir(parents=True)
        (staging / mid / "file.usxf").write_bytes(b"x")
        if agent:
            (staging / mid / "commit.json").write_text(json.dumps({"agent": agent}))
            (ws / "agents" / agent).mkdir(parents=True)
    notes = recover_staging(ws)
    assert list(staging.iterdir()) == []
    assert not (ws / "agents" / "half").exists()  # never registered: rolled back
    assert (ws / "agents" / "done").exists()  # registered: the commit had completed
    assert any("rolled back" in n and "half" in n for n in notes)
