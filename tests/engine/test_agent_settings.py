"""Per-agent generation settings (issue 15): stored in workspace.json, checked with one clear
line, used by turns submitted without params; PERMEANT_GREEDY=1 (tests, benchmarks) keeps those
turns greedy; the repetition penalty reaches mlx_lm's logits processors."""

from __future__ import annotations

import json

import pytest
from support.fake_runner import FakeRunner
from support.tiny_models import tiny_model

from permeant_tui.engine.errors import WorkspaceError
from permeant_tui.engine.generation import TurnParams
from permeant_tui.engine.settings import (
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMP,
    DEFAULT_TOP_P,
    WorkspaceSettings,
    load_settings,
    parse_settings,
)
from permeant_tui.engine.worker import Engine, agent_params


def test_defaults_are_smollm2s_recommended_sampling(monkeypatch):
    monkeypatch.delenv("PERMEANT_GREEDY", raising=False)
    p = agent_params(WorkspaceSettings(), "technical")
    assert (p.temp, p.top_p, p.repetition_penalty, p.max_tokens) == \
        (DEFAULT_TEMP, DEFAULT_TOP_P, DEFAULT_REPETITION_PENALTY, 256)
    assert 0 < p.temp <= 0.3 and p.top_p < 1 and 1 < p.repetition_penalty <= 1.2
    monkeypatch.setenv("PERMEANT_GREEDY", "1")
    assert agent_params(WorkspaceSettings(), "technical") == TurnParams(max_tokens=256)


def test_settings_file_fields_are_checked_by_name():
    agent = {"id": "a", "role": "r", "title": "t", "system": "s"}
    s = parse_settings({"agents": [{**agent, "temp": 0.7, "max_tokens": 64}]})
    assert (s.agents[0].temp, s.agents[0].max_tokens, s.agents[0].top_p) == (0.7, 64, 0.9)
    for field, value, says in (("top_p", 0, "top_p must be above 0"),
                               ("temp", "hot", "temp must be a number"),
                               ("repetition_penalty", 0.5, "repetition_penalty must be between"),
                               ("max_tokens", 0, "max_tokens must be a whole number >= 1")):
        with pytest.raises(WorkspaceError, match=f"agents\\[0\\]' {says}"):
            parse_settings({"agents": [{**agent, field: value}]})


def test_turns_without_params_use_the_agents_settings_and_edits_persist(tmp_path, monkeypatch):
    monkeypatch.delenv("PERMEANT_GREEDY", raising=False)
    runner = FakeRunner()
    engine = Engine(tmp_path / "ws", runner=runner, eager_restore=False)
    engine.start()
    try:
        engine.wait_ready(30)
        engine.submit_future("technical", "hi")[1].result(30)
        assert runner.params[-1] == TurnParams(max_tokens=256, temp=0.2, top_p=0.9,
                                               repetition_penalty=1.1)
        with pytest.raises(WorkspaceError, match="temp must be between 0 and 5"):
            engine.update_agent_settings("technical", temp=-1)
        spec = engine.update_agent_settings("technical", temp=0.7, max_tokens=64).result(30)
        assert (spec.temp, spec.max_tokens) == (0.7, 64)
        engine.submit_future("technical", "again")[1].result(30)
        assert runner.params[-1] == TurnParams(max_tokens=64, temp=0.7, top_p=0.9,
                                               repetition_penalty=1.1)
        explicit = TurnParams(max_tokens=5)  # a front end's explicit params win (--temp 0)
        engine.submit_future("technical", "greedy", params=explicit)[1].result(30)
        assert runner.params[-1] == explicit
        engine.submit_future("business", "hi")[1].result(30)  # other agents keep theirs
        assert runner.params[-1].temp == 0.2
    finally:
        engine.shutdown()
    raw = json.loads((tmp_path / "ws" / "workspace.json").read_text())
    tech = next(a for a in raw["agents"] if a["id"] == "technical")
    assert (tech["temp"], tech["max_tokens"]) == (0.7, 64)
    assert load_settings(tmp_path / "ws").agent("technical").temp == 0.7


def test_repetition_penalty_changes_a_looping_greedy_reply(real_model):
    """On a random-weight model greedy decoding repeats tokens; the penalty (mlx_lm's logits
    processor) makes the reply repeat fewer within its context window."""
    from permeant_tui.engine.agent import Agent
    from permeant_tui.engine.generation import REPETITION_CONTEXT, run_turn

    lm = tiny_model("llama", real_model.tokenizer)[1]

    def reply(penalty):
        agent = Agent("t", "t", "T", "You are terse.")
        r = run_turn(lm.model, lm.tokenizer, agent, "Say something.",
                     TurnParams(max_tokens=40, repetition_penalty=penalty), context_limit=4096,
                     turn_id=1, emit=lambda e: None, cancel=__import__("threading").Event(),
                     source="new")
        return list(r.generated_ids)

    def repeats(ids):
        return sum(1 for i, t in enumerate(ids) if t in ids[max(0, i - REPETITION_CONTEXT):i])

    plain, penalised = reply(None), reply(2.0)
    assert repeats(plain) > 0, "the tiny model is expected to repeat itself greedily"
    assert repeats(penalised) < repeats(plain)
