"""Continue a reply cut by the length limit, and regenerate the last reply (issue 15), on a plain
llama and on Gemma 3 (sliding-window layers past their window), with the real Engine on tiny
random-weight models, each compared against a rebuild.

Continue feeds only the reply's last token again (the cache holds it, not the logits after it):
greedy, 12 tokens then a continue of 12 must equal one 24-token reply. Regenerate rewinds the
reply and samples again: resumed from its snapshot, the same seed samples the same tokens; greedy,
a resumed and a rebuilt workspace give the first reply back. A cancelled regenerate or continue keeps the old reply, in the transcript and the
cache. Transcripts stay append-only: the longer or new reply is a line that replaces the last.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.tiny_models import tiny_model

from permeant_tui.engine import kvcache
from permeant_tui.engine.errors import NothingToDo, TurnCancelled
from permeant_tui.engine.events import Tokens, TurnStarted
from permeant_tui.engine.generation import TurnParams
from permeant_tui.engine.worker import Engine
from permeant_tui.engine.workspace import Workspace

AGENT = "technical"
MSG = "Our payment API returns 502 errors under load."
ARCHS = ["llama", "gemma3_text"]
# Gemma's tiny model has a 64-token window: a 40-token reply takes the cache past it.
HALF = {"llama": 12, "gemma3_text": 40}


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model.tokenizer


class Session:
    def __init__(self, folder: Path, lm, *, rebuild: bool = False, on_event=None) -> None:
        self.events: list = []
        self.on_event = on_event
        self.engine = Engine(folder, loaded=lm, eager_restore=False, on_event=self._sink,
                             rebuild=rebuild)
        self.engine.start()
        self.engine.wait_ready(60)

    def _sink(self, ev) -> None:
        self.events.append(ev)
        if self.on_event:
            self.on_event(self.engine, ev)

    def agrees(self) -> list[int]:
        def check(ctx):
            agent = ctx.workspace.agent(AGENT)
            expected = agent.expected_ids(ctx.model.tokenizer)
            assert agent.cache_ids == expected
            assert kvcache.cache_offset(agent.cache) == len(expected)
            return expected

        return self.engine.call(check).result(60)

    def close(self) -> None:
        self.engine.shutdown(timeout=120)


def turns_on_disk(folder: Path):
    return Workspace.open(folder).agent(AGENT).turns


@pytest.mark.parametrize("arch", ARCHS)
def test_continue_extends_the_reply_as_one_longer_reply_would(tmp_path, tok, arch):
    lm = tiny_model(arch, tok)[1]
    n = HALF[arch]
    s = Session(tmp_path / "ws", lm)
    try:
        first = s.engine.submit_future(AGENT, MSG, params=TurnParams(max_tokens=n))[1].result(300)
        assert first.finish_reason == "length" and first.generated == n
        before = len(s.agrees())
        _, fut = s.engine.continue_reply(AGENT, params=TurnParams(max_tokens=n))
        more = fut.result(300)
        started = [e for e in s.events if isinstance(e, TurnStarted)][-1]
        assert started.kind == "continue" and started.to_prefill == 1  # no re-prefill
        assert (more.kind, more.cached, more.prefilled, more.generated) == \
            ("continue", before - 1, 1, n)
        if arch == "gemma3_text":  # a full window cannot move back one token: rebuilt
            assert more.rewind == "rebuild"
        else:
            assert more.rewind == "trim"
        assert more.generated_ids[:n] == first.generated_ids
        assert more.reply.startswith(first.reply.rstrip())
        assert len(s.agrees()) == before + n
        assert len(s.engine.agent(AGENT).turns) == 1
    finally:
        s.close()
    turns = turns_on_disk(tmp_path / "ws")
    assert len(turns) == 1 and turns[0].generated_ids == more.generated_ids
    assert turns[0].reply == more.reply

    one = Session(tmp_path / "one", lm)  # the same reply asked for in one go
    try:
        whole = one.engine.submit_future(AGENT, MSG, params=TurnParams(max_tokens=2 * n))[1]
        assert whole.result(300).generated_ids == more.generated_ids
    finally:
        one.close()

    shutil.copytree(tmp_path / "ws", tmp_path / "rebuilt")
    replies = []
    for folder, rebuild in ((tmp_path / "ws", False), (tmp_path / "rebuilt", True)):
        again = Session(folder, lm, rebuild=rebuild)
        try:
            r = again.engine.submit_future(AGENT, "And after the fix?",
                                           params=TurnParams(max_tokens=8))[1].result(300)
            again.agrees()
            replies.append(r.generated_ids)
        finally:
            again.close()
    assert replies[0] == replies[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_regenerate_samples_the_last_reply_again(tmp_path, tok, arch):
    lm = tiny_model(arch, tok)[1]
    n = HALF[arch]
    sampled = TurnParams(max_tokens=n, temp=1.0, seed=7)
    s = Session(tmp_path / "ws", lm)
    try:
        first = s.engine.submit_future(AGENT, MSG, params=TurnParams(max_tokens=n))[1].result(300)
        ids = s.agrees()
        greedy = s.engine.regenerate(AGENT, params=TurnParams(max_tokens=n))[1].result(300)
        assert greedy.kind == "regenerate" and greedy.generated_ids == first.generated_ids
        assert s.agrees() == ids and len(s.engine.agent(AGENT).turns) == 1
        again = s.engine.regenerate(AGENT, params=sampled)[1].result(300)
        assert again.generated_ids != first.generated_ids
        assert len(s.engine.agent(AGENT).turns) == 1
        s.agrees()
    finally:
        s.close()
    turns = turns_on_disk(tmp_path / "ws")
    assert len(turns) == 1 and turns[0].generated_ids == again.generated_ids

    # Resumed from its snapshot, the same seed samples the same reply (the same K/V, bit for
    # bit); greedy, the resumed cache and one rebuilt by prefill both give the first reply back.
    shutil.copytree(tmp_path / "ws", tmp_path / "rebuilt")
    r = Session(tmp_path / "ws", lm)
    try:
        assert r.engine.regenerate(AGENT, params=sampled)[1].result(300).generated_ids == \
            again.generated_ids
        r.agrees()
        assert r.engine.regenerate(AGENT, params=TurnParams(max_tokens=n))[1].result(300) \
            .generated_ids == first.generated_ids
    finally:
        r.close()
    b = Session(tmp_path / "rebuilt", lm, rebuild=True)
    try:
        assert b.engine.regenerate(AGENT, params=TurnParams(max_tokens=n))[1].result(300) \
            .generated_ids == first.generated_ids
        b.agrees()
    finally:
        b.close()


@pytest.mark.parametrize("kind", ["continue", "regenerate"])
def test_a_cancelled_continue_or_regenerate_keeps_the_old_reply(tmp_path, tok, kind,
                                                                token_by_token):
    lm = tiny_model("gemma3_text", tok)[1]
    n = HALF["gemma3_text"]
    armed = []

    def cancel_mid_reply(engine, ev):
        if armed and isinstance(ev, Tokens) and sum(len(e.ids) for e in armed[0].events
                                                    if isinstance(e, Tokens)) > 3:
            armed.clear()
            engine.cancel(AGENT)

    s = Session(tmp_path / "ws", lm, on_event=cancel_mid_reply)
    try:
        first = s.engine.submit_future(AGENT, MSG, params=TurnParams(max_tokens=n))[1].result(300)
        ids = s.agrees()
        s.events.clear()
        armed.append(s)
        redo = s.engine.continue_reply if kind == "continue" else s.engine.regenerate
        with pytest.raises(TurnCancelled):
            redo(AGENT, params=TurnParams(max_tokens=n, temp=1.0, seed=3))[1].result(300)
        assert s.agrees() == ids
        assert s.engine.agent(AGENT).turns[-1].reply == first.reply
    finally:
        s.close()
    turns = turns_on_disk(tmp_path / "ws")
    assert [t.generated_ids for t in turns] == [first.generated_ids]


def test_nothing_to_continue_says_so(tmp_path, tok):
    lm = tiny_model("llama", tok)[1]
    s = Session(tmp_path / "ws", lm)
    try:
        with pytest.raises(NothingToDo, match="no reply to continue"):
            s.engine.continue_reply(AGENT)
        with pytest.raises(NothingToDo, match="no reply to regenerate"):
            s.engine.regenerate(AGENT)
    finally:
        s.close()
