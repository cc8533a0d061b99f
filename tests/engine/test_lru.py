"""LRU residency: with fewer caches allowed in memory than agents, talking to each agent in turn
evicts the least recently used one (saving it first), restores it later from its snapshot, and
every reply and every KV state equals those of a run where nothing was ever evicted."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_model

from permeant_tui.engine.events import AgentRestored
from permeant_tui.engine.snapshot import read_snapshot
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace

AGENTS = ("technical", "business", "coordinator")
ROUNDS = ("The payment API fails under load. One line, please.",
          "What is the first thing to change?",
          "And how do we know it worked?")


def talk(folder: Path, loaded, *, autosave: bool = True, **kw):
    """Each round, each agent in turn. Returns (results, events, residency after each turn,
    {agent: (ids, K/V)} from the snapshots written at shutdown)."""
    events: list = []
    # autosave off: only eviction (and shutdown) may write a snapshot
    engine = Engine(folder, loaded=loaded, on_event=events.append, eager_restore=False,
                    autosave=autosave, **kw)
    engine.start()
    results, residency = [], []
    try:
        engine.wait_ready(60)
        for msg in ROUNDS:
            for a in AGENTS:
                results.append(engine.submit_future(a, msg, max_tokens=8)[1].result(60))
                residency.append(engine.call(lambda ctx: (
                    {x.agent_id for x in ctx.workspace.agents.values() if x.resident},
                    sum(x.cache_bytes() for x in ctx.workspace.agents.values()),
                    {x.agent_id: x.dirty for x in ctx.workspace.agents.values()},
                    {x.agent_id: x.tokens_on_disk
                     for x in ctx.workspace.agents.values()})).result(60))
    finally:
        engine.shutdown()
    ws = Workspace.open(folder)
    final = {}
    for a in AGENTS:
        pairs, ids, _ = read_snapshot(ws.snapshot_path(a), loaded.identity,
                                      ws.agent(a).expected_ids(loaded.tokenizer))
        final[a] = (ids, [(np.array(k), np.array(v)) for k, v in pairs])
    return results, events, residency, final


def assert_same_run(a, b) -> None:
    (res_a, _, _, fin_a), (res_b, _, _, fin_b) = a, b
    assert [(r.agent, r.generated_ids, r.reply) for r in res_a] == \
        [(r.agent, r.generated_ids, r.reply) for r in res_b]
    for agent in AGENTS:
        (ids_a, kv_a), (ids_b, kv_b) = fin_a[agent], fin_b[agent]
        assert ids_a == ids_b
        for (k, v), (rk, rv) in zip(kv_a, kv_b, strict=True):
            assert np.array_equal(k, rk) and np.array_equal(v, rv), agent


@pytest.fixture(scope="module")
def unlimited(tmp_path_factory, tiny_model):
    run = talk(tmp_path_factory.mktemp("lru") / "all", tiny_model, max_resident=3)
    restores = [e for e in run[1] if isinstance(e, AgentRestored)]
    assert [e.source for e in restores] == ["new"] * 3  # each agent attached once, never evicted
    assert all(len(res) == 3 for res, *_ in run[2][2:])
    return run


def test_max_resident_one_evicts_saves_and_restores(tmp_path, tiny_model, unlimited):
    run = talk(tmp_path / "one", tiny_model, max_resident=1, autosave=False)
    results, events, residency, _ = run
    turn = 0
    for _ in ROUNDS:
        for a in AGENTS:
            resident, _, dirty, on_disk = residency[turn]
            assert resident == {a}, (turn, resident)
            assert dirty[a] is True  # autosave off: the agent just talked to is not saved yet
            if turn:  # the previous agent was evicted, and saved on the way out
                prev = AGENTS[(AGENTS.index(a) - 1) % 3]
                assert dirty[prev] is False and on_disk[prev] > 0
            turn += 1
    restores = [(e.agent_id, e.source, e.tokens) for e in events if isinstance(e, AgentRestored)]
    assert [s for _, s, _ in restores] == ["new"] * 3 + ["snapshot"] * 6
    # Each restore attached everything the agent held when it was evicted.
    by_agent = {a: [r for r in results if r.agent == a] for a in AGENTS}
    seen = dict.fromkeys(AGENTS, 0)
    for agent_id, _, tokens in restores[3:]:
        seen[agent_id] += 1
        assert tokens == by_agent[agent_id][seen[agent_id] - 1].in_cache
    assert all(r.source == "snapshot" for r in results[3:])
    assert_same_run(run, unlimited)


def test_memory_budget_forces_eviction(tmp_path, tiny_model):
    """A 16-layer tiny model: a fresh agent's cache is 1 MiB (mlx_lm grows it in 256-token
    steps), so a 2 MiB budget cannot hold all three: the least recently used ones go."""
    deep = make_tiny_model(tiny_model.tokenizer, seed=3, layers=16)
    ref = talk(tmp_path / "ref", deep, max_resident=3, memory_budget_mb=4096)
    assert all(len(res) == 3 for res, *_ in ref[2][2:])
    run = talk(tmp_path / "budget", deep, max_resident=3, memory_budget_mb=2)
    results, events, residency, _ = run
    order = [r.agent for r in results]
    for i, (resident, total, _, _) in enumerate(residency):
        assert total <= 2 * 1024 * 1024, (i, total)
        # What stays is always the most recently used agents: the agent of this turn, then
        # the one before it, ...
        recent = list(dict.fromkeys(reversed(order[: i + 1])))
        assert resident == set(recent[: len(resident)]), (i, resident, recent)
        if i >= 2:
            assert len(resident) < 3, (i, resident)
    restores = [e.source for e in events if isinstance(e, AgentRestored)]
    assert restores[:3] == ["new"] * 3 and restores[3:] == ["snapshot"] * (len(restores) - 3)
    assert len(restores) >= 6  # every agent was evicted and restored at least twice
    assert_same_run(run, ref)


@pytest.mark.parametrize("order", [("business", "technical"), ("technical", "business")])
def test_eager_restore_with_one_slot_takes_the_most_recently_used(tmp_path, tiny_model, order):
    """At start only max_resident agents are attached: the most recently used ones, never an
    empty agent ahead of one with a history."""
    folder = tmp_path / "ws"
    engine = Engine(folder, loaded=tiny_model, eager_restore=False)
    engine.start()
    engine.wait_ready(60)
    for a in order:
        engine.submit_future(a, ROUNDS[0], max_tokens=4)[1].result(60)
        time.sleep(0.02)  # distinct snapshot mtimes
    engine.shutdown()
    events: list = []
    engine = Engine(folder, loaded=tiny_model, eager_restore=True, max_resident=1,
                    on_event=events.append)
    engine.start()
    engine.wait_ready(60)
    engine.call(lambda ctx: None).result(60)
    engine.shutdown()
    assert [(e.agent_id, e.source) for e in events if isinstance(e, AgentRestored)] == \
        [(order[-1], "snapshot")]


def test_room_is_made_before_the_restore(tmp_path, tiny_model, monkeypatch):
    """The agents a restore displaces leave before it reads its snapshot: while it runs, the
    others resident stay within max_resident - 1 and, with the incoming agent's snapshot, within
    the memory budget (the restore then lands in the buffers they released)."""
    seen: list[tuple[str, bool, set[str], int, int]] = []
    real = Workspace.ensure_resident

    def spy(self, agent, loaded, **kw):
        others = [a for a in self.agents.values() if a.resident and a is not agent]
        seen.append((agent.agent_id, agent.resident, {a.agent_id for a in others},
                     sum(a.cache_bytes() for a in others), agent.bytes_on_disk))
        return real(self, agent, loaded, **kw)

    monkeypatch.setattr(Workspace, "ensure_resident", spy)
    deep = make_tiny_model(tiny_model.tokenizer, seed=3, layers=16)
    budget = 2
    run = talk(tmp_path / "budget", deep, max_resident=2, memory_budget_mb=budget)
    restores = [(e.agent_id, e.source) for e in run[1] if isinstance(e, AgentRestored)]
    assert sum(s == "snapshot" for _, s in restores) >= 4  # agents left and came back
    attaching = [x for x in seen if not x[1]]
    assert len(attaching) == len(restores)
    for agent_id, _, others, others_bytes, incoming in attaching:
        assert len(others) <= 1, (agent_id, others)
        assert others_bytes + incoming <= budget * 1024 * 1024, (agent_id, others_bytes, incoming)
    # a snapshot restore is never attached next to the agent it displaced
    for (agent_id, source), (_, _, others, _, _) in zip(restores, attaching, strict=True):
        if source == "snapshot":
            assert agent_id not in others


def test_a_restore_after_an_eviction_reads_into_the_evicted_buffers(tmp_path, tiny_model,
                                                                     unlimited, monkeypatch):
    """With one slot, every restore follows an eviction: it takes the evicted agent's K/V
    buffers (blockload.Donors) and the run equals the one where nothing was evicted."""
    from permeant_tui.engine import blockload

    taken: list[int] = []
    real = blockload.Donors.take

    def counted(self, stream, exact=False):
        got = real(self, stream, exact)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(blockload.Donors, "take", counted)
    run = talk(tmp_path / "one", tiny_model, max_resident=1)
    restores = [e.source for e in run[1] if isinstance(e, AgentRestored)]
    assert restores.count("snapshot") == 6
    assert sum(taken) == len(taken) > 0  # every buffer of every restore was a donor's
    assert_same_run(run, unlimited)
