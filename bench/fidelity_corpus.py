"""The conversations bench/fidelity.py probes: deterministic, written here, no network.

Six kinds (technical, business and coordinator turns; code; lists; long logs), each at six
sizes from about 200 to 4,000 tokens of cached context. Every conversation is built from the
fragments below with a `random.Random` seeded by its name, so a run on another day or machine
probes the same token ids (the tokenizer being the model's). Replies are written text, tokenized
as if the model had generated them (followed by the end-of-turn token, as the engine caches a
reply).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SIZES = (240, 450, 900, 1600, 2600, 4000)
QUICK = (("technical", 450), ("code", 900), ("logs", 1600), ("business", 240))

SYSTEMS = {
    "technical": "You are a technical expert specializing in API debugging and system architecture.",
    "business": "You are a business analyst focused on ROI, market impact, and strategy.",
    "coordinator": "You are a coordinator who synthesizes technical and business perspectives.",
}

SERVICES = ["payments API", "ledger service", "checkout gateway", "search indexer", "auth proxy",
            "notification worker", "billing exporter", "inventory sync", "webhook relay",
            "report builder", "session store", "rate limiter"]
CAUSES = ["a connection pool capped at 50", "a schema migration holding a table lock",
          "retries without jitter", "a DNS TTL of one hour", "an unbounded in-memory queue",
          "a missing index on created_at", "TLS handshakes on every request",
          "a cache stampede after the nightly flush", "a slow disk on the primary replica",
          "clock skew between two regions", "a garbage-collection pause of 900 ms",
          "a feature flag enabled for every tenant at once"]
METRICS = ["p99 latency", "error rate", "queue depth", "CPU steal", "open file descriptors",
           "replication lag", "cache hit ratio", "heap size", "request volume", "timeout count"]
MARKETS = ["mid-market retail", "enterprise logistics", "healthcare clinics", "public sector",
           "small online shops", "travel agencies", "insurance brokers", "fintech startups"]
BIZ = ["churn", "gross margin", "customer acquisition cost", "net revenue retention",
       "average contract value", "sales cycle length", "support cost per ticket", "payback period"]

TECH_Q = [
    "The {svc} started failing after yesterday's deploy. We see {metric} climbing and suspect "
    "{cause}. How would you confirm it before we roll back?",
    "Can you explain why {cause} would show up as a rise in {metric} on the {svc} but not on "
    "the services that call it?",
    "We want to move the {svc} behind the {svc2}. What breaks if we do that without changing "
    "the timeouts, and which metric should we watch first?",
    "Our on-call engineer says {cause} is unrelated. The dashboards show {metric} at three "
    "times its usual value since 02:10 UTC. Who is right?",
    "Design a safer retry policy for the {svc}: callers currently retry five times immediately "
    "and the {svc2} falls over within a minute.",
    "What would a minimal load test look like that reproduces {cause} on a staging copy of the "
    "{svc}?",
]
TECH_A = [
    "Start with the timeline. If {metric} rose within a minute of the deploy, compare the two "
    "builds' configuration first: {cause} is the usual suspect when only one service degrades. "
    "Check the pool metrics, then take a thread dump during the next spike and count blocked "
    "threads. If more than half wait on the same lock, you have your answer.",
    "The callers time out before the {svc} answers, so from their side it looks like slowness, "
    "not errors. {cause_cap} makes the {svc} queue work internally; its own {metric} grows "
    "while the callers only see longer waits and eventually retries, which make it worse.",
    "Three things change: the {svc2} adds a hop, its default timeout of 30 seconds is longer "
    "than the {svc}'s 10, and its connection reuse hides {cause}. Watch {metric} on both sides "
    "for a day before you cut over, and set the outer timeout below the inner one.",
    "Both may be. Correlation is not enough: disable the suspected path on one instance only "
    "and compare its {metric} with the others for fifteen minutes. If it recovers alone, "
    "{cause} is the driver; if not, look at what else shipped in the same release.",
    "Use capped exponential backoff with full jitter: the first retry after 100 ms times a "
    "random factor, doubling up to 5 seconds, at most three attempts, and only for idempotent "
    "requests. Add a circuit breaker that opens when {metric} passes its alert threshold.",
    "Copy one day of production traffic shape, not its volume: replay it at two, four and "
    "eight times speed against staging while you record {metric}. {cause_cap} usually appears "
    "at the second step; if it does not, add the nightly batch job to the mix.",
]
BIZ_Q = [
    "If the {svc} outage lasts another day, what does it cost us with {market} customers, and "
    "how does that change our {biz} forecast for the quarter?",
    "Should we price the new {svc} tier per seat or per request for {market}? Our {biz} is "
    "already under pressure.",
    "The board asks whether entering {market} is worth a second sales team. What numbers "
    "would you want before answering?",
    "Compare two options: discount renewals by 15 percent to protect {biz}, or invest the same "
    "amount in onboarding for {market}.",
    "How should we explain last month's incident to {market} customers without hurting "
    "{biz}?",
]
BIZ_A = [
    "Roughly: the accounts in {market} that depend on the {svc} make up about a fifth of "
    "recurring revenue. A second day of outage adds refunds, a spike in support cost and, more "
    "important, renewal risk. I would model {biz} with and without a 2 percent churn bump and "
    "show both to the leadership team.",
    "Per request aligns price with value for {market}, whose usage is seasonal, but it makes "
    "revenue harder to forecast. Per seat is simpler to sell. Given the pressure on {biz}, I "
    "would offer per seat with a generous request allowance and an overage fee.",
    "Four figures: the size of the addressable segment, the expected {biz} of the first "
    "twenty accounts, the ramp time of a new team, and the cost of serving {market} with the "
    "current product. If payback exceeds eighteen months, wait one more quarter.",
    "The discount buys time but trains customers to expect it at every renewal. Onboarding "
    "investment improves {biz} durably if activation is the real problem. Look at accounts "
    "that churned: did they ever reach the second workflow? If not, choose onboarding.",
    "Be specific and short: what happened, how long, which data was affected (none), what we "
    "changed so it cannot recur, and a credit for the affected hours. {market} customers "
    "value candour over polish, and a clear account protects {biz} better than silence.",
]
COORD_Q = [
    "The technical lead wants a two-week freeze to fix {cause}; sales wants the {svc} feature "
    "shipped for {market}. Summarize both positions and propose a plan.",
    "Give me a one-paragraph status for the steering meeting: incident on the {svc}, impact on "
    "{biz}, and next steps.",
    "We have three open risks: {cause}, a slipping launch in {market}, and rising {metric}. "
    "Rank them and assign owners.",
    "Write the decision record for moving the {svc} to a managed service, with the trade-offs "
    "both teams raised.",
]
COORD_A = [
    "Engineering argues that {cause} will cause another outage within weeks, and a freeze is "
    "the cheapest insurance. Sales argues that {market} prospects will sign elsewhere if the "
    "feature slips. Plan: a one-week freeze limited to the {svc}, the feature behind a flag, "
    "and a joint review of {metric} before the flag opens to the first ten customers.",
    "Status: the {svc} incident is resolved; root cause was {cause}. Customer impact was "
    "limited to {market} accounts for 47 minutes. Expected effect on {biz} is small if credits "
    "go out this week. Next: a permanent fix in the next sprint and a runbook update.",
    "First, {cause}: it can take production down, owner the platform team, due Friday. "
    "Second, rising {metric}: an early warning of the first, same owner, tracked daily. Third, "
    "the {market} launch: a revenue risk, owner the product manager, with a go or no-go on "
    "Monday.",
    "Decision: move the {svc} to the managed offering in Q3. For: no more patching, built-in "
    "failover, and lower on-call load. Against: a 20 percent higher bill and less control over "
    "{metric}. Both teams agreed to revisit if {biz} falls below plan.",
]
CODE_Q = [
    "Review this function, it is slow on large inputs:\n\n```python\ndef {fn}(items):\n    "
    "out = []\n    for a in items:\n        if a not in out:\n            out.append(a)\n    "
    "return sorted(out, key=lambda x: x.{attr})\n```",
    "Why does this query take {n} seconds?\n\n```sql\nSELECT o.id, o.total, c.name\nFROM "
    "orders o JOIN customers c ON c.id = o.customer_id\nWHERE date(o.created_at) = "
    "'2024-03-{day:02d}'\nORDER BY o.total DESC;\n```",
    "This shell script sometimes deletes the wrong folder:\n\n```sh\ncd $BACKUP_DIR\nrm -rf "
    "{fn}_*\ntar czf {fn}.tgz /var/lib/{fn}\n```",
    "Add retries to this client:\n\n```python\nimport requests\n\ndef {fn}(url, payload):\n"
    "    r = requests.post(url, json=payload, timeout={n})\n    r.raise_for_status()\n"
    "    return r.json()\n```",
    "What does this Go snippet do wrong?\n\n```go\nfor _, job := range jobs {{\n    go func() "
    "{{\n        process(job.{attr})\n    }}()\n}}\n```",
]
CODE_A = [
    "The membership test on a list makes it quadratic. Keep a set of seen items:\n\n```python\n"
    "def {fn}(items):\n    seen = set()\n    out = []\n    for a in items:\n        if a not in "
    "seen:\n            seen.add(a)\n            out.append(a)\n    out.sort(key=lambda x: "
    "x.{attr})\n    return out\n```\n\nThis is linear apart from the sort.",
    "`date(o.created_at)` hides the column from the index, so every row is scanned. Compare "
    "with a range instead:\n\n```sql\nWHERE o.created_at >= '2024-03-{day:02d}'\n  AND "
    "o.created_at < '2024-03-{day2:02d}'\n```\n\nand make sure there is an index on "
    "`orders(created_at)`.",
    "If `cd` fails (an unset or missing `$BACKUP_DIR`), `rm` runs in the current folder. Quote "
    "the variable and stop on errors:\n\n```sh\nset -euo pipefail\ncd \"${{BACKUP_DIR:?}}\"\n"
    "rm -rf -- ./{fn}_*\n```",
    "Retry only idempotent failures, with backoff:\n\n```python\nimport time, random\n\ndef "
    "{fn}(url, payload, attempts=3):\n    for i in range(attempts):\n        try:\n            "
    "r = requests.post(url, json=payload, timeout={n})\n            r.raise_for_status()\n"
    "            return r.json()\n        except requests.ConnectionError:\n            if i "
    "== attempts - 1:\n                raise\n            time.sleep(0.1 * 2 ** i * "
    "random.random())\n```",
    "Before Go 1.22 every goroutine captures the same loop variable, so most of them process "
    "the last job. Pass it as an argument:\n\n```go\nfor _, job := range jobs {{\n    go "
    "func(j Job) {{\n        process(j.{attr})\n    }}(job)\n}}\n```\n\nAnd wait for them with a "
    "`sync.WaitGroup`.",
]
FUNCS = ["dedupe", "merge_rows", "collect", "unique_users", "backup", "sync_orders", "fetch"]
ATTRS = ["name", "created_at", "priority", "score", "user_id", "amount"]
LIST_Q = [
    "List the steps to rotate the {svc}'s TLS certificate without downtime.",
    "Give me a checklist for the {market} launch review.",
    "What should the runbook for {cause} contain? Use a numbered list.",
    "List the metrics we should alert on for the {svc}, with thresholds.",
    "Enumerate the questions to ask a vendor before buying a managed {svc}.",
]
LIST_ITEMS = [
    "Confirm the owner and the on-call contact for the {svc}.",
    "Record the current value of {metric} as a baseline.",
    "Check that {cause} is covered by an alert.",
    "Prepare a rollback command and test it in staging.",
    "Announce the change window to {market} customers one day ahead.",
    "Verify dashboards show {metric} per instance, not only the average.",
    "Write down the expected effect on {biz}.",
    "Schedule a review one week after the change.",
    "Export the configuration of the {svc} before editing it.",
    "Keep the old version running until the error rate is flat for an hour.",
    "Alert when {metric} exceeds twice its weekly median for ten minutes.",
    "Tag every request with a correlation id that reaches the {svc2}.",
]
LEVELS = ["INFO", "INFO", "INFO", "WARN", "ERROR", "DEBUG"]
LOG_MSGS = [
    "request completed status={status} path=/v1/{path} latency_ms={ms} bytes={bytes}",
    "upstream {svc} responded slowly latency_ms={ms} attempt={attempt}",
    "connection pool usage={pool}/50 waiting={wait}",
    "retrying request id={rid} after {ms} ms (attempt {attempt} of 5)",
    "cache miss key=user:{uid}:profile ttl=300",
    "job {fn} finished rows={bytes} duration_ms={ms}",
    "circuit breaker for {svc} state={state}",
    "slow query detected duration_ms={ms} table=orders rows_examined={bytes}",
]
PATHS = ["payments", "orders", "customers/{uid}", "refunds", "invoices", "webhooks", "search"]


@dataclass(frozen=True)
class Conversation:
    name: str
    kind: str
    role: str
    system: str
    turns: tuple[tuple[str, str], ...]  # (user, reply), the last reply cached as generated


class _Fill(dict):
    def __missing__(self, key):
        raise KeyError(key)


def _slots(r: random.Random) -> _Fill:
    svc, svc2 = r.sample(SERVICES, 2)
    cause = r.choice(CAUSES)
    day = r.randint(1, 27)
    return _Fill(svc=svc, svc2=svc2, cause=cause, cause_cap=cause[0].upper() + cause[1:],
                 metric=r.choice(METRICS), market=r.choice(MARKETS), biz=r.choice(BIZ),
                 fn=r.choice(FUNCS), attr=r.choice(ATTRS), n=r.randint(2, 40), day=day,
                 day2=day + 1)


def _log_block(r: random.Random, lines: int) -> str:
    t = r.randint(0, 3600)
    out = []
    for _ in range(lines):
        t += r.randint(0, 7)
        s = _slots(r)
        msg = r.choice(LOG_MSGS).format(
            status=r.choice([200, 200, 200, 201, 404, 500, 502, 504]),
            path=r.choice(PATHS).format(uid=r.randint(1000, 99999)), ms=r.randint(3, 4800),
            bytes=r.randint(120, 90000), svc=s["svc"], attempt=r.randint(1, 5),
            pool=r.randint(10, 50), wait=r.randint(0, 30), rid=f"{r.getrandbits(48):012x}",
            uid=r.randint(1000, 99999), fn=s["fn"], state=r.choice(["open", "half-open", "closed"]))
        out.append(f"2024-03-14T{2 + t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}Z "
                   f"{r.choice(LEVELS):5s} [{s['svc'].replace(' ', '-')}] {msg}")
    return "\n".join(out)


def _turn(kind: str, r: random.Random) -> tuple[str, str]:
    s = _slots(r)
    if kind == "technical":
        return r.choice(TECH_Q).format_map(s), r.choice(TECH_A).format_map(s)
    if kind == "business":
        return r.choice(BIZ_Q).format_map(s), r.choice(BIZ_A).format_map(s)
    if kind == "coordinator":
        return r.choice(COORD_Q).format_map(s), r.choice(COORD_A).format_map(s)
    if kind == "code":
        i = r.randrange(len(CODE_Q))
        return CODE_Q[i].format_map(s), CODE_A[i].format_map(s)
    if kind == "lists":
        items = r.sample(LIST_ITEMS, r.randint(4, 8))
        bullet = r.choice(["{i}. ", "- ", "* "])
        body = "\n".join(bullet.format(i=i + 1) + it.format_map(s) for i, it in enumerate(items))
        return r.choice(LIST_Q).format_map(s), f"Here is the list:\n\n{body}"
    if kind == "logs":
        n = r.randint(20, 60)
        user = (f"Here are the last {n} log lines from the {s['svc']}. What is going on?\n\n"
                f"```\n{_log_block(r, n)}\n```")
        return user, r.choice(TECH_A).format_map(s)
    raise ValueError(kind)


_ROLE = {"technical": "technical", "business": "business", "coordinator": "coordinator",
         "code": "technical", "lists": "coordinator", "logs": "technical"}
KINDS = tuple(_ROLE)


def _trimmed(text: str, units: int, sep: str | None = None) -> str:
    """The first `units` lines of a multi-line text (logs, code), else its first words."""
    sep = sep or ("\n" if text.count("\n") > 4 else " ")
    parts = text.split(sep)
    out = sep.join(parts[:units])
    if sep == "\n" and "```" in text and out.count("```") % 2:
        out += "\n```"
    return out


def build(kind: str, target: int, count_tokens) -> Conversation:
    """A conversation of `kind` whose cached context is within a few tokens of `target`: turns
    are added while they fit, then the last user message is cut (by lines for logs and code,
    else by words) to the length that lands closest below the target.
    `count_tokens(system, turns)` returns the cached length."""
    name = f"{kind}-{target}"
    r = random.Random(name)
    role = _ROLE[kind]
    system = SYSTEMS[role]
    turns: list[tuple[str, str]] = []
    while True:
        user, reply = _turn(kind, r)
        if count_tokens(system, turns + [(user, reply)]) <= target:
            turns.append((user, reply))
            continue
        sep = "\n" if user.count("\n") > 4 else " "
        lo, hi = 0, len(user.split(sep))  # the largest cut that fits, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(system, turns + [(_trimmed(user, mid), reply)]) <= target:
                lo = mid
            else:
                hi = mid - 1
        if lo < 3:  # the reply alone overshoots: a short question, the reply cut by words
            user = _trimmed(user, 12)
            lo, hi = 0, len(reply.split(" "))
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if count_tokens(system, turns + [(user, _trimmed(reply, mid, " "))]) <= target:
                    lo = mid
                else:
                    hi = mid - 1
            reply = _trimmed(reply, lo, " ")
        else:
            user = _trimmed(user, lo)
        if lo >= 3 or not turns:
            turns.append((user, reply))
        return Conversation(name, kind, role, system, tuple(turns))


def corpus(count_tokens, quick: bool = False) -> list[Conversation]:
    plan = QUICK if quick else [(k, s) for s in SIZES for k in KINDS]
    return [build(k, s, count_tokens) for k, s in plan]
