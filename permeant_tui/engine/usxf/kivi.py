"""The `kivi8` transfer (docs/USXF.md 5.1): 8-bit KV at about 0.27x of float32 bytes.

After KIVI (Liu et al., 2024): keys are quantized per channel over groups of `key_group`
consecutive tokens (a key channel keeps its scale along the sequence, so the few channels with
large values do not flatten the others), values per token over groups of `group_size` channels.
Both asymmetric: 8-bit codes with a float16 scale and zero per group, `x' = code * scale + zero`.

A few positions of each tensor are kept in float16 instead: the first `keep_first` (the
attention sink: SmolLM2 puts a third of all attention on position 0) and the `keep_fraction`
of the others with the smallest vector norm (the secondary sinks, tokens whose small keys and
values take much attention). Key groups are `key_group` tokens, the last one taking the
remainder (key_group to 2 * key_group - 1 tokens), so a short tensor pays no partial group. They take no part in the groups' statistics, so a sink's values
do not widen its group's range. Chosen from the tensor alone, no model needed.

Measured on SmolLM2-135M (bench/fidelity.py, docs/USXF.md 14): per-channel keys cut the key
error 5x against int8's per-token groups; keeping the sinks cut the next-token KL about 1.5x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METHOD = "kivi8"
KEY_GROUP = 64  # tokens per key group (per channel)
VALUE_GROUP = 64  # channels per value group (per token)
KEEP_FIRST = 1
KEEP_FRACTION = 0.005
SCALE_DTYPE = "float16"
CODE_DTYPE = "uint8"
LEVELS = 255
F16_MAX = 65504.0


@dataclass(frozen=True)
class Encoded:
    """One tensor in kivi8: codes of the quantized positions (h, m - p, d), float16 scales and
    zeros, the kept positions (uint32, increasing) and their float16 values (h, p, d)."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    kept: np.ndarray
    kept_values: np.ndarray


@dataclass(frozen=True)
class Regions:
    """Where a verified kivi8 tensor's parts lie in the payload (from the manifest)."""

    kept: np.ndarray
    scales_shape: tuple[int, ...]
    scales_offset: int
    zeros_offset: int
    kept_values_offset: int
    key_group: int
    group: int


def scales_shape(kind: str, h: int, m: int, d: int, key_group: int, group: int) -> tuple[int, ...]:
    """The scale (and zero) array of a tensor holding m quantized positions."""
    if kind == "k":  # m // key_group groups, the last one taking the remainder
        return (h, max(1, m // key_group) if m else 0, d)
    return (h, m, d // group)


def select_kept(x32: np.ndarray, keep_first: int = KEEP_FIRST,
                fraction: float = KEEP_FRACTION) -> np.ndarray:
    """The positions stored in float16: the first `keep_first`, then the `fraction` of the
    others whose vectors (averaged over heads, each relative to its head's median) are the
    smallest. Sorted uint32."""
    h, m, _ = x32.shape
    first = min(keep_first, m)
    extra = int(round(fraction * m)) if m > first else 0
    if not extra:
        return np.arange(first, dtype="<u4")
    norm = np.linalg.norm(x32, axis=-1)
    med = np.median(norm, axis=1, keepdims=True)
    score = (norm / np.where(med > 0, med, 1.0)).mean(axis=0)
    rest = np.argsort(score[first:], kind="stable")[:extra] + first
    return np.concatenate([np.arange(first), np.sort(rest)]).astype("<u4")


def _f16_down(x: np.ndarray) -> np.ndarray:
    """float32 -> the largest float16 <= x (the group's zero: every value lies above it)."""
    z = x.astype("<f2")
    over = z.astype("<f4") > x
    if over.any():
        z[over] = np.nextafter(z[over], np.float16(-np.inf))
    return z


def _f16_up(x: np.ndarray) -> np.ndarray:
    """float32 -> the smallest float16 >= x (the scale: zero + 255 * scale covers the max)."""
    s = x.astype("<f2")
    under = s.astype("<f4") < x
    if under.any():
        s[under] = np.nextafter(s[under], np.float16(np.inf))
    return s


def _quantize(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, axis: int):
    """Codes, scales and zeros for groups whose min / max are lo / hi (kept dims: broadcast
    against x along `axis`)."""
    zero = _f16_down(lo)
    scale = _f16_up((hi - zero.astype("<f4")) / np.float32(LEVELS))
    s32 = scale.astype("<f4")
    q = (x - np.expand_dims(zero.astype("<f4"), axis)) / np.expand_dims(np.where(s32 > 0, s32, 1), axis)
    np.rint(q, out=q)
    np.clip(q, 0, LEVELS, out=q)
    return q.astype(CODE_DTYPE), scale, zero


def encode(x32: np.ndarray, kind: str, key_group: int = KEY_GROUP, group: int = VALUE_GROUP,
           keep_first: int = KEEP_FIRST, fraction: float = KEEP_FRACTION) -> Encoded:
    """One tensor (float32, finite, |x| < 65504) of shape (h, m, d)."""
    h, m, d = x32.shape
    kept = select_kept(x32, keep_first, fraction)
    mask = np.ones(m, bool)
    mask[kept] = False
    rest = np.ascontiguousarray(x32[:, mask]) if len(kept) else x32
    mq = rest.shape[1]
    sshape = scales_shape(kind, h, mq, d, key_group, group)
    if kind == "k":
        codes = np.empty(rest.shape, CODE_DTYPE)
        scales = np.empty(sshape, "<f2")
        zeros = np.empty(sshape, "<f2")
        ng = sshape[1]
        full = (ng - 1) * key_group if ng else 0
        if full:  # whole groups at once: (h, groups, G, d), statistics over G
            g4 = rest[:, :full].reshape(h, ng - 1, key_group, d)
            c, s, z = _quantize(g4, g4.min(axis=2), g4.max(axis=2), 2)
            codes[:, :full] = c.reshape(h, full, d)
            scales[:, :ng - 1], zeros[:, :ng - 1] = s, z
        if ng:  # the last group: key_group to 2 * key_group - 1 tokens (or all of fewer)
            tail = rest[:, full:]
            c, s, z = _quantize(tail, tail.min(axis=1), tail.max(axis=1), 1)
            codes[:, full:], scales[:, -1], zeros[:, -1] = c, s, z
    else:
        g4 = rest.reshape(h, mq, d // group, group)
        c, scales, zeros = _quantize(g4, g4.min(axis=3), g4.max(axis=3), 3)
        codes = c.reshape(h, mq, d)
    kept_values = np.ascontiguousarray(x32[:, kept]).astype("<f2")
    return Encoded(codes, scales, zeros, kept, kept_values)


def decode(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, kept: np.ndarray,
           kept_values: np.ndarray, kind: str, key_group: int, group: int) -> np.ndarray:
    """Back to float32, shape (h, m, d) with m = quantized + kept positions."""
    h, mq, d = codes.shape
    s32, z32 = scales.astype("<f4"), zeros.astype("<f4")
    if kind == "k":
        out = np.empty((h, mq, d), "<f4")
        ng = s32.shape[1]
        full = (ng - 1) * key_group if ng else 0
        if full:
            g = codes[:, :full].reshape(h, ng - 1, key_group, d).astype("<f4")
            g *= s32[:, :ng - 1, None, :]
            g += z32[:, :ng - 1, None, :]
            out[:, :full] = g.reshape(h, full, d)
        if ng:
            out[:, full:] = codes[:, full:] * s32[:, -1:, :] + z32[:, -1:, :]
    else:
        g = codes.reshape(h, mq, d // group, group).astype("<f4")
        g *= s32[..., None]
        g += z32[..., None]
        out = g.reshape(h, mq, d)
    if not len(kept):
        return out
    m = mq + len(kept)
    full_out = np.empty((h, m, d), "<f4")
    mask = np.ones(m, bool)
    mask[kept] = False
    full_out[:, mask] = out
    full_out[:, kept] = kept_values.astype("<f4")
    return full_out


def error_bound(x32: np.ndarray, enc: Encoded, kind: str, key_group: int, group: int) -> np.ndarray:
    """The documented per-value bound: |x' - x| <= scale / 2 of the value's group (float16
    rounding, |x| * 2**-11 + 2**-25, for kept positions), plus float32 rounding in the encoder's
    division and the decoder's multiply-add (scale * 2**-10 and |x| * 2**-22 cover them)."""
    h, m, d = x32.shape
    s32 = enc.scales.astype("<f4")
    if kind == "k":
        mq = m - len(enc.kept)
        idx = np.minimum(np.arange(mq) // key_group, max(s32.shape[1] - 1, 0))
        per = s32[:, idx]
    else:
        per = np.repeat(s32, group, axis=2)
    bound = np.empty((h, m, d), "<f4")
    mask = np.ones(m, bool)
    mask[enc.kept] = False
    bound[:, mask] = per * np.float32(0.5 + 2.0**-10)
    bound[:, enc.kept] = np.abs(x32[:, enc.kept]) * 2.0**-11 + 2.0**-25
    return bound + np.abs(x32) * 2.0**-22


# ---- manifest: what a kivi8 tensor entry must hold (docs/USXF.md 5.1) ----------------------

def parse_entry(s, t: dict, where: str, kind: str, shape: list[int], key_group: int, group: int,
                region, end: int, check: str) -> tuple[int, Regions]:
    """Check a kivi8 tensor entry against its shape: kept positions (bin of uint32, strictly
    increasing, < m), then the codes, scales, zeros and kept values regions, in this order.
    `region(map, where, nbytes, prev_end)` checks one region and returns its end. Returns the
    end of the last region and where the parts lie."""
    h, m, d = shape
    if kind == "v" and d % group:
        s.fail(where, f"head_dim {d} is not a multiple of group {group}", check)
    raw = s.get(t, "kept", "bin", where, check)
    if len(raw) % 4 or len(raw) // 4 > m:
        s.fail(f"{where}.kept", f"{len(raw)} bytes are not up to {m} uint32 positions", check)
    kept = np.frombuffer(raw, "<u4")
    if len(kept) and (int(kept[-1]) >= m or (len(kept) > 1 and not (np.diff(kept.astype(np.int64)) > 0).all())):
        s.fail(f"{where}.kept", f"positions must increase strictly and stay below {m}", check)
    p = len(kept)
    end = region(t, where, h * (m - p) * d, end)
    sshape = scales_shape(kind, h, m - p, d, key_group, group)
    offsets = {}
    for part, want_shape in (("scales", sshape), ("zeros", sshape), ("kept_values", (h, p, d))):
        sub = s.map(s.get(t, part, "map", where, check), f"{where}.{part}", check)
        if s.get(sub, "dtype", "str", f"{where}.{part}", check) != SCALE_DTYPE:
            s.fail(f"{where}.{part}.dtype", f"not {SCALE_DTYPE!r}", check)
        if s.get(sub, "shape", "list", f"{where}.{part}", check) != list(want_shape):
            s.fail(f"{where}.{part}.shape", f"not {list(want_shape)}", check)
        end = region(sub, f"{where}.{part}", math.prod(want_shape) * 2, end)
        offsets[part] = sub["offset"]
    return end, Regions(kept.copy(), sshape, offsets["scales"], offsets["zeros"],
                        offsets["kept_values"], key_group, group)


def load(buf: np.ndarray, data_offset: int, shape: tuple[int, int, int], kind: str,
         r: Regions) -> np.ndarray:
    """A verified tensor from the payload buffer, float32 (h, m, d)."""
    h, m, d = shape
    p = len(r.kept)
    codes = np.frombuffer(buf, CODE_DTYPE, h * (m - p) * d, data_offset).reshape(h, m - p, d)
    n_s = math.prod(r.scales_shape)
    scales = np.frombuffer(buf, "<f2", n_s, r.scales_offset).reshape(r.scales_shape)
    zeros = np.frombuffer(buf, "<f2", n_s, r.zeros_offset).reshape(r.scales_shape)
    kv = np.frombuffer(buf, "<f2", h * p * d, r.kept_values_offset).reshape(h, p, d)
    return decode(codes, scales, zeros, r.kept, kv, kind, r.key_group, r.group)
