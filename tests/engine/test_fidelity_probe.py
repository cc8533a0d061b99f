"""The fidelity probe as the user sets it (docs/USXF.md 7): its length, the divergence report
(position and the source's top-2 margin there), the context-room rule, and on the real model
kivi8 continuing exactly where f16 does."""

from __future__ import annotations

import dataclasses

import pytest

from permeant_tui.engine.agent import Agent, Turn
from permeant_tui.engine.exchange import PROBE_N, compare_probe, export_agent
from permeant_tui.engine.generation import prefill
from permeant_tui.engine.snapshot import attach_payload
from permeant_tui.engine.usxf import Fidelity, read_usxf
from permeant_tui.engine.usxf.keys import WorkspaceKeys
from permeant_tui.engine.workspace import Workspace


class _Engine:
    """What export_agent needs: the loaded model and a workspace."""

    def __init__(self, lm, folder):
        self.lm, self.ws = lm, Workspace.open(folder)


def _agent(lm, pairs, system="You are a technical expert.") -> Agent:
    tok = lm.tokenizer
    turns = [Turn(u, r, tuple(tok.encode(r)) + (tok.eos_token_id,)) for u, r in pairs]
    a = Agent("tech", "technical", "Tech", system, turns)
    prefill(lm.model, a, a.expected_ids(tok))
    return a


def _attached(lm, f) -> Agent:
    kv = f.load_kv()
    a = Agent("probe", "probe", "probe", "")
    a.cache = attach_payload(lm.model, kv.keys, kv.values, kv.dtype, lm.identity.kv_dtype,
                             len(f.token_ids))
    a.cache_ids = list(f.token_ids)
    return a


PAIRS = [("Our payments API returns 502 errors since the deploy. Where do we start?",
          "Compare the two builds' configuration first, then the connection pool metrics.")]


@pytest.fixture
def exported(tmp_path, tiny_model):
    e = _Engine(tiny_model, tmp_path / "ws")
    agent = _agent(tiny_model, PAIRS)
    info = export_agent(e.lm, e.ws, agent, str(tmp_path / "a.usxf"), "none", fidelity=8)
    return e, agent, read_usxf(info.path, trusted=WorkspaceKeys(e.ws.keys_dir))


def test_export_records_the_probe_length_asked_for(tmp_path, tiny_model, exported):
    e, agent, f = exported
    assert f.fidelity.n == 8 == len(f.fidelity.expected_ids) == len(f.fidelity.margins)
    assert all(m >= 0 for m in f.fidelity.margins)
    default = export_agent(e.lm, e.ws, agent, str(tmp_path / "b.usxf"), "none")
    assert default.fidelity.n == PROBE_N == 128
    assert export_agent(e.lm, e.ws, agent, str(tmp_path / "c.usxf"), "none", fidelity=0).fidelity is None
    assert export_agent(e.lm, e.ws, agent, str(tmp_path / "d.usxf"), "none", fidelity=False).fidelity is None


def test_replay_honours_the_length_and_reports_where_and_how_close(tiny_model, exported):
    _, _, f = exported
    a = _attached(tiny_model, f)
    assert compare_probe(tiny_model, a, f.fidelity) == "exact 8/8"
    assert compare_probe(tiny_model, a, f.fidelity, n=3) == "exact 3/3"
    assert compare_probe(tiny_model, a, f.fidelity, n=1000) == "exact 8/8"
    expected = list(f.fidelity.expected_ids)
    expected[5] = (expected[5] + 1) % tiny_model.identity.vocab_size
    changed = dataclasses.replace(f.fidelity, expected_ids=expected)
    m = f.fidelity.margins[5]
    assert compare_probe(tiny_model, a, changed) == \
        f"diverged at 5 (5/8 matched; source top-2 margin {m:.3g} there)"
    assert compare_probe(tiny_model, a, changed, n=5) == "exact 5/5"


def test_no_room_is_not_checked_never_a_defect(tiny_model, exported):
    _, _, f = exported
    a = _attached(tiny_model, f)
    need = len(f.fidelity.probe_prompt_ids) + 8
    cramped = dataclasses.replace(tiny_model, context_limit=len(a.cache_ids) + need - 1)
    assert compare_probe(cramped, a, f.fidelity) == f"not checked: context room {need - 1} < {need}"
    assert compare_probe(cramped, a, f.fidelity, n=7) == "exact 7/7"
    assert compare_probe(tiny_model, a, Fidelity([1], [], 0, 3, "not checked: context room 3 < 141")) \
        == "not checked: context room 3 < 141"


CONVERSATIONS = [
    [("We have a critical API bug affecting payment processing. What do we check first?",
      "Start with the timeline: if errors rose within a minute of the deploy, compare the two "
      "builds' configuration, then the connection pool metrics of the ledger service."),
     ("The pool is capped at 50 and every slot is taken during the spikes.",
      "Then requests queue behind the pool. Find what holds connections: a long transaction "
      "or retries without backoff. A thread dump during the next spike will show it.")],
    [("List the steps to rotate the auth proxy's TLS certificate without downtime.",
      "1. Issue the new certificate.\n2. Deploy it beside the old one.\n3. Switch the "
      "listener.\n4. Watch the handshake error rate for an hour.\n5. Remove the old one.")],
]


@pytest.mark.real_model
@pytest.mark.parametrize("pairs", CONVERSATIONS, ids=["technical", "list"])
def test_kivi8_continues_exactly_where_f16_does(tmp_path, real_model, pairs):
    """docs/USXF.md 14 measures this over 36 conversations and 128 tokens; here two short ones
    and 64 tokens, the whole path: export, verify, attach, replay."""
    e = _Engine(real_model, tmp_path / "ws")
    agent = _agent(real_model, pairs)
    got = {}
    for quant in ("f16", "kivi8"):
        info = export_agent(e.lm, e.ws, agent, str(tmp_path / f"{quant}.usxf"), quant, fidelity=64)
        f = read_usxf(info.path, trusted=WorkspaceKeys(e.ws.keys_dir))
        got[quant] = compare_probe(real_model, _attached(real_model, f), f.fidelity)
    assert got["f16"] == "exact 64/64"
    assert got["kivi8"] == got["f16"]


def test_lossy_exports_record_the_next_token_kl(tmp_path, tiny_model, exported):
    e, agent, f = exported
    assert "next_token_kl" not in f.manifest["quant"]["error"]  # none: nothing to measure
    before = (list(agent.cache_ids), agent.cache[0].offset)
    errors = {}
    for quant in ("f16", "int8", "kivi8"):
        info = export_agent(e.lm, e.ws, agent, str(tmp_path / f"{quant}.usxf"), quant, fidelity=2)
        errors[quant] = info.manifest["quant"]["error"]["next_token_kl"]
    assert (list(agent.cache_ids), agent.cache[0].offset) == before  # the source is untouched
    assert 0 <= errors["f16"] < errors["int8"] and 0 <= errors["kivi8"] < errors["int8"]
