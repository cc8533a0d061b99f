"""Per-message figures survive a restart (issue 15): each transcript line keeps how its reply
was made (tokens, decode speed, TTFT, reused and prefilled tokens, why it stopped), and the
pane shows them under the reply in the next session; older lines without them still load."""

from __future__ import annotations

import json

from support.tiny_models import tiny_model

from permeant_tui.engine.generation import TurnParams
from permeant_tui.engine.worker import Engine
from permeant_tui.widgets.agent_pane import history_note


def test_turn_figures_are_kept_in_the_transcript(tmp_path, real_model):
    lm = tiny_model("llama", real_model.tokenizer)[1]
    e = Engine(tmp_path / "ws", loaded=lm, eager_restore=False)
    e.start()
    try:
        e.wait_ready(60)
        r = e.submit_future("technical", "Hello?", params=TurnParams(max_tokens=6))[1].result(300)
        more = e.continue_reply("technical", params=TurnParams(max_tokens=4))[1].result(300)
    finally:
        e.shutdown()
    line = json.loads((tmp_path / "ws/agents/technical/transcript.jsonl").read_text()
                      .splitlines()[-1])
    assert line["replaces"] is True and line["stats"]["generated"] == 10
    again = Engine(tmp_path / "ws", loaded=lm, eager_restore=False)
    try:
        (turn,) = again.agent("technical").turns
    finally:
        again.shutdown()
    assert turn.stats["finish"] == "length" and turn.stats["prefilled"] == 1
    assert turn.stats["cached"] == more.cached and r.generated == 6
    assert history_note(turn.stats).startswith("10 tokens · ")
    assert "stopped: length" in history_note(turn.stats)


def test_history_note_tolerates_old_and_odd_records():
    assert history_note(None) == ""
    assert history_note({"generated": "x"}) == ""
    assert history_note({"generated": 3, "decode_tok_s": 12.5, "finish": "stop"}) == \
        "3 tokens · 12.5 tok/s"
