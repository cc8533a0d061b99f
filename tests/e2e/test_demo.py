"""The two-session demo runs end to end on the real model: session 2, a new process, restores all
three agents from their snapshots (tokens reused, no prefill) and continues the conversation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from permeant_tui.engine.agent import Agent
from permeant_tui.engine.generation import common_prefix
from permeant_tui.engine.workspace import Workspace

DEMO = Path(__file__).resolve().parents[2] / "demo" / "two_sessions.py"


@pytest.mark.real_model
def test_two_sessions_non_interactive(tmp_path, real_model):
    ws = tmp_path / "demo-ws"
    p = subprocess.run([sys.executable, str(DEMO), "--non-interactive", "--workspace", str(ws),
                        "--max-tokens", "16"], capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "SESSION 1" in out and "SESSION 2" in out
    assert "snapshot not used" not in out and "Traceback" not in p.stderr
    summary = json.loads(next(x for x in out.splitlines() if x.startswith("SUMMARY "))[8:])

    w = Workspace.open(ws)
    tok = real_model.tokenizer
    agents = summary["agents"]
    assert set(agents) == {"technical", "business", "coordinator"}
    for agent_id, a in agents.items():
        assert a["source"] == "snapshot", (agent_id, a)
        assert a["tokens_reused"] == a["tokens"] == a["reprefill_tokens"] > 0
        assert a["restore_ms"] > 0 and a["reprefill_ms"] > 0
        # The printed table row says the same thing.
        row = next(line for line in out.splitlines() if line.startswith(agent_id + " "))
        assert row.split()[1] == "snapshot" and int(row.split()[3]) == a["tokens"]
    # What session 2 restored is what session 1 said: one team turn each (the coordinator's
    # carries both answers, so its context is the longest).
    assert agents["coordinator"]["tokens"] > agents["technical"]["tokens"]
    tech = w.agent("technical")
    assert [t.user for t in tech.turns] == [
        "We have a critical API bug affecting payment processing. Analyze technical issues "
        "and business impact.",
        "What are the detailed steps to fix that API bug from our previous discussion?"]
    session1 = Agent(tech.agent_id, tech.role, tech.title, tech.system, tech.turns[:1])
    before = session1.expected_ids(tok)
    assert agents["technical"]["tokens"] == len(before)
    # The follow-up reused session 1's cache: only its own new tokens were read.
    prompt = session1.prompt_ids(tok, tech.turns[1].user)
    fu = summary["follow_up"]
    assert fu["source"] == "snapshot"
    assert fu["cached"] == common_prefix(before, prompt) >= len(before) - 2
    assert fu["prefilled"] == len(prompt) - fu["cached"] and fu["generated"] > 0
    assert len(w.agent("business").turns) == 1 and len(w.agent("coordinator").turns) == 1
