"""Prompt-lookup decoding (engine/lookup.py) against plain decoding, on the coordinator's kind of
reply (restating a brief that quotes its colleagues) and on open-ended text.

    PERMEANT_LOOKUP=1 .venv/bin/python bench/lookup.py [--tokens 96] [--repeats 3] [--model M]

For each prompt, the same greedy turn from the same empty agent with `TurnParams(lookup=True)`
and `lookup=False`, alternating, `--repeats` times; printed: decode tok/s of each (median),
the ratio lookup / plain measured in the same run, the share of drafted tokens kept, whether
the ids are identical, and the load average (the machine is shared: trust the ratios).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from permeant_tui.engine import runtime  # noqa: E402

os.environ.setdefault("PERMEANT_LOOKUP", "1")  # the bench compares it on and off
runtime.prepare()

TECHNICAL = ("The payment API returns 502 errors under load because the retry logic retries "
             "every failed request three times without backoff, so each slow response from "
             "the card network turns into four requests, and the connection pool of forty "
             "connections is exhausted within seconds. The fix is exponential backoff with "
             "jitter, a retry budget of ten percent, and a circuit breaker on the gateway.")
BUSINESS = ("Checkout failures cost us about two percent of orders during the evening peak; "
            "customers who see an error twice abandon the cart, and the support team spends "
            "the next morning issuing refunds. The priority is to stop the failures before the "
            "holiday campaign starts on Friday, then to tell affected customers what happened.")
PROMPTS = {
    "coordinator brief": ("Technical said: " + TECHNICAL + "\n\nBusiness said: " + BUSINESS +
                          "\n\nWrite the plan: restate what each of them said, in their words, "
                          "then say what to do first."),
    "open-ended": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def run(lm, text: str, tokens: int, use_lookup: bool):
    from permeant_tui.engine.agent import Agent
    from permeant_tui.engine.generation import TurnParams, run_turn

    agent = Agent("coordinator", "coordinator", "Coordinator",
                  "You are the coordinator: you turn your colleagues' answers into a plan.", [])
    kept = []
    from permeant_tui.engine import lookup

    real = lookup.lookup_generate_step

    def counting(*a, **kw):
        kw["on_draft"] = lambda p, k: kept.append((p, k))
        return real(*a, **kw)

    lookup.lookup_generate_step = counting
    try:
        r = run_turn(lm.model, lm.tokenizer, agent, text, TurnParams(max_tokens=tokens,
                     lookup=use_lookup), context_limit=8192, turn_id=1, emit=lambda e: None,
                     cancel=threading.Event(), source="new")
    finally:
        lookup.lookup_generate_step = real
    proposed = sum(p for p, _ in kept)
    return r.decode_tok_s, r.generated_ids, (sum(k for _, k in kept) / proposed if proposed else 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    from permeant_tui.engine.models import load_model

    lm = load_model(args.model)
    print(f"model {lm.identity.name}; {args.tokens} greedy tokens per reply; "
          f"{runtime.kernel_labels()}")
    print(f"{'prompt':<18} {'plain tok/s':>11} {'lookup tok/s':>12} {'ratio':>6} "
          f"{'drafts kept':>11} {'ids':>6}  load")
    for name, text in PROMPTS.items():
        run(lm, text, 8, True)  # warm
        plain, drafted, share, same = [], [], 0.0, True
        for _ in range(args.repeats):
            tp, ids_p, _ = run(lm, text, args.tokens, False)
            tl, ids_l, share = run(lm, text, args.tokens, True)
            plain.append(tp)
            drafted.append(tl)
            same = same and ids_p == ids_l
        p, d = statistics.median(plain), statistics.median(drafted)
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{name:<18} {p:>11.1f} {d:>12.1f} {d / p:>6.2f} {share:>11.0%} "
              f"{'same' if same else 'DIFFER':>6}  {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
