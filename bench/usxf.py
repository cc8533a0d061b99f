"""USXF export / import / verify speed against a plain write and read of the same bytes.

Run: .venv/bin/python bench/usxf.py [--reps N] [--tokens 512,2048,4096] [--dir PATH]

KV is synthetic (standard-normal float32) in the default model's shape (SmolLM2-135M: 30 layers,
3 KV heads, head_dim 64). Baselines, measured in the same run and folder on the same bytes: a raw
write of the source KV tensors + fsync, and a raw read of that file into memory. Files are read
back from a warm page cache, as on an import right after a download. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from permeant_tui.engine.identity import ModelIdentity  # noqa: E402
from permeant_tui.engine.usxf import (  # noqa: E402
    QUANTS,
    AgentRecord,
    KVPayload,
    WorkspaceKeys,
    block_hashes,
    read_usxf,
    verify_usxf,
    write_usxf,
)

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64


def identity() -> ModelIdentity:
    return ModelIdentity(
        name="bench-smollm2-shape", architecture="llama", n_layers=LAYERS, n_heads=9,
        n_kv_heads=KV_HEADS, head_dim=HEAD_DIM, hidden_size=576, vocab_size=49152,
        rope_theta=100000.0, rope_scaling="null", rope_layout="interleaved", sliding_window=0,
        context_limit=8192, weights_digest="0" * 32, tokenizer_digest="1" * 32, kv_dtype="float32",
    )


def timed(fn, reps: int) -> tuple[float, object]:
    """Best wall time in seconds over `reps` runs (the least disturbed by other load), and the
    last result."""
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def paired(subject, baseline, reps: int) -> tuple[float, float, object]:
    """Subject and baseline run alternately, so both see the same background load; best of each."""
    ts, tb, out = [], [], None
    for _ in range(reps):
        t = time.perf_counter()
        baseline()
        tb.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = subject()
        ts.append(time.perf_counter() - t)
    return min(ts), min(tb), out


def plain_write(path: Path, arrays: list[np.ndarray]) -> None:
    with open(path, "wb") as f:
        for a in arrays:
            f.write(memoryview(a).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def plain_read(path: Path) -> np.ndarray:
    size = path.stat().st_size
    buf = np.empty(size, np.uint8)
    with open(path, "rb", buffering=0) as f:
        mv, pos = memoryview(buf), 0
        while pos < size:
            pos += f.readinto(mv[pos:])
    return buf


def import_kv(path: Path, keys: WorkspaceKeys, ident: ModelIdentity) -> KVPayload:
    return read_usxf(path, trusted=keys, expected_identity=ident).load_kv()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", default="512,2048,4096")
    ap.add_argument("--dir", default=None, help="folder for the files (default: a temp dir)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.tokens.split(",")]
    ident = identity()
    rng = np.random.default_rng(0)
    mb = 1e6

    # A VM's first touch of fresh memory can cost up to ~1 s per GB; pay it here, before any timing,
    # so it does not land on whichever case happens to run first.
    warm = np.ones(2 << 30, np.uint8)
    del warm

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        keys = WorkspaceKeys(d / "keys").ensure()
        print(f"# USXF bench: synthetic random KV (standard normal float32), {LAYERS} layers x "
              f"{KV_HEADS} KV heads x head_dim {HEAD_DIM}; best of {args.reps}, each ratio against a "
              f"baseline run alternately with it")
        print(f"# {platform.platform(terse=True)}, {platform.machine()}, {os.cpu_count()} cpus, "
              f"python {platform.python_version()}, numpy {np.__version__}; files in {d}; "
              f"load average {os.getloadavg()[0]:.1f}")
        print()
        print("| tokens | quant | KV MB | file MB | bytes/token | export ms | export MB/s | x plain write "
              "| import ms | import MB/s | x plain read | verify MB/s |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in sizes:
            kv = KVPayload(
                keys=[rng.standard_normal((KV_HEADS, n, HEAD_DIM), dtype=np.float32) for _ in range(LAYERS)],
                values=[rng.standard_normal((KV_HEADS, n, HEAD_DIM), dtype=np.float32) for _ in range(LAYERS)],
                dtype="float32",
            )
            tokens = rng.integers(0, ident.vocab_size, n).tolist()
            agent = AgentRecord("bench", "technical", "Bench", "You are a benchmark.",
                                [{"user": "q", "reply": "a", "span": [0, n]}])
            kv_bytes = kv.nbytes
            raw = d / f"plain_{n}.bin"
            write_raw = partial(plain_write, raw, kv.keys + kv.values)
            read_raw = partial(plain_read, raw)
            best_pw = best_pr = float("inf")
            for q in QUANTS:
                out = d / f"agent_{n}_{q}.usxf"
                t_w, t_pw, info = paired(partial(write_usxf, out, identity=ident, token_ids=tokens,
                                                 kv=kv, agent=agent, keys=keys, quant=q),
                                         write_raw, args.reps)
                t_r, t_pr, _ = paired(partial(import_kv, out, keys, ident), read_raw, args.reps)
                t_v, _ = timed(partial(verify_usxf, out, keys), args.reps)
                best_pw, best_pr = min(best_pw, t_pw), min(best_pr, t_pr)
                size = info.size
                print(f"| {n} | {q} | {kv_bytes / mb:.1f} | {size / mb:.1f} | {size / n:,.0f} "
                      f"| {t_w * 1e3:.0f} | {kv_bytes / mb / t_w:,.0f} | {t_w / t_pw:.2f} "
                      f"| {t_r * 1e3:.0f} | {kv_bytes / mb / t_r:,.0f} | {t_r / t_pr:.2f} "
                      f"| {size / mb / t_v:,.0f} |")
                out.unlink()
            print(f"| {n} | *plain* | {kv_bytes / mb:.1f} | {kv_bytes / mb:.1f} | {kv_bytes / n:,.0f} "
                  f"| {best_pw * 1e3:.0f} | {kv_bytes / mb / best_pw:,.0f} | 1.00 "
                  f"| {best_pr * 1e3:.0f} | {kv_bytes / mb / best_pr:,.0f} | 1.00 | - |")
            raw.unlink()
        n = max(sizes)
        ids = rng.integers(0, ident.vocab_size, n).tolist()
        t_b, hashes = timed(partial(block_hashes, ids, ident.fingerprint, 16), max(args.reps, 5))
        print()
        print(f"block hashes: {n} tokens in blocks of 16 -> {len(hashes)} hashes in {t_b * 1e3:.2f} ms")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        print("export = write_usxf (quantize, measure error, hash, sign, write, fsync, rename); "
              "import = read_usxf + load_kv (read, verify everything, dequantize); "
              "MB/s counts source KV bytes; verify = verify_usxf on the file's bytes")


if __name__ == "__main__":
    main()
