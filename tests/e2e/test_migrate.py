"""Live migration over loopback: a real `permeant serve` process (started here on a free port,
killed at the end) and the real default model on both sides.

Covered: a full migration whose next greedy reply equals the source's; the CLI with --move; the
re-prefill path; a transfer cut mid-stream and resumed; a tampered chunk (and head) refused;
unknown keys, bad signatures, replays and stale clocks refused with a bare 401; malformed
requests answered 4xx; a certificate mismatch refused by the client; the target killed between
prepare and commit (nothing half-attached after restart); the source killed mid-transfer (the
staged data expires after the TTL).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import time

import pytest
from support.migrate_server import PYTHON, Server, send_raw, trusting_server

from permeant_tui.engine.exchange import PROBE_N
from permeant_tui.engine.usxf.keys import WorkspaceKeys
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace
from permeant_tui.migrate.protocol import (
    CertificateMismatch,
    MigrationError,
    RemoteRefused,
    Unauthorized,
    b64,
)
from permeant_tui.migrate.source import export_for_migration, migrate_agent
from permeant_tui.migrate.transport import MigrationClient

CHUNK = 1 << 20  # ~100 tokens of the default model's KV (46 KB/token) = 5 chunks


@pytest.fixture(scope="module")
def source(tmp_path_factory, real_model):
    """A source workspace whose technical agent has two turns (real model, greedy)."""
    folder = tmp_path_factory.mktemp("src")
    e = Engine(folder, loaded=real_model, eager_restore=False)
    e.start()
    e.wait_ready(120)
    e.submit_future("technical", "We have a critical API bug: payments time out.",
                    max_tokens=12)[1].result(300)
    e.submit_future("technical", "What do we check first?", max_tokens=12)[1].result(300)
    WorkspaceKeys(e.folder / "keys").ensure()
    yield e
    e.shutdown()


def _target(tmp_path_factory, source, name: str, ttl: float) -> Server:
    return trusting_server(tmp_path_factory.mktemp(name),
                           WorkspaceKeys(source.folder / "keys").public_key_text, ttl)


@pytest.fixture(scope="module")
def server(tmp_path_factory, source):
    s = _target(tmp_path_factory, source, "dst", ttl=120.0)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def short_ttl_server(tmp_path_factory, source):
    s = _target(tmp_path_factory, source, "dst_ttl", ttl=3.0)
    yield s
    s.stop()


def _client(server: Server, source, keys=None) -> MigrationClient:
    host, port = server.address.split(":")
    return MigrationClient(host, int(port), server.fingerprint,
                           keys or WorkspaceKeys(source.folder / "keys"), timeout=120)


def _exported(source, tmp_path, quant="none") -> tuple[bytes, bytes, dict]:
    """(head, payload, manifest payload map) of the source's technical agent."""
    path = tmp_path / "t.usxf"
    info = source.call(
        lambda ctx: export_for_migration(ctx, "technical", path, quant, CHUNK)).result(300)
    data = path.read_bytes()
    p = info.manifest["payload"]
    return data[:p["offset"]], data[p["offset"]:], p


def _open_request(head: bytes, name=None, mode="kv") -> dict:
    return {"protocol": "permeant-migrate/1", "mode": mode, "name": name, "head": b64(head),
            "summary": {}}


def _chunks(payload: bytes, size: int = CHUNK) -> list[bytes]:
    return [payload[i:i + size] for i in range(0, len(payload), size)]


def _staging(server: Server) -> list[str]:
    d = server.ws / "migrate" / "staging"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ---- the whole path ------------------------------------------------------------------------------

def test_full_migration_continues_exactly_like_the_source(source, server, tmp_path, real_model):
    events: list[tuple[str, dict]] = []
    rep = migrate_agent(source, "technical", server.address, server.fingerprint, "none", False,
                        lambda s, i: events.append((s, i)), force=True, chunk_size=CHUNK)
    stages = [s for s, _ in events]
    for s in ("capabilities", "decision", "export", "open", "transfer", "verify", "commit",
              "fidelity", "done"):
        assert s in stages, s
    caps = dict(events)["capabilities"]["caps"]
    assert caps["model"]["fingerprint"] == real_model.identity.fingerprint
    assert caps["prefill_tok_s"] > 0 and caps["memory"]["available"] > 0
    assert rep.mode == "kv" and rep.chunks >= 3 and rep.fidelity == f"exact {PROBE_N}/{PROBE_N}"
    assert rep.target_result["restored_from"] == "usxf"  # the moved state, not a rebuild
    assert not rep.moved and (source.folder / "agents" / "technical" / "transcript.jsonl").exists()
    assert _staging(server) == []  # committed: the staged copy is gone
    name = rep.target_agent
    assert name in {a.id for a in Workspace.open(server.ws).settings.agents}

    # The next greedy reply, on the source and on (a copy of) the target's workspace.
    ref = source.submit_future("technical", "And then?", max_tokens=12)[1].result(300)
    copy = tmp_path / "target-copy"
    shutil.copytree(server.ws, copy)
    e = Engine(copy, loaded=real_model, eager_restore=False)
    e.start()
    e.wait_ready(120)
    try:
        got = e.submit_future(name, "And then?", max_tokens=12)[1].result(300)
    finally:
        e.shutdown()
    assert got.source == "usxf"  # attached from the migrated state, not rebuilt
    assert got.cached == ref.cached  # every migrated token reused
    assert got.generated_ids == ref.generated_ids


def test_cli_migrate_with_move_prints_stages_and_archives_the_source(source, server, tmp_path):
    clone = tmp_path / "src-clone"
    source.save().result(60)  # every snapshot durable (engine/durable.py): nothing mid-rename
    shutil.copytree(source.folder, clone)  # same key (trusted), same agents, its own process
    transcript = (clone / "agents" / "technical" / "transcript.jsonl").read_bytes()
    r = subprocess.run(
        [PYTHON, "-m", "permeant_tui.cli", "migrate", "technical", "--to", server.address,
         "--pin", server.fingerprint, "--move", "--force", "--as", "moved-tech",
         "--chunk-kib", "1024", "--workspace", str(clone)],
        capture_output=True, text=True, timeout=300, env=server.env())
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for stage in ("capabilities", "decision", "export", "open", "transfer", "verify", "commit",
                  "fidelity", "move", "done"):
        assert re.search(rf"^{stage}\s", out, re.M), (stage, out)
    assert "MIGRATE" in out and "MB/s" in out and f"exact {PROBE_N}/{PROBE_N}" in out
    d = clone / "agents" / "technical"
    marker = json.loads((d / "moved.json").read_text())
    assert marker["moved_to"] == server.address and marker["target_agent"] == "moved-tech"
    assert not (d / "transcript.jsonl").exists()
    assert (d / marker["archived_transcript"]).read_bytes() == transcript  # archived, not deleted
    assert "moved-tech" in {a.id for a in Workspace.open(server.ws).settings.agents}


def test_reprefill_mode_rebuilds_on_the_target(source, server):
    rep = migrate_agent(source, "technical", server.address, server.fingerprint, "none", False,
                        None, reprefill=True, name="rebuilt")
    assert rep.mode == "reprefill" and rep.chunks == 0
    assert rep.target_result["mode"] == "reprefill" and rep.target_result["prefill_ms"] > 0
    assert rep.fidelity.startswith(("exact", "diverged"))  # reported, whichever it is
    assert "rebuilt" in {a.id for a in Workspace.open(server.ws).settings.agents}


def test_start_migration_reports_through_events(source, server):
    from permeant_tui.engine.events import MigrationDone, MigrationFailed, MigrationProgress
    from permeant_tui.migrate import start_migration

    events: list = []
    thread = start_migration(source, "technical", server.address, server.fingerprint,
                             on_event=events.append)
    thread.join(300)
    assert not thread.is_alive()
    stages = [e.stage for e in events if isinstance(e, MigrationProgress)]
    assert stages[:2] == ["capabilities", "decision"] and "commit" in stages
    assert "transfer" not in stages  # per chunk: not a notification
    assert isinstance(events[-1], MigrationDone) and events[-1].agent_id == "technical"
    assert events[-1].summary.startswith(("exact", "diverged"))

    events.clear()  # nothing listens on port 1: one MigrationFailed, the agent intact
    start_migration(source, "technical", "127.0.0.1:1", server.fingerprint,
                    on_event=events.append).join(60)
    assert isinstance(events[-1], MigrationFailed) and "127.0.0.1:1" in events[-1].message
    assert {e.stage for e in events[:-1]} <= {"retry"}
    assert source.agent("technical").turns


# ---- interruptions and tampering ---------------------------------------------------------------------

def test_transfer_cut_mid_stream_resumes_from_first_missing_chunk(source, server):
    clients: list[MigrationClient] = []

    def cut(c: MigrationClient) -> None:
        c.cut_chunks.add(2)  # chunk 2: headers and half its body sent, then the socket closed
        clients.append(c)

    events: list[tuple[str, dict]] = []
    rep = migrate_agent(source, "technical", server.address, server.fingerprint, "none", False,
                        lambda s, i: events.append((s, i)), force=True, chunk_size=CHUNK,
                        on_client=cut)
    resumes = [i for s, i in events if s == "resume"]
    assert len(resumes) == 1 and resumes[0]["from_chunk"] == 2 and resumes[0]["present"] == 2
    puts = clients[0].chunk_puts
    assert puts[:3] == [0, 1, 2] and puts[3:] == list(range(2, rep.chunks))  # 0 and 1 not re-sent
    assert rep.retries == 1 and rep.fidelity == f"exact {PROBE_N}/{PROBE_N}"


def test_tampered_chunk_and_head_are_refused(source, server, tmp_path):
    head, payload, p = _exported(source, tmp_path)
    chunks = _chunks(payload)
    c = _client(server, source)
    # a flipped byte in the manifest: refused before any payload is accepted
    bad_head = bytearray(head)
    bad_head[200] ^= 1
    with pytest.raises(RemoteRefused) as ei:
        c.open(_open_request(bytes(bad_head)))
    assert ei.value.status == 422 and ei.value.error in ("manifest", "signature")

    st = c.open(_open_request(head, name="tamper"))
    mid = st["id"]
    assert st["n_chunks"] == len(chunks) >= 3 and st["missing"] == [[0, len(chunks)]]
    c.put_chunk(mid, 0, chunks[0])
    bad = bytearray(chunks[1])
    bad[12345] ^= 0x40
    with pytest.raises(RemoteRefused) as ei:
        c.put_chunk(mid, 1, bytes(bad))
    assert ei.value.status == 422 and ei.value.error == "chunk-checksum"
    assert c.status(mid)["present"] == [[0, 1]]  # the bad chunk was not kept
    assert c.put_chunk(mid, 0, chunks[0])["duplicate"] is True  # a retried chunk is idempotent
    with pytest.raises(RemoteRefused) as ei:  # wrong length for the index
        c.put_chunk(mid, 1, chunks[1][:-1])
    assert ei.value.status == 400
    with pytest.raises(RemoteRefused) as ei:
        c.prepare(mid)
    assert ei.value.status == 409 and ei.value.error == "incomplete"
    # the same head again resumes the same migration (a source that restarted)
    again = c.open(_open_request(head, name="tamper"))
    assert again["id"] == mid and again["resumed"] and again["first_missing"] == 1
    c.put_chunk(mid, 1, chunks[1])
    assert c.status(mid)["present"] == [[0, 2]]
    assert c.abort(mid)["state"] == "aborted"
    assert mid not in _staging(server)
    with pytest.raises(RemoteRefused) as ei:
        c.status(mid)
    assert ei.value.status == 404
    c.close()
    assert "tamper" not in {a.id for a in Workspace.open(server.ws).settings.agents}


def test_head_signed_by_an_untrusted_key_is_refused(source, server, tmp_path, real_model):
    """The requester is trusted, the file's signer is not: 403 untrusted-key."""
    from permeant_tui.engine.usxf import read_usxf, write_usxf

    _exported(source, tmp_path)
    f = read_usxf(tmp_path / "t.usxf", trusted=None)
    stranger = WorkspaceKeys(tmp_path / "stranger").ensure()
    out = tmp_path / "s.usxf"
    write_usxf(out, identity=f.identity, token_ids=f.token_ids, kv=f.load_kv(), agent=f.agent,
               keys=stranger, fidelity=f.fidelity, chunk_size=CHUNK)
    g = read_usxf(out, trusted=None)
    head = out.read_bytes()[:g.manifest["payload"]["offset"]]
    c = _client(server, source)
    with pytest.raises(RemoteRefused) as ei:
        c.open(_open_request(head))
    c.close()
    assert ei.value.status == 403 and ei.value.error == "untrusted-key"


# ---- authentication and malformed input ---------------------------------------------------------------



def test_unknown_key_bad_signature_replay_and_stale_clock_get_a_bare_401(source, server, tmp_path):
    stranger = MigrationClient("127.0.0.1", server.port, server.fingerprint,
                               WorkspaceKeys(tmp_path / "stranger").ensure())
    with pytest.raises(Unauthorized):
        stranger.capabilities()
    assert stranger.raw("POST", "/migrations", b"{}") == (401, {"error": "unauthorized"})
    stranger.close()

    c = _client(server, source)
    h = c.sign_headers("GET", "/capabilities", b"")
    assert send_raw(server, "GET", "/capabilities", h)[0] == 200
    assert send_raw(server, "GET", "/capabilities", h) == (401, b'{"error":"unauthorized"}')  # replay
    h = c.sign_headers("GET", "/capabilities", b"")
    h["x-permeant-signature"] = b64(bytes(64))
    assert send_raw(server, "GET", "/capabilities", h) == (401, b'{"error":"unauthorized"}')
    h = c.sign_headers("GET", "/migrations", b"")  # signed for another path
    assert send_raw(server, "GET", "/capabilities", h)[0] == 401
    h = c.sign_headers("GET", "/capabilities", b"", now=time.time() - 3600)  # clock 1 h behind
    assert send_raw(server, "GET", "/capabilities", h)[0] == 401
    assert send_raw(server, "GET", "/capabilities", {})[0] == 401  # no headers at all
    assert any("replayed nonce" in line for line in server.lines)  # the why stays on the target
    c.close()


def test_malformed_requests_get_4xx_and_the_server_stays_up(source, server):
    c = _client(server, source)
    for method, path, body, status in [
        ("POST", "/migrations", b"not json", 400),
        ("POST", "/migrations", b"[1, 2]", 400),
        ("POST", "/migrations", json.dumps({"protocol": "nope"}).encode(), 400),
        ("POST", "/migrations", json.dumps(_open_request(b"")).encode(), 400),
        ("POST", "/migrations", json.dumps({**_open_request(b"x" * 64), "head": "!!"}).encode(), 400),
        ("POST", "/migrations", json.dumps(_open_request(b"USXF\r\n\x1a\n" + bytes(56))).encode(), 422),
        ("POST", "/migrations", json.dumps({**_open_request(b"x"), "name": "../etc"}).encode(), 400),
        ("POST", "/migrations", json.dumps({**_open_request(b"x"), "mode": "zzz"}).encode(), 400),
        ("PUT", "/migrations/" + "0" * 32 + "/chunks/0", b"abc", 404),
        ("PUT", "/migrations/../../etc/chunks/0", b"abc", 404),
        ("PUT", "/migrations/" + "0" * 32 + "/chunks/99999999999999999999", b"abc", 404),
        ("GET", "/migrations/" + "z" * 40, b"", 404),
        ("POST", "/migrations/" + "0" * 32 + "/commit", b"", 404),
        ("DELETE", "/migrations/" + "0" * 32, b"", 404),
        ("GET", "/nowhere", b"", 404),
        ("PATCH", "/migrations", b"", 405),
        ("GET", "/capabilities", b"body on a GET", 400),
    ]:
        got, obj = c.raw(method, path, body)
        assert got == status, (method, path, body[:40], got, obj)
    # a declared body over the limit is refused before it is read
    h = c.sign_headers("POST", "/migrations", b"")
    h["Content-Length"] = str(1 << 40)
    from permeant_tui.migrate.tls import PinnedConnection

    conn = PinnedConnection("127.0.0.1", server.port, server.fingerprint, timeout=30)
    conn.putrequest("POST", "/migrations")
    for k, v in h.items():
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413
    conn.close()
    assert c.capabilities()["protocol"] == "permeant-migrate/1"
    c.close()
    assert not any("Traceback" in line for line in server.lines)


def test_staged_migrations_are_bounded(source, server, tmp_path):
    head, _, _ = _exported(source, tmp_path)
    c = _client(server, source)
    cap = c.capabilities()
    assert cap["migrations"]["max"] == 4 and cap["limits"]["max_chunk_bytes"] == 16 << 20
    ids = [c.open(_open_request(head, name=f"busy-{i}"))["id"] for i in range(4)]
    assert len(set(ids)) == 4
    with pytest.raises(RemoteRefused) as ei:
        c.open(_open_request(head, name="busy-4"))
    assert ei.value.status == 429 and ei.value.error == "busy"
    with pytest.raises(RemoteRefused) as ei:  # a name the target already has
        c.call("DELETE", f"/migrations/{ids[0]}")
        c.open(_open_request(head, name="technical"))
    assert ei.value.status == 409 and ei.value.error == "name-taken"
    for mid in ids[1:]:
        c.abort(mid)
    assert c.capabilities()["migrations"]["active"] == 0 and _staging(server) == []
    c.close()
    key = server.ws / "migrate" / "tls" / "key.pem"
    assert key.stat().st_mode & 0o777 == 0o600  # the TLS private key is private


def test_certificate_mismatch_is_refused_before_sending(source, server):
    before = {a.id for a in Workspace.open(server.ws).settings.agents}
    with pytest.raises(CertificateMismatch, match="not the pinned"):
        migrate_agent(source, "technical", server.address, "ab" * 32, force=True)
    # nothing pinned for this name of the target: refused, and the real fingerprint is shown
    with pytest.raises(MigrationError, match=server.fingerprint):
        migrate_agent(source, "technical", f"localhost:{server.port}", None, force=True)
    assert {a.id for a in Workspace.open(server.ws).settings.agents} == before


# ---- crashes -------------------------------------------------------------------------------------------

def test_target_killed_between_prepare_and_commit_attaches_nothing(source, short_ttl_server,
                                                                  tmp_path):
    srv = short_ttl_server
    head, payload, _ = _exported(source, tmp_path)
    c = _client(srv, source)
    st = c.open(_open_request(head, name="half"))
    mid = st["id"]
    for i, chunk in enumerate(_chunks(payload)):
        c.put_chunk(mid, i, chunk)
    assert c.prepare(mid)["state"] == "prepared"
    c.close()
    assert _staging(srv) == [mid]
    # a commit a crash cut short elsewhere: journal written, agent folder half made
    ghost = srv.ws / "migrate" / "staging" / ("f" * 32)
    ghost.mkdir()
    (ghost / "commit.json").write_text(json.dumps({"agent": "ghost"}))
    (srv.ws / "agents" / "ghost").mkdir(parents=True)
    (srv.ws / "agents" / "ghost" / "import.usxf").write_bytes(b"partial")

    fp = srv.fingerprint
    srv.kill()
    srv.start(srv.port)
    assert srv.fingerprint == fp  # the certificate persists across restarts
    assert _staging(srv) == []
    assert not (srv.ws / "agents" / "ghost").exists()
    assert any("rolled back the unfinished commit of 'ghost'" in line for line in srv.lines)
    agents = {a.id for a in Workspace.open(srv.ws).settings.agents}
    assert "half" not in agents and "ghost" not in agents
    assert not (srv.ws / "agents" / "half").exists()
    c = _client(srv, source)
    with pytest.raises(RemoteRefused) as ei:
        c.commit(mid)
    assert ei.value.status == 404
    assert c.capabilities()["migrations"]["active"] == 0
    c.close()
    assert source.agent("technical").turns  # the source agent is intact


def test_source_killed_mid_transfer_staged_data_expires(source, short_ttl_server, tmp_path):
    srv = short_ttl_server
    clone = tmp_path / "src-clone"
    source.save().result(60)  # every snapshot durable (engine/durable.py): nothing mid-rename
    shutil.copytree(source.folder, clone)
    transcript = (clone / "agents" / "technical" / "transcript.jsonl").read_bytes()
    env = {**srv.env(), "PERMEANT_MIGRATE_TEST_CHUNK_DELAY": "0.3"}
    proc = subprocess.Popen(
        [PYTHON, "-m", "permeant_tui.cli", "migrate", "technical", "--to", srv.address,
         "--pin", srv.fingerprint, "--force", "--chunk-kib", "64", "--workspace", str(clone)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    c = _client(srv, source)  # the clone signs with the same key: it may ask about its migration
    try:
        line = srv.wait_for(r"migration [0-9a-f]{32}: opened", 180)
        mid = re.search(r"migration ([0-9a-f]{32})", line).group(1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = c.status(mid)
            if sum(b - a for a, b in st["present"]) >= 3:
                break
            time.sleep(0.1)
        assert st["state"] == "receiving" and 3 <= sum(b - a for a, b in st["present"]) < st["n_chunks"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert mid in _staging(srv)
        srv.wait_for(rf"migration {mid}: receiving, idle for 3 s: expired", 30)
        with pytest.raises(RemoteRefused) as ei:
            c.status(mid)
        assert ei.value.status == 404
        assert mid not in _staging(srv)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        c.close()
    d = clone / "agents" / "technical"
    assert (d / "transcript.jsonl").read_bytes() == transcript and not (d / "moved.json").exists()
    assert hashlib.sha256(transcript).digest()  # the source's conversation is untouched
