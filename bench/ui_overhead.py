"""What the workspace UI costs the engine: decode tok/s with the Textual app attached against the
headless engine, on the same loaded model, in the same run (target: under 5% slower).

    .venv/bin/python bench/ui_overhead.py [--turns 3] [--max-tokens 64] [--history 0]

Each measurement is one greedy turn of a fresh agent (same prompt, so the same tokens), the
headless and UI runs interleaved so machine load drifts equally on both. The UI run is the real
`PermeantApp` run headless (`App.run_test`): the message goes through the pane's input, tokens
stream into the reply (plain text, then Markdown) and the gauges timer samples stats, as in a
terminal.

`--history K`: each measured turn comes after K earlier turns of the same conversation (the
same K in both runs, so the context decoded against is the same), which the UI shows above it:
what a person with a conversation on screen pays, where every repaint and layout visits more
widgets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PROMPT = ("Explain step by step how a key-value cache speeds up transformer decoding, "
          "and what it costs in memory.")
# --history: earlier turns, their replies rendered as Markdown above the measured one.
HISTORY = ("List five ways to cache data in a web service, with a short note on each.",
           "Now compare two of them in a markdown table.",
           "Give a code example in Python.",
           "Summarise the trade-offs in three bullet points.",
           "Which would you pick for a small team, and why?")


def prompts(history: int) -> list[str]:
    return [HISTORY[i % len(HISTORY)] for i in range(history)] + [PROMPT]


def headless_turn(lm, max_tokens: int, history: int = 0) -> tuple[float, float, int]:
    from permeant_tui.engine.worker import Engine

    with tempfile.TemporaryDirectory() as folder:
        events = []
        engine = Engine(folder, loaded=lm)
        engine.connect(events.append)
        engine.start()
        engine.wait_ready(120)
        for text in prompts(history):
            events.clear()
            t0 = time.perf_counter()
            _, future = engine.submit_future("technical", text, max_tokens)
            result = future.result(600)
            wall = time.perf_counter() - t0
        engine.shutdown()
        batches = sum(type(e).__name__ == "Tokens" for e in events)
        return result.decode_tok_s, wall, batches


async def ui_turn(lm, max_tokens: int, history: int = 0) -> tuple[float, float, int]:
    from pathlib import Path

    from permeant_tui.app import EngineEvent, PermeantApp
    from permeant_tui.engine.events import Tokens, TurnDone, TurnFailed
    from permeant_tui.engine.settings import WorkspaceSettings, save_settings
    from permeant_tui.engine.worker import Engine

    with tempfile.TemporaryDirectory() as folder:
        save_settings(Path(folder), WorkspaceSettings(max_tokens=max_tokens))  # what Enter asks
        engine = Engine(folder, loaded=lm)
        done: list[TurnDone | TurnFailed] = []
        batches = 0

        def hook(message) -> None:
            nonlocal batches
            if isinstance(message, EngineEvent):
                if isinstance(message.event, (TurnDone, TurnFailed)):
                    done.append(message.event)
                elif isinstance(message.event, Tokens):
                    batches += 1

        app = PermeantApp(engine, folder)
        async with app.run_test(size=(160, 45), message_hook=hook) as pilot:
            await asyncio.to_thread(engine.wait_ready, 120)
            pane = app.workspace.pane("technical")
            for text in prompts(history):
                done.clear()
                batches = 0
                pane.input.load_text(text)  # a TextArea: Enter sends its text
                # A person types the message first, and the screen repaints at each key; what
                # start-up left for after the first repaint (the footer recomposed for each focus
                # change) runs then, not in the turn measured.
                await pilot.pause(0.5)
                t0, cpu0 = time.perf_counter(), time.thread_time()
                await pilot.press("enter")
                while not done:
                    await asyncio.sleep(0.05)
                wall = time.perf_counter() - t0
                ui_cpu = time.thread_time() - cpu0  # the app's thread only, not the engine's
                if isinstance(done[0], TurnFailed):
                    break
        await asyncio.to_thread(engine.shutdown)
        event = done[0]
        if isinstance(event, TurnFailed):
            raise RuntimeError(f"UI turn failed: {event.kind}: {event.message}")
        ui_cpu_share.append(ui_cpu / wall)
        ui_ms_per_chunk.append(ui_cpu * 1000 / max(batches, 1))
        return event.result.decode_tok_s, wall, batches


ui_cpu_share: list[float] = []
ui_ms_per_chunk: list[float] = []  # UI thread CPU per streamed Tokens batch (whole turn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=3, help="measurements of each kind")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--history", type=int, default=0,
                    help="earlier turns of the conversation before each measured one")
    args = ap.parse_args()

    from permeant_tui.engine import runtime

    blas = runtime.prepare()
    from permeant_tui.engine.models import load_model

    lm = load_model(None)
    print(f"model {lm.identity.name} · {runtime.device_label()} · {blas} · "
          f"{args.history} earlier turns before each measured one")
    headless_turn(lm, 8)  # warm-up: first-call compilation and caches, not measured

    headless, ui = [], []
    for i in range(args.turns):
        for kind in (("headless", "ui") if i % 2 == 0 else ("ui", "headless")):
            if kind == "headless":
                tok_s, wall, batches = headless_turn(lm, args.max_tokens, args.history)
                headless.append(tok_s)
            else:
                tok_s, wall, batches = asyncio.run(ui_turn(lm, args.max_tokens, args.history))
                ui.append(tok_s)
            print(f"  {kind:8s} turn {i + 1}: decode {tok_s:6.2f} tok/s, "
                  f"turn {wall:5.1f} s, {batches} token batches  (load average "
                  f"{os.getloadavg()[0]:.1f})", flush=True)

    h, u = statistics.median(headless), statistics.median(ui)
    # Each pair ran back to back, so its ratio cancels most of the machine's load drift.
    paired = statistics.median(b / a for a, b in zip(headless, ui, strict=True))
    share = statistics.median(ui_cpu_share)
    print(f"headless engine decode: {h:.2f} tok/s (median of {len(headless)})")
    print(f"with the UI attached:   {u:.2f} tok/s (median of {len(ui)})")
    print(f"UI thread CPU while decoding: {100 * share:.1f}% of one core "
          f"({os.cpu_count()} cores here)")
    per_chunk = statistics.median(ui_ms_per_chunk)
    print(f"UI thread CPU per streamed chunk: {per_chunk:.1f} ms (whole turn's UI CPU over its "
          f"token batches; a decode step is {1000 / u:.0f} ms here)")
    print(f"ratio UI/headless: {paired:.3f} (median of paired runs; "
          f"UI overhead {100 * (1 - paired):+.1f}%, target < 5%)")
    print("load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
