"""Incremental snapshots (format permeant-kv/5) against the full rewrite of format 2, on the live
cache bench/resume.py built (the embedded SmolLM2-135M, float32 KV). Run by bench/resume.py.

- save after a turn: a 4,000-token agent gains 20 (then 100) tokens and is saved: blocks plus
  manifest, against rewriting the whole file as format 2 did (its writer is kept here, as the
  baseline: safetensors to a temp file, checksum, fsync, rename, folder fsync);
- bytes written over a scripted 50-turn conversation of three agents (one save per turn, as
  autosave does), new against old;
- block size: save and restore against a plain read of the same bytes for several B;
- restore against a plain read of the same bytes (manifest and blocks, read into one reused,
  already faulted-in buffer: a page-cache read) and against re-prefill.
Every figure comes with the load average at the time it was taken.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import time
from pathlib import Path

import xxhash


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn, repeats: int, setup=None) -> float:
    out = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def legacy_save(path: Path, cache: list, ids: list[int], identity) -> int:
    """Format 2's writer (one file, every layer's K/V, rewritten whole at every save)."""
    import json

    import mlx.core as mx
    import numpy as np

    from permeant_tui.engine import kvcache
    from permeant_tui.engine.atomic import commit_file, temp_path
    from permeant_tui.engine.snapshot import _tensor_checksum, ids_digest

    states = kvcache.layer_states(cache, len(ids))
    arrays = {"token_ids": mx.array(np.asarray(ids, dtype=np.int32))}
    metas, ordered = [], []
    for i, st in enumerate(states):
        arrays[f"k.{i}"], arrays[f"v.{i}"] = st.keys, st.values
        ordered += [st.keys, st.values]
        metas.append({**st.meta(), "parts": 1})
    mx.eval(list(arrays.values()))
    layer_meta = json.dumps(metas, sort_keys=True, separators=(",", ":"))
    meta = {"format": "permeant-kv/2", "agent": "bench", "identity": identity.fingerprint,
            "model": identity.name, "tokens": str(len(ids)), "tokens_digest": ids_digest(ids),
            "kv_dtype": identity.kv_dtype, "layers": str(len(states)), "layer_meta": layer_meta,
            "checksum": _tensor_checksum(ordered, layer_meta), "created": f"{time.time():.3f}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, ".safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=meta)
    commit_file(tmp, path)
    return path.stat().st_size


def snapshot_files(path: Path) -> list[Path]:
    """The manifest and every block it names: the bytes a restore reads."""
    import json

    from permeant_tui.engine.snapshot import default_store, read_header

    meta = read_header(path)["__metadata__"]
    store = default_store(path)
    names = json.loads(meta.get("blocks", "[]")) + json.loads(meta.get("window_blocks", "[]"))
    return [path, *(store / f"{n}.kvb" for n in names)]


class PlainReader:
    """Reads files into one reused buffer, faulted in before timing: what reading bytes from the
    page cache costs, without first-touch page faults of a fresh buffer each time."""

    def __init__(self, size: int):
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.buf[:] = b"\1" * size  # fault every page in

    def read(self, paths: list[Path]) -> int:
        got = 0
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                while True:
                    n = os.readv(fd, [self.view[got:]])
                    if n == 0:
                        break
                    got += n
            finally:
                os.close(fd)
        return got


def fresh_read(paths: list[Path], size: int) -> int:
    """The same files read into new memory (numpy's empty buffer, not zero-filled): what any
    program that lands these bytes in memory it did not have pays, page faults included."""
    import numpy as np

    view = memoryview(np.empty(size, dtype=np.uint8))
    got = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while (n := f.readinto(view[got:])):
                got += n
    return got


def plain_write(path: Path, nbytes: int) -> None:
    """The floor of a durable save: one file of `nbytes`, written, fsynced and renamed, then
    its folder fsynced."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"\1" * nbytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def fresh(path: Path, cache: list) -> None:
    """Before a first save: no manifest, no blocks, and a cache that remembers no blocks."""
    from permeant_tui.engine import kvcache
    from permeant_tui.engine.snapshot import default_store

    shutil.rmtree(default_store(path), ignore_errors=True)
    path.unlink(missing_ok=True)
    kvcache.set_persisted(cache, 0, None)


def restore_fn(lm, path: Path, ids: list[int]):
    from permeant_tui.engine.snapshot import attach, read_snapshot

    def run():
        states, _, _ = read_snapshot(path, lm.identity, ids)
        return attach(lm.model, states)

    return run


def save_after_turn(lm, cache, ids: list[int], folder: Path, repeats: int, base: int,
                    turn: int) -> dict:
    """A `base`-token agent already saved gains `turn` tokens and is saved again."""
    from permeant_tui.engine.snapshot import write_snapshot

    path = folder / f"turn-{base}-{turn}/agents/a/kv.safetensors"
    old = folder / f"turn-{base}-{turn}/old.safetensors"
    infos = []

    def before():
        fresh(path, cache)
        write_snapshot(path, cache, ids[:base], lm.identity, "a")

    def new():
        infos.append(write_snapshot(path, cache, ids[:base + turn], lm.identity, "a"))

    la = load()
    new_ms = timed(new, repeats, before)
    old_ms = timed(lambda: legacy_save(old, cache, ids[:base + turn], lm.identity), repeats)
    info = infos[-1]
    # the floor: the bytes of the turn's own tokens, written and fsynced as one plain file
    turn_bytes = old.stat().st_size * turn // (base + turn)
    floor_ms = timed(lambda: plain_write(path.parent / "plain.bin", turn_bytes), repeats)
    return {"base": base, "turn": turn, "new_ms": new_ms, "old_ms": old_ms,
            "floor_ms": floor_ms, "floor_mb": turn_bytes / 1e6,
            "new_mb": info.written / 1e6, "old_mb": old.stat().st_size / 1e6,
            "new_blocks": info.new_blocks, "load": la}


def conversation_bytes(lm, cache, ids: list[int], folder: Path, turns: int = 50,
                       seed: int = 17, compact: int | None = None) -> dict:
    """Three agents (distinct system prompts: no block shared between them), `turns` turns in
    rotation, each a user message of 15-60 tokens and a reply of 30-220 tokens, one save after
    each turn. K/V bytes come from the live cache; what differs per agent is its token ids (its
    own first token), so its blocks' names differ as a real agent's would. `compact`: the
    compacted blocks' size (None: the default; 0: 64-token blocks only)."""
    from permeant_tui.engine import kvcache
    from permeant_tui.engine.snapshot import write_snapshot
    from permeant_tui.engine.workspace import Workspace

    rng = random.Random(seed)
    ws = Workspace.open(folder / f"conversation-{compact}")
    agents = list(ws.agents)[:3]
    streams = {a: [1000 + k] + list(ids[1:]) for k, a in enumerate(agents)}
    caches = {a: kvcache.copy_cache(cache) for a in agents}  # views: no K/V copied
    n = dict.fromkeys(agents, 60)  # the system prompt
    per_token = None
    new_total = old_total = 0
    new_ms, old_sizes = [], []
    la = load()
    for t in range(turns):
        a = agents[t % 3]
        n[a] = min(len(ids), n[a] + rng.randint(15, 60) + rng.randint(30, 220))
        t0 = time.perf_counter()
        info = write_snapshot(ws.snapshot_path(a), caches[a], streams[a][:n[a]], lm.identity,
                              a, ws.blocks, compact_tokens=compact)
        ws.collect_blocks()
        new_ms.append((time.perf_counter() - t0) * 1000)
        new_total += info.written
        old_sizes.append(n[a])
    # Format 2 wrote the whole file each time: its size is linear in the tokens (measured).
    a64 = legacy_save(folder / "l64.safetensors", cache, ids[:64], lm.identity)
    a128 = legacy_save(folder / "l128.safetensors", cache, ids[:128], lm.identity)
    per_token = (a128 - a64) / 64
    old_total = sum(a64 + (k - 64) * per_token for k in old_sizes)
    disk = sum(p.stat().st_size for p in ws.blocks.folder.iterdir()) + \
        sum(ws.snapshot_path(a).stat().st_size for a in agents)
    return {"turns": turns, "tokens": dict(n), "new_mb": new_total / 1e6,
            "old_mb": old_total / 1e6, "median_save_ms": statistics.median(new_ms),
            "max_save_ms": max(new_ms), "on_disk_mb": disk / 1e6, "load": la}


def block_sizes(lm, cache, ids: list[int], folder: Path, repeats: int,
                sizes=(16, 32, 64, 128, 256, (64, 1024))) -> list[dict]:
    """For each block size (B, or (B, compacted size)): a save after 20 tokens on a 4,000-token
    agent, and a warm restore against a plain read of the same bytes (manifest and blocks)."""
    from permeant_tui.engine.snapshot import write_snapshot

    out = []
    for size in sizes:
        b, compact = size if isinstance(size, tuple) else (size, 0)
        path = folder / f"bs{b}-{compact}/agents/a/kv.safetensors"

        def before(b=b, path=path, compact=compact):
            fresh(path, cache)
            write_snapshot(path, cache, ids[:4000], lm.identity, "a", block_tokens=b,
                           compact_tokens=compact)

        la = load()
        save_ms = timed(lambda b=b, path=path, compact=compact: write_snapshot(
            path, cache, ids[:4020], lm.identity, "a", block_tokens=b, compact_tokens=compact),
            repeats, before)
        fresh(path, cache)
        write_snapshot(path, cache, ids, lm.identity, "a", block_tokens=b, compact_tokens=compact)
        files = snapshot_files(path)
        reader = PlainReader(sum(p.stat().st_size for p in files))
        restore = restore_fn(lm, path, ids)
        restore()
        r_ms, p_ms = paired(restore, lambda f=files, r=reader: r.read(f), repeats)
        out.append({"block": f"{b} + {compact:,}" if compact else str(b), "files": len(files), "save_ms": save_ms, "restore_ms": r_ms,
                    "read_ms": p_ms, "load": la})
        shutil.rmtree(path.parents[2], ignore_errors=True)
    return out


def paired(subject, baseline, repeats: int) -> tuple[float, float]:
    """Subject and baseline alternately (both see the same background load); medians."""
    a, b = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        subject()
        a.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        baseline()
        b.append((time.perf_counter() - t) * 1000)
    return statistics.median(a), statistics.median(b)


def run(lm, live_cache, ids: list[int], reprefill_ms: float, folder: Path, repeats: int,
        out=print) -> dict:
    """All of the above on the live cache of len(ids) (>= 4096) tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    out("## Incremental snapshots (format permeant-kv/5) against the full rewrite (format 2)\n")
    turns = [save_after_turn(lm, live_cache, ids, folder, repeats, 4000, 20),
             save_after_turn(lm, live_cache, ids, folder, repeats, 3996, 100)]
    out("| agent | turn | new save ms | MB written | new blocks | full rewrite ms | MB written "
        "| rewrite / new | plain write of the turn's KV ms (MB) | new / plain | load avg |")
    out("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in turns:
        out(f"| {r['base']} | +{r['turn']} | {r['new_ms']:.1f} | {r['new_mb']:.1f} | "
            f"{r['new_blocks']} | {r['old_ms']:.1f} | {r['old_mb']:.1f} | "
            f"**{r['old_ms'] / r['new_ms']:.1f}x** | {r['floor_ms']:.1f} ({r['floor_mb']:.1f}) | "
            f"{r['new_ms'] / r['floor_ms']:.2f}x | {r['load']} |")
    out("\nplain write = the turn's own KV bytes (tokens x bytes per token) written to one file, "
        "fsynced, renamed, folder fsynced: the disk's floor for a durable save of that turn.")

    conv = conversation_bytes(lm, live_cache, ids, folder)
    conv64 = conversation_bytes(lm, live_cache, ids, folder, compact=0)
    out(f"\nScripted conversation: {conv['turns']} turns over three agents (one save per turn; "
        f"agents end at {', '.join(str(v) for v in conv['tokens'].values())} tokens), "
        f"load avg {conv['load']}:\n")
    out("| written by | MB written | per save (median ms) | slowest save ms |")
    out("|---|---:|---:|---:|")
    out(f"| blocks + manifest, 1,024-token runs compacted (permeant-kv/5) | {conv['new_mb']:.0f} | "
        f"{conv['median_save_ms']:.1f} | {conv['max_save_ms']:.1f} |")
    out(f"| blocks + manifest, 64-token blocks only (permeant-kv/3, /4) | {conv64['new_mb']:.0f} | "
        f"{conv64['median_save_ms']:.1f} | {conv64['max_save_ms']:.1f} |")
    out(f"| full rewrite (permeant-kv/2) | {conv['old_mb']:.0f} | | |")
    out(f"\nfull rewrite / blocks: **{conv['old_mb'] / conv['new_mb']:.1f}x** the bytes "
        f"(64-token blocks only: {conv['old_mb'] / conv64['new_mb']:.1f}x); on disk at the end "
        f"{conv['on_disk_mb']:.0f} MB (manifests and blocks, after collection)\n")

    sizes = block_sizes(lm, live_cache, ids, folder, repeats)
    out(f"Block size (B tokens per block), {len(ids)}-token agent: save after +20 tokens on "
        "4,000; warm restore against a plain read of the same files (paired, median)\n")
    out("| B | files | save +20 ms | restore ms | plain read ms | restore / read | load avg |")
    out("|---:|---:|---:|---:|---:|---:|---|")
    for r in sizes:
        out(f"| {r['block']} | {r['files']} | {r['save_ms']:.1f} | {r['restore_ms']:.1f} | "
            f"{r['read_ms']:.1f} | {r['restore_ms'] / r['read_ms']:.2f}x | {r['load']} |")

    from permeant_tui.engine.snapshot import BLOCK_TOKENS, COMPACT_TOKENS, write_snapshot

    path = folder / "final/agents/a/kv.safetensors"
    fresh(path, live_cache)
    write_snapshot(path, live_cache, ids, lm.identity, "a")
    files = snapshot_files(path)
    size = sum(p.stat().st_size for p in files)
    reader = PlainReader(size)
    restore = restore_fn(lm, path, ids)
    restore()
    la = load()
    r_ms, p_ms = paired(restore, lambda: reader.read(files), repeats)
    r2_ms, f_ms = paired(restore, lambda: fresh_read(files, size), repeats)

    def read_and_hash():
        got = reader.read(files)
        xxhash.xxh3_128_digest(reader.view[:got])

    r3_ms, h_ms = paired(restore, read_and_hash, repeats)
    out(f"\nRestore at {len(ids)} tokens (B = {BLOCK_TOKENS}, runs of {COMPACT_TOKENS:,} "
        f"compacted, {len(files)} files, "
        f"{size / 1e6:.1f} MB), load avg {la}: restore {r_ms:.1f} ms, plain read of the same "
        f"bytes into a reused buffer {p_ms:.1f} ms (**{r_ms / p_ms:.2f}x**); paired again with a "
        f"plain read into new memory: restore {r2_ms:.1f} ms, read {f_ms:.1f} ms "
        f"(**{r2_ms / f_ms:.2f}x**); paired with a plain read plus one xxh3-128 pass over the "
        f"bytes (what verifying costs at least): restore {r3_ms:.1f} ms, read + hash "
        f"{h_ms:.1f} ms (**{r3_ms / h_ms:.2f}x**); re-prefill {reprefill_ms:.0f} ms "
        f"(**{reprefill_ms / r_ms:.0f}x** the restore)")
    return {"turns": turns, "conversation": conv, "sizes": sizes, "restore_ms": r_ms,
            "read_ms": p_ms, "fresh_read_ms": f_ms, "read_hash_ms": h_ms, "reprefill_ms": reprefill_ms}
