"""Tables of bench/fidelity.py's cached results (one dict per conversation)."""

from __future__ import annotations

import statistics

TRANSFERS = ("none", "f16", "bf16", "int8", "kivi8")
CONTROLS = ("zeroed", "shuffled")
SPLITS = (16, 64, 128)


def line(res: dict, targets: list[str]) -> str:
    """One conversation: where each transfer first differed on each target."""
    parts = []
    for t in targets:
        ks = " ".join(f"{q}={res[q][t]['k']}" for q in TRANSFERS + CONTROLS if t in res.get(q, {}))
        parts.append(f"{t}: {ks}")
    return (f"{res['name']:>16} {res['tokens']:5d} tok  " + " | ".join(parts)
            + f"  ({res.get('wall_s', 0):.0f} s, load {res.get('loadavg', 0):.1f})")


def _fmt_k(k: float, n: int) -> str:
    return f">={n}" if k >= n else f"{k:g}"


def _margins(ms: list[float]) -> str:
    if not ms:
        return "-"
    ms = sorted(ms)
    shown = ", ".join(f"{m:.2g}" for m in ms[:8])
    return shown + (f", ... ({len(ms)}, max {ms[-1]:.2g})" if len(ms) > 8 else "")


def table(results: list[dict], targets: list[str], n: int) -> str:
    splits = [s for s in SPLITS if s <= n]
    head = ("| target | transfer | size x float32 | " + " | ".join(f"exact @{s}" for s in splits)
            + " | median first divergence | next-token KL (median) | source margin at each split |")
    rows = [head, "|" + "---|" * (6 + len(splits))]
    for t in targets:
        for q in TRANSFERS + CONTROLS:
            got = [r for r in results if t in r.get(q, {})]
            if not got:
                continue
            ks = [r[q][t]["k"] for r in got]
            size = statistics.mean(r[q]["bytes"] / r["float32_bytes"] for r in got)
            exact = " | ".join(f"{sum(k >= s for k in ks)}/{len(ks)}" for s in splits)
            margins = [r[q][t]["margin"] for r in got if r[q][t]["k"] < n]
            kl0 = statistics.median(r[q][t]["kl0"] for r in got)
            name = q if q in TRANSFERS else f"*{q} (control)*"
            size_s = f"{size:.3f}" if q in TRANSFERS else "-"
            rows.append(f"| {t} | {name} | {size_s} | {exact} | "
                        f"{_fmt_k(statistics.median(ks), n)} | {kl0:.1e} | {_margins(margins)} |")
    out = "\n".join(rows)
    for t in targets:
        base = [r for r in results if t in r.get("f16", {}) and r["f16"][t]["k"] >= n]
        if base:
            kept = ", ".join(f"{q} {sum(r[q][t]['k'] >= n for r in base)}" for q in
                             ("bf16", "int8", "kivi8") if all(t in r.get(q, {}) for r in base))
            out += (f"\n{t}: of the {len(base)} conversations where f16 is exact @{n}, exact "
                    f"@{n} too: {kept}")
    sizes = [r["tokens"] for r in results]
    if sizes:
        out += (f"\n{len(results)} conversations of {min(sizes)} to {max(sizes)} tokens "
                f"(median {statistics.median(sizes):g}), probe {n} tokens")
    return out


def speed(results: list[dict]) -> str:
    """Codec throughput in MB/s of float32 source bytes, summed over every conversation."""
    total = sum(r["float32_bytes"] for r in results)
    if not total:
        return ""
    rows = ["| method | encode MB/s | decode MB/s | encode x f16 | decode x f16 |",
            "|---|---:|---:|---:|---:|"]
    sums = {}
    for m in TRANSFERS[1:]:
        enc = sum(r["codec"][m]["encode_s"] for r in results)
        dec = sum(r["codec"][m]["decode_s"] for r in results)
        sums[m] = (total / 1e6 / enc, total / 1e6 / dec)
    for m, (e, d) in sums.items():
        rows.append(f"| {m} | {e:,.0f} | {d:,.0f} | {e / sums['f16'][0]:.2f} | "
                    f"{d / sums['f16'][1]:.2f} |")
    return "\n".join(rows)
