"""Are the embedded model's answers usable? Greedy decoding against the agents' default sampling
(SmolLM2's recommended temperature 0.2 and top-p 0.9, plus repetition penalty 1.1), in the same
run, on the same questions: the demo's team question and ten others, each asked of a fresh
conversation of the technical agent (its system prompt), through the Engine's public API.

    .venv/bin/python bench/answers.py [--max-tokens 256] [--seed 0] [--model SPEC] [--json]

Counted per reply: the share of repeated word 4-grams (4-grams that already occurred earlier in
the same reply: "a server being terminated by a user-level service, such as a server being
terminated..." scores high), whether the length limit cut it ("stopped: length"), its length in
tokens and the decode speed. Sampled replies use fixed seeds (seed + question index), so a run
is repeatable. The load average is printed before and after: the speeds are only comparable
within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

TEAM_QUESTION = ("We have a critical API bug affecting payment processing. "
                 "Analyze technical issues and business impact.")  # demo/two_sessions.py
QUESTIONS = (
    TEAM_QUESTION,
    "Our payment API returns 502 errors under load. What should we check first?",
    "Explain what a database connection pool is and why it can run out.",
    "How do retries with exponential backoff work, and when do they make an outage worse?",
    "What is the difference between a process and a thread?",
    "Write a short checklist for deploying a web service safely.",
    "Why would an HTTP request time out even though the server is healthy?",
    "What does a load balancer do?",
    "Give three ways to reduce the latency of a slow SQL query.",
    "What should a good incident report contain?",
    "How would you explain caching to a new developer?",
)
N = 4  # word n-grams


def repeated_ngram_share(text: str, n: int = N) -> float:
    """Share of the reply's word n-grams that already occurred earlier in it (0: none)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeated = 0
    for g in grams:
        if g in seen:
            repeated += 1
        seen.add(g)
    return repeated / len(grams)


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def ask(engine, i: int, q: str, params, label: str) -> dict:
    engine.reset("technical").result()
    r = engine.submit_future("technical", q, params=params)[1].result()
    row = {"config": label, "question": i, "tokens": r.generated,
           "cut": r.finish_reason == "length", "tok_s": r.decode_tok_s,
           "repeated_4grams": repeated_ngram_share(r.reply), "reply": r.reply}
    print(f"  {label:8s} q{i:02d} {r.generated:4d} tok {r.finish_reason:6s} "
          f"rep4 {row['repeated_4grams']:.2f}  {r.decode_tok_s:5.1f} tok/s", flush=True)
    return row


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {"replies": n,
            "mean_repeated_4grams": sum(r["repeated_4grams"] for r in rows) / n,
            "replies_with_repeats_over_10pct": sum(r["repeated_4grams"] > 0.10 for r in rows),
            "cut_by_limit": sum(r["cut"] for r in rows),
            "mean_tokens": sum(r["tokens"] for r in rows) / n,
            "mean_tok_s": sum(r["tok_s"] for r in rows) / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2)")
    ap.add_argument("--json", action="store_true", help="also print every reply as JSON")
    args = ap.parse_args(argv)

    from permeant_tui.engine import runtime

    runtime.prepare()
    from permeant_tui.engine.generation import TurnParams
    from permeant_tui.engine.settings import (
        DEFAULT_REPETITION_PENALTY,
        DEFAULT_TEMP,
        DEFAULT_TOP_P,
    )
    from permeant_tui.engine.worker import Engine

    folder = tempfile.mkdtemp(prefix="permeant-answers-")
    engine = Engine(folder, model=args.model, eager_restore=False, autosave=False)
    engine.start()
    engine.wait_ready(600)
    info = engine.model_info()
    print(f"model: {info.name if info else '?'}  max_tokens {args.max_tokens}  "
          f"questions {len(QUESTIONS)}  seed {args.seed}")
    print(f"load average before: {load()}")
    t0 = time.perf_counter()
    try:
        greedy, sampled = [], []
        for i, q in enumerate(QUESTIONS):  # paired, so a partial run still compares
            greedy.append(ask(engine, i, q, TurnParams(max_tokens=args.max_tokens), "greedy"))
            sampled.append(ask(engine, i, q, TurnParams(
                max_tokens=args.max_tokens, temp=DEFAULT_TEMP, top_p=DEFAULT_TOP_P,
                repetition_penalty=DEFAULT_REPETITION_PENALTY, seed=args.seed + i),
                "defaults"))
    finally:
        engine.shutdown()
    print(f"load average after: {load()}  ({time.perf_counter() - t0:.0f} s)")
    g, d = summary(greedy), summary(sampled)
    print()
    print(f"| decoding | mean repeated 4-grams | replies > 10% repeated | cut by the "
          f"{args.max_tokens}-token limit | mean tokens | mean tok/s |")
    print("|---|---|---|---|---|---|")
    for label, s in (("greedy (temp 0)", g), (f"defaults (temp {DEFAULT_TEMP}, top-p "
                                                  f"{DEFAULT_TOP_P}, penalty "
                                                  f"{DEFAULT_REPETITION_PENALTY})", d)):
        print(f"| {label} | {s['mean_repeated_4grams']:.1%} | "
              f"{s['replies_with_repeats_over_10pct']}/{s['replies']} | "
              f"{s['cut_by_limit']}/{s['replies']} | {s['mean_tokens']:.0f} | "
              f"{s['mean_tok_s']:.1f} |")
    ratio = (d["mean_repeated_4grams"] / g["mean_repeated_4grams"]
             if g["mean_repeated_4grams"] else float("nan"))
    print(f"\nrepeated 4-grams, defaults / greedy: {ratio:.2f}")
    if args.json:
        print(json.dumps({"greedy": greedy, "defaults": sampled}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
