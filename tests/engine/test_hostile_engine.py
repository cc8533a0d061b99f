"""Hostile input at the engine (issue 14), on the tiny model: import names (casefolded, an agent
without turns gives way, cleanup only of what the import created), token ids from a transcript
or a file's fidelity probe checked against the vocabulary, a snapshot that cannot be written,
stale export temp files."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from permeant_tui.engine.errors import InvalidTokenIds, UsxfInvalid, WorkspaceError
from permeant_tui.engine.events import Notice
from permeant_tui.engine.worker import Engine


def _engine(path, lm, **kw):
    e = Engine(path, loaded=lm, eager_restore=False, **kw)
    e.start()
    e.wait_ready(60)
    return e


def _keys(folder):
    from permeant_tui.engine.usxf.keys import WorkspaceKeys

    return WorkspaceKeys(folder / "keys").ensure()


@pytest.fixture
def exported(tmp_path, tiny_model):
    """A file of `technical` (two turns) from a source workspace, and that workspace."""
    src = _engine(tmp_path / "src", tiny_model)
    src.submit_future("technical", "We have a critical API bug.", max_tokens=6)[1].result(60)
    src.submit_future("technical", "What first?", max_tokens=6)[1].result(60)
    out = tmp_path / "tech.usxf"
    src.export("technical", str(out), fidelity=True).result(60)
    src.shutdown()
    return out, tmp_path / "src"


def _target(tmp_path, lm, src_folder, **kw):
    dst = tmp_path / "dst"
    _keys(dst).trust(_keys(src_folder).public_key_text)
    return _engine(dst, lm, **kw)


def test_import_onto_an_agent_without_turns_takes_its_place(exported, tmp_path, tiny_model):
    out, src = exported
    e = _target(tmp_path, tiny_model, src)
    try:
        before = [a.agent_id for a in e.agents()]
        report = e.import_usxf(str(out), "Business").result(60)  # casefolded: 'business'
        assert report["agent"] == report["replaced"] == "business"
        assert [a.agent_id for a in e.agents()] == before  # took its place, no new agent
        assert len(e.agent("business").turns) == 2
        r = e.submit_future("business", "And then?", max_tokens=4)[1].result(60)
        assert r.source == "usxf"
        # now it has turns: a second import onto it (any case) is refused, nothing changes
        with pytest.raises(WorkspaceError, match="has 3 turns"):
            e.import_usxf(str(out), "BUSINESS").result(60)
        assert len(e.agent("business").turns) == 3
    finally:
        e.shutdown()
    settings = json.loads((tmp_path / "dst" / "workspace.json").read_text())
    assert [a["id"] for a in settings["agents"]] == before


def test_failed_import_removes_only_what_it_created(exported, tmp_path, tiny_model, monkeypatch):
    out, src = exported
    e = _target(tmp_path, tiny_model, src)
    ws_dir = tmp_path / "dst"
    keep = ws_dir / "agents" / "coordinator" / "notes.txt"  # an agent without turns, a file
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_text("mine")
    from permeant_tui.engine.workspace import Workspace

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Workspace, "add_agent", full)
    try:
        for name in ("newcomer", "coordinator"):
            with pytest.raises(OSError):
                e.import_usxf(str(out), name).result(60)
        assert not (ws_dir / "agents" / "newcomer").exists()
        assert keep.read_text() == "mine"
        assert not (ws_dir / "agents" / "coordinator" / "import.usxf").exists()
        assert {a.agent_id for a in e.agents()} == {"technical", "business", "coordinator"}
    finally:
        e.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src", "tech.usxf"]


@pytest.mark.parametrize("bad", [[99999999], [2**40], [1e20], [-1], ["7"], [True]])
def test_transcript_ids_outside_the_vocabulary_are_refused(tmp_path, tiny_model, bad):
    folder = tmp_path / "ws"
    e = _engine(folder, tiny_model)
    e.submit_future("technical", "Hello?", max_tokens=4)[1].result(60)
    e.shutdown()
    t = folder / "agents" / "technical" / "transcript.jsonl"
    line = json.loads(t.read_text().splitlines()[0])
    line["generated_ids"] = line["generated_ids"][:1] + bad
    t.write_text(json.dumps(line) + "\n")
    (folder / "agents" / "technical" / "kv.safetensors").unlink()
    e = _engine(folder, tiny_model)
    try:
        with pytest.raises(InvalidTokenIds) as exc:
            e.submit_future("technical", "Again?", max_tokens=4)[1].result(60)
        msg = str(exc.value)
        assert "agent 'technical' turn 1" in msg and "\n" not in msg
        # the engine survives: another agent still works
        e.submit_future("business", "Hi?", max_tokens=3)[1].result(60)
    finally:
        e.shutdown()


def _resign_with_probe(src_file, dst_file, keys, probe, expected, monkeypatch):
    """A file signed by `keys` whose fidelity probe holds the given ids: written with
    write_usxf after bypassing only the writer's own vocabulary check of the probe."""
    from permeant_tui.engine.usxf import Fidelity, read_usxf, write_usxf
    from permeant_tui.engine.usxf import manifest as man

    f = read_usxf(src_file, trusted=None)
    real = man._parse_fidelity
    monkeypatch.setattr(man, "_parse_fidelity", lambda s, m, vocab: real(s, m, 0))
    write_usxf(dst_file, identity=f.identity, token_ids=f.token_ids, kv=f.load_kv(),
               agent=f.agent, keys=keys, fidelity=Fidelity(probe, expected, len(expected), 100))
    monkeypatch.setattr(man, "_parse_fidelity", real)


@pytest.mark.parametrize("where", ["probe", "expected"])
@pytest.mark.parametrize("bad", [60000, 49152])
def test_fidelity_probe_ids_outside_the_vocabulary_are_refused(exported, tmp_path, monkeypatch,
                                                               where, bad):
    from permeant_tui.engine.usxf import read_usxf, verify_usxf

    out, src = exported
    keys = _keys(src)
    vocab = read_usxf(out, trusted=None).identity.vocab_size
    assert vocab == 49152
    probe, expected = ([1, bad], [2, 3]) if where == "probe" else ([1, 2], [3, bad])
    hostile = tmp_path / "hostile.usxf"
    _resign_with_probe(out, hostile, keys, probe, expected, monkeypatch)
    for read in (lambda: read_usxf(hostile, trusted=None), lambda: verify_usxf(hostile, keys)):
        with pytest.raises(UsxfInvalid) as exc:
            read()
        assert exc.value.check == "fidelity" and "0..49151" in str(exc.value)


def test_a_snapshot_that_cannot_be_written_keeps_the_turn(tmp_path, tiny_model, monkeypatch):
    import permeant_tui.engine.workspace as wsmod

    def full(*a, **k):
        raise RuntimeError("[write] Unable to write 122097 bytes to file.")

    monkeypatch.setattr(wsmod, "write_snapshot", full)
    events = []
    folder = tmp_path / "ws"
    e = _engine(folder, tiny_model, on_event=events.append)
    r = e.submit_future("technical", "Hello?", max_tokens=4)[1].result(60)
    assert r.reply is not None
    t0 = time.monotonic()
    e.shutdown()  # retries the save, warns again, does not hang
    assert time.monotonic() - t0 < 20
    warnings = {ev.message for ev in events if isinstance(ev, Notice) and ev.level == "warning"}
    assert warnings == {"technical: the turn is recorded, but its KV snapshot could not be "
                        "written ([write] Unable to write 122097 bytes to file.); it will be "
                        "rebuilt from the transcript"}
    assert len((folder / "agents" / "technical" / "transcript.jsonl").read_text().splitlines()) == 1
    assert not (folder / "agents" / "technical" / "kv.safetensors").exists()
    monkeypatch.undo()
    e = _engine(folder, tiny_model)
    try:
        r = e.submit_future("technical", "Again?", max_tokens=4)[1].result(60)
        assert r.source == "prefill"
    finally:
        e.shutdown()


def test_stale_export_temps_are_removed_by_the_next_export(tmp_path, tiny_model):
    e = _engine(tmp_path / "ws", tiny_model)
    try:
        e.submit_future("technical", "Hello?", max_tokens=4)[1].result(60)
        out = tmp_path / "out.usxf"
        dead = tmp_path / ".out.usxf.999999999.deadbeef.tmp"  # no such pid
        live = tmp_path / f".out.usxf.{os.getppid()}.cafe.tmp"  # a live process's
        other = tmp_path / ".other.usxf.999999999.deadbeef.tmp"  # another (timestamped) name
        mine = tmp_path / ".notes.tmp"  # not the writer's: kept
        for p in (dead, live, other, mine):
            p.write_bytes(b"x" * 100)
        e.export("technical", str(out), fidelity=False).result(60)
        assert out.is_file() and not dead.exists() and not other.exists()
        assert live.exists() and mine.exists()
    finally:
        e.shutdown()


@pytest.mark.parametrize("own_id", ["../../victim_dir", "/tmp/permeant-own-id-escape", "..",
                                    "x" * 300])
def test_a_trusted_files_own_hostile_agent_id_is_refused(exported, tmp_path, tiny_model, own_id):
    from permeant_tui.engine.names import AgentNameInvalid
    from permeant_tui.engine.usxf import AgentRecord, read_usxf, write_usxf

    out, src = exported
    f = read_usxf(out, trusted=None)
    a = f.agent
    hostile = tmp_path / "own-id.usxf"
    write_usxf(hostile, identity=f.identity, token_ids=f.token_ids, kv=f.load_kv(),
               agent=AgentRecord(own_id, a.role, a.title, a.system, a.turns), keys=_keys(src))
    e = _target(tmp_path, tiny_model, src)
    try:
        before = sorted(str(p) for p in (tmp_path / "dst").rglob("*"))
        with pytest.raises(AgentNameInvalid):
            e.import_usxf(str(hostile)).result(60)
        assert sorted(str(p) for p in (tmp_path / "dst").rglob("*")) == before
    finally:
        e.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "own-id.usxf", "src",
                                                          "tech.usxf"]
    assert not os.path.exists("/tmp/permeant-own-id-escape")
