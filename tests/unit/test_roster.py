"""The engine's roster API (engine/api.py add_agent, rename_agent, remove_agent) on the real
Engine with a scripted runner: before the engine starts and on its worker, and refused while a
turn of the agent is queued or running (issue 15)."""

from __future__ import annotations

import json

import pytest
from support.fake_runner import FakeRunner

from permeant_tui.engine.errors import UnknownAgent, WorkspaceError
from permeant_tui.engine.names import AgentNameInvalid
from permeant_tui.engine.worker import Engine


def test_roster_before_start_needs_no_model(tmp_path):
    engine = Engine(tmp_path / "ws", runner=FakeRunner(hold_load=True), eager_restore=False)
    try:
        view = engine.add_agent("sec", "security", "Find bugs.").result()
        assert (view.agent_id, view.role, view.title, view.system) == \
            ("sec", "security", "Sec", "Find bugs.")
        with pytest.raises(WorkspaceError):
            engine.add_agent("SEC", "x", "y").result()
        with pytest.raises(AgentNameInvalid):
            engine.add_agent("..", "x", "y").result()
        assert engine.rename_agent("sec", "audit").result().agent_id == "audit"
        with pytest.raises(UnknownAgent):
            engine.rename_agent("sec", "x")
        archive = engine.remove_agent("audit").result()
        assert json.loads((archive / "agent.json").read_text())["role"] == "security"
        assert [a.agent_id for a in engine.agents()] == ["technical", "business", "coordinator"]
    finally:
        engine.shutdown()
    ids = [a["id"] for a in json.loads((tmp_path / "ws" / "workspace.json").read_text())["agents"]]
    assert ids == ["technical", "business", "coordinator"]


def test_roster_on_the_worker_and_busy_agents(tmp_path):
    runner = FakeRunner(manual=True)
    engine = Engine(tmp_path / "ws", runner=runner, eager_restore=False)
    engine.start()
    try:
        engine.wait_ready(30)
        engine.add_agent("sec", "security", "Find bugs.").result(30)
        _, fut = engine.submit_future("sec", "hello")  # held at the runner's gate
        with pytest.raises(WorkspaceError, match="queued or running"):
            engine.rename_agent("sec", "audit").result(30)
        with pytest.raises(WorkspaceError, match="queued or running"):
            engine.remove_agent("sec").result(30)
        runner.release()
        fut.result(30)
        engine.rename_agent("sec", "audit").result(30)
        assert engine.agent("audit").turns[0].user == "hello"  # the conversation follows
        assert (tmp_path / "ws" / "agents" / "audit" / "transcript.jsonl").exists()
        archive = engine.remove_agent("audit").result(30)
        assert (archive / "transcript.jsonl").read_text().count("\n") == 1
    finally:
        runner.close()
        engine.shutdown()
