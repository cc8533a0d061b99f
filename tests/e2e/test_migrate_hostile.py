"""Hostile input to `permeant serve` (issue 14, items 4, 5 and 8), and the shared rules it
uses: the text escape for logs (engine/text.py) and the agent name rule (engine/names.py).

The server tests run a real `permeant serve` on loopback and talk TLS to it with raw sockets:
an endless request header, too many header fields, a silent connection, a body declared far too
large, a percent-encoded path that would forge a log line, a Unicode digit as a timestamp and
a deeply nested JSON body. Every loop here is bounded.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading

import pytest
from support.migrate_server import send_raw, trusting_server

from permeant_tui.engine.names import AgentNameInvalid, check_agent_name, is_agent_name
from permeant_tui.engine.text import printable
from permeant_tui.engine.usxf.keys import WorkspaceKeys
from permeant_tui.migrate.protocol import signing_message
from permeant_tui.migrate.tls import client_context
from permeant_tui.migrate.transport import MigrationClient

# ---- engine/text.py, engine/names.py ------------------------------------------------------------


def test_printable_escapes_what_could_drive_a_terminal_or_forge_a_line():
    assert printable("plain text, é 日本 \\ ok") == "plain text, é 日本 \\ ok"
    hostile = "a\x1b]0;title\x07b\x1b[2J\r\n[serve] ok\x85\x9b31m\u202egnp.exe\u2028\udcff\x7f\t"
    out = printable(hostile)
    assert out == ("a\\x1b]0;title\\x07b\\x1b[2J\\r\\n[serve] ok\\x85\\x9b31m\\u202egnp.exe"
                   "\\u2028\\udcff\\x7f\\t")
    assert out.isprintable()
    out.encode("utf-8")  # no lone surrogate left for a terminal's encoder to choke on


@pytest.mark.parametrize("name", ["technical", "a", "A-1", "x.y_z", "9lives", "n" * 64])
def test_agent_names_that_pass(name):
    assert check_agent_name(name) == name and is_agent_name(name)


@pytest.mark.parametrize("name", [
    "", ".", "..", "technical/", "./technical", "technical/.", "../agents/technical",
    "../../escaped", "/abs/path", "-flag", "_x", ".hidden", "a b", "n" * 65, "x" * 300,
    "tab\there", "esc\x1b[2J", "new\nline", "é", None, 5, ["a"]])
def test_agent_names_that_fail_with_one_clean_line(name):
    with pytest.raises(AgentNameInvalid) as ei:
        check_agent_name(name)
    msg = str(ei.value)
    assert "\n" not in msg and "\x1b" not in msg and len(msg) < 200
    assert "A-Z a-z 0-9" in msg and ei.value.exit_code == 2
    assert not is_agent_name(name)


# ---- the server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source_keys(tmp_path_factory):
    return WorkspaceKeys(tmp_path_factory.mktemp("src") / "keys").ensure()


@pytest.fixture(scope="module")
def server(tmp_path_factory, source_keys):
    s = trusting_server(tmp_path_factory.mktemp("dst"), source_keys.public_key_text)
    yield s
    s.stop()


def _tls(server) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return client_context().wrap_socket(raw, server_hostname=None)


def _closed_by_server(sock: ssl.SSLSocket) -> bytes | None:
    """What the server answered before closing (b"" if it closed without a word), or None while
    the connection is open. Does not block."""
    try:
        if not select.select([sock], [], [], 0)[0] and not sock.pending():
            return None
        data = sock.recv(65536)
    except (OSError, ssl.SSLError):
        return b""
    return data


def _read_reply(sock: ssl.SSLSocket, timeout: float = 60.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            out += piece
    except (OSError, ssl.SSLError):
        pass
    return out


def _client(server, keys) -> MigrationClient:
    return MigrationClient("127.0.0.1", server.port, server.fingerprint, keys, timeout=60)


def test_an_endless_header_is_cut_off_and_does_not_stall_signed_requests(server, source_keys):
    """Issue 14 item 4: a client sending one header forever. The server must answer 431 and
    close after a bounded number of bytes, while an authenticated request on another
    connection gets its answer."""
    junk = _tls(server)
    junk.sendall(b"GET /capabilities HTTP/1.1\r\nHost: x\r\nX-Junk: ")
    piece = b"a" * (64 << 10)
    sent, answer, answered_meanwhile = 0, None, None
    for i in range(256):  # at most 16 MiB
        try:
            junk.sendall(piece)
        except (OSError, ssl.SSLError):
            answer = _closed_by_server(junk) or b""
            break
        sent += len(piece)
        if i == 2:  # the junk head is open: a signed request must still be served
            c = _client(server, source_keys)
            answered_meanwhile = c.capabilities()
            c.close()
        answer = _closed_by_server(junk)
        if answer is not None:
            break
    junk.close()
    assert answer is not None, f"the server took {sent >> 20} MiB of one header"
    assert sent <= 1 << 20
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431")
    assert any("request-head-too-large" in line for line in server.lines)
    if answered_meanwhile is None:  # cut off before the third piece: ask now
        c = _client(server, source_keys)
        answered_meanwhile = c.capabilities()
        c.close()
    assert answered_meanwhile["protocol"] == "permeant-migrate/1"


def test_too_many_header_fields_get_431(server):
    s = _tls(server)
    fields = b"".join(b"X-F%d: 1\r\n" % i for i in range(1000))  # 11 KB: under the byte bound
    s.sendall(b"GET /capabilities HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    reply = _read_reply(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 431"), reply[:80]
    assert b"too-many-header-fields" in reply


def test_a_silent_connection_is_closed_at_the_head_deadline(server):
    """A connection that never finishes its head holds no slot for ever (slowloris)."""
    s = _tls(server)
    s.sendall(b"GET /capabilities HTTP/1.1\r\nHost: x\r\n")  # and then nothing
    reply = _read_reply(s, timeout=60)  # the deadline is 10 s
    s.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:80]


def test_a_body_declared_too_large_is_refused_before_authentication(server):
    status, body = send_raw(server, "POST", "/migrations",
                            {"Content-Length": str(1 << 40)})
    assert status == 413 and json.loads(body) == {"error": "too-large"}


def test_request_controlled_text_is_escaped_in_the_log(server):
    """Issue 14 item 5: the percent-decoded path of an unauthenticated request was printed raw,
    so a request could write a forged line (or terminal escapes) into the log."""
    path = "/%1b]0;pwned%07%0d%0a[serve%2000:00:00]%20migration%20forged:%20committed%0d%0a"
    status, _ = send_raw(server, "GET", path, {})
    assert status == 401
    line = server.wait_for(r"unauthorized GET /\\x1b\]0;pwned", 30)
    assert "\\r\\n[serve 00:00:00] migration forged" in line
    assert not any(ln.startswith("[serve 00:00:00]") for ln in server.lines)
    assert not any("\x1b" in ln or "\x07" in ln for ln in server.lines)


def _signed(keys, server, method: str, path: str, body: bytes, ts: str) -> dict:
    import hashlib
    import secrets

    from permeant_tui.migrate.protocol import b64

    digest, nonce = hashlib.sha256(body).hexdigest(), secrets.token_hex(16)
    sig = keys.sign(signing_message(method, path, ts, nonce, digest, server.fingerprint))
    return {"x-permeant-key": keys.key_id, "x-permeant-timestamp": ts,
            "x-permeant-nonce": nonce, "x-permeant-content-sha256": digest,
            "x-permeant-signature": b64(sig)}


def test_a_unicode_digit_timestamp_is_a_clean_401(server, source_keys):
    """Issue 14 item 8: "²" passes str.isdigit() but not int(); validly signed, it was a 500."""
    for ts in ("\u00b2", "\u00b9\u00b2\u00b3"):
        status, body = send_raw(server, "GET", "/capabilities",
                                _signed(source_keys, server, "GET", "/capabilities", b"", ts))
        assert (status, body) == (401, b'{"error":"unauthorized"}')


def test_deeply_nested_json_is_a_clean_400(server, source_keys):
    """Issue 14 item 8: a nested JSON body raised RecursionError (a 500)."""
    c = _client(server, source_keys)
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        status, obj = c.raw("POST", "/migrations", body, content_type="application/json")
        assert status == 400 and obj["error"] == "bad-json", obj
    assert c.capabilities()["protocol"] == "permeant-migrate/1"
    c.close()
    assert not any("Traceback" in line for line in server.lines)


def test_many_junk_connections_at_once_leave_signed_requests_served(server, source_keys):
    """Twenty connections with unfinished heads, one of them pushing bytes: a signed request
    is still answered (each junk head is bounded; none of them blocks the event loop)."""
    junk = [_tls(server) for _ in range(20)]
    for s in junk:
        s.sendall(b"PUT /migrations HTTP/1.1\r\nHost: x\r\nX-Junk: ")
    stop = threading.Event()

    def push(s):
        for _ in range(64):  # bounded: 4 MiB at most
            if stop.is_set():
                return
            try:
                s.sendall(b"b" * (64 << 10))
            except (OSError, ssl.SSLError):
                return

    t = threading.Thread(target=push, args=(junk[0],), daemon=True)
    t.start()
    try:
        c = _client(server, source_keys)
        assert c.capabilities()["protocol"] == "permeant-migrate/1"
        c.close()
    finally:
        stop.set()
        t.join(60)
        for s in junk:
            s.close()


def test_cli_migrate_refuses_a_bad_target_name_in_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "permeant_tui.cli", "migrate", "technical", "--to", "127.0.0.1:1",
         "--as", "../agents/x\x1b[2J", "--workspace", str(tmp_path / "ws")],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "invalid agent name" in r.stderr
    assert "\x1b" not in r.stderr and "Traceback" not in r.stderr
