"""Transfer quantizations of KV tensors (none, f16, bf16, int8 per group, kivi8) and their measured
error. kivi8's codec is in kivi.py.

Everything works on numpy arrays. bfloat16 travels as uint16 bit patterns (numpy has no bfloat16).
The error is measured on what the receiver gets back (dequantized, cast to the source dtype)
against the source, in float64 (docs/USXF.md 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import kivi
from .spec import INT8_GROUP, QUANTS, SOURCE_DTYPES, UsxfWriteError

_NP_SOURCE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
_NP_STORED = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"),
              "int8": np.dtype("i1"), "uint8": np.dtype("u1")}
SCALE_DTYPE = "float32"
F16_OVERFLOW = 65520.0  # the smallest magnitude float32 -> float16 rounds to inf


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype a stored or source dtype name travels as."""
    return _NP_STORED[name]


def stored_dtype(source_dtype: str, method: str) -> str:
    if method == "none":
        return source_dtype
    return {"f16": "float16", "bf16": "bfloat16", "int8": "int8", "kivi8": "uint8"}[method]


def group_size_for(head_dim: int, preferred: int = INT8_GROUP) -> int:
    """Group length along head_dim: `preferred` when it divides head_dim, else head_dim itself."""
    return preferred if head_dim % preferred == 0 else head_dim


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round-to-nearest-even; NaN stays a quiet NaN."""
    u = np.ascontiguousarray(x, dtype="<f4").view("<u4")
    bits = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    bits = bits.astype("<u2")
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype("<u2")
    return bits


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(b, dtype="<u2")
    return np.left_shift(b, 16, dtype="<u4").view("<f4")  # one pass: widen and shift


def to_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return bf16_bits_to_f32(x)
    return x.astype("<f4", copy=False)


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return f32_to_bf16_bits(x)
    return x.astype(_NP_SOURCE[dtype], copy=False)


def as_source_array(a: np.ndarray, dtype: str) -> np.ndarray:
    """A C-contiguous little-endian array in the source dtype's travelling form, or ValueError."""
    if dtype not in SOURCE_DTYPES:
        raise ValueError(f"source dtype must be one of {SOURCE_DTYPES}, got {dtype!r}")
    a = np.asarray(a)
    if dtype == "bfloat16" and a.dtype.itemsize == 2 and a.dtype.name in ("bfloat16", "uint16"):
        a = a.view("<u2")
    if a.dtype.newbyteorder("<") != _NP_SOURCE[dtype].newbyteorder("<"):
        raise ValueError(f"array dtype {a.dtype} does not match source dtype {dtype}")
    return np.ascontiguousarray(a, dtype=_NP_SOURCE[dtype])


@dataclass
class ErrorMeter:
    """Running max-abs and RMS of (received - source), and the source's own scale.

    Differences are taken in float32 (received and source are both float32 values within a
    factor of two of each other, or received is zero, so the subtraction is exact); squares are
    summed in float64."""

    max_abs: float = 0.0
    sq: float = 0.0
    src_max_abs: float = 0.0
    src_sq: float = 0.0
    count: int = 0

    def add_source(self, source32: np.ndarray) -> None:
        if source32.size:
            self.src_max_abs = max(self.src_max_abs, float(source32.max()), float(-source32.min()))
            self.src_sq += float(np.square(source32).sum(dtype=np.float64))
        self.count += source32.size

    def add_error(self, source32: np.ndarray, received32: np.ndarray) -> None:
        if source32.size:
            d = received32 - source32
            self.max_abs = max(self.max_abs, float(d.max()), float(-d.min()))
            self.sq += float(np.square(d, out=d).sum(dtype=np.float64))

    def as_dict(self) -> dict:
        n = max(self.count, 1)
        return {
            "max_abs": self.max_abs,
            "rms": math.sqrt(self.sq / n),
            "source_max_abs": self.src_max_abs,
            "source_rms": math.sqrt(self.src_sq / n),
        }


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as the payload carries it: `data` (the entry's own region), then `parts`
    (entry key, dtype name, array), each in its own region (int8: scales; kivi8: scales, zeros,
    kept_values), and `fields`, further entry keys (kivi8: kept)."""

    data: np.ndarray
    parts: tuple[tuple[str, str, np.ndarray], ...] = ()
    fields: dict = field(default_factory=dict)


def encode(x: np.ndarray, source_dtype: str, method: str, group: int,
           meter: ErrorMeter | None = None, name: str = "tensor", kind: str = "k") -> StoredTensor:
    """One tensor (source dtype, shape (..., head_dim); kivi8: (h, m, d)) as stored.

    Lossy methods refuse non-finite values, and f16 and kivi8 refuse values beyond float16's
    range (kivi8 keeps its scales, zeros and sink positions in float16)."""
    if method not in QUANTS:
        raise UsxfWriteError("quant", f"quantization must be one of {QUANTS}, got {method!r}")
    target = stored_dtype(source_dtype, method)
    if target == source_dtype:  # none, or f16 of f16, or bf16 of bf16: bit-exact
        if meter is not None:
            meter.add_source(to_float32(x, source_dtype))
        return StoredTensor(x)
    x32 = to_float32(x, source_dtype)
    if not np.isfinite(x32).all():
        raise UsxfWriteError("kv-values", f"{name} holds NaN or inf; a lossy {method} transfer "
                                          f"would change it: export with quant='none'")
    if meter is not None:
        meter.add_source(x32)
    limit = {"f16": F16_OVERFLOW, "kivi8": float(np.nextafter(np.float32(kivi.F16_MAX), np.inf))}
    if method in limit and x32.size and max(float(x32.max()), float(-x32.min())) >= limit[method]:
        raise UsxfWriteError("kv-values", f"{name} exceeds float16's range (|x| > 65504): "
                                          f"export with quant='bf16' or 'none'")
    if method == "kivi8":
        e = kivi.encode(x32, kind, kivi.KEY_GROUP, group)
        out = StoredTensor(e.codes, (("scales", kivi.SCALE_DTYPE, e.scales),
                                     ("zeros", kivi.SCALE_DTYPE, e.zeros),
                                     ("kept_values", kivi.SCALE_DTYPE, e.kept_values)),
                           {"kept": e.kept.tobytes()})
        if meter is not None:
            back = kivi.decode(e.codes, e.scales, e.zeros, e.kept, e.kept_values, kind,
                               kivi.KEY_GROUP, group)
            meter.add_error(x32, to_float32(from_float32(back, source_dtype), source_dtype))
        return out
    scales = None
    if method == "f16":
        data = x32.astype("<f2")
    elif method == "bf16":
        data = f32_to_bf16_bits(x32)
    else:
        data, scales = _int8_encode(x32, group)
    if meter is not None:
        meter.add_error(x32, to_float32(decode(data, scales, source_dtype, method, group), source_dtype))
    return StoredTensor(data, () if scales is None else (("scales", SCALE_DTYPE, scales),))


def quant_header(method: str, group: int, error: dict) -> dict:
    """The manifest's `quant` map (docs/USXF.md 2 and 5)."""
    q = {"method": method, "group_size": group if method in ("int8", "kivi8") else None,
         "scale_dtype": {"int8": SCALE_DTYPE, "kivi8": kivi.SCALE_DTYPE}.get(method),
         "error": error}
    if method == "kivi8":
        q.update(key_group=kivi.KEY_GROUP, keep_first=kivi.KEEP_FIRST,
                 keep_fraction=kivi.KEEP_FRACTION)
    return q


def parse_header(s, q: dict, method: str, max_dim: int) -> tuple[int, int]:
    """Check the method's fields of a `quant` map (`s` is the manifest schema). Returns the
    group size (int8, kivi8 values) and the key group (kivi8), 0 where the method has none."""
    if method == "int8":
        group = s.int_in(q, "group_size", 1, max_dim, "quant")
        if s.get(q, "scale_dtype", "str", "quant") != SCALE_DTYPE:
            s.fail("quant.scale_dtype", f"not {SCALE_DTYPE!r}")
        return group, 0
    if method == "kivi8":
        group = s.int_in(q, "group_size", 1, max_dim, "quant")
        if s.get(q, "scale_dtype", "str", "quant") != kivi.SCALE_DTYPE:
            s.fail("quant.scale_dtype", f"not {kivi.SCALE_DTYPE!r}")
        return group, s.int_in(q, "key_group", 1, max_dim, "quant")
    s.get(q, "group_size", "nil", "quant")
    s.get(q, "scale_dtype", "nil", "quant")
    return 0, 0


def _int8_encode(x32: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    shape = x32.shape
    g = x32.reshape(*shape[:-1], shape[-1] // group, group)
    if not g.size:
        return np.zeros(shape, "i1"), np.zeros(g.shape[:-1], "<f4")
    amax = np.maximum(g.max(axis=-1), -g.min(axis=-1))
    scales = (amax / np.float32(127.0)).astype("<f4")
    safe = np.where(scales == 0, np.float32(1.0), scales)
    t = g / safe[..., None]
    np.rint(t, out=t)
    np.clip(t, -127, 127, out=t)
    return t.astype("i1").reshape(shape), scales


def decode(data: np.ndarray, scales: np.ndarray | None, source_dtype: str, method: str,
           group: int) -> np.ndarray:
    """Stored data -> the source dtype (bfloat16 as uint16 bits). `none` returns `data` as is."""
    target = stored_dtype(source_dtype, method)
    if target == source_dtype:
        return data
    if method == "int8":
        shape = data.shape
        g = data.reshape(*shape[:-1], shape[-1] // group, group).astype("<f4")
        g *= scales[..., None]  # in place: one allocation per tensor
        x32 = g.reshape(shape)
    else:
        x32 = to_float32(data, target)
    return from_float32(x32, source_dtype)


def received(x: np.ndarray, source_dtype: str, method: str, kind: str = "k") -> np.ndarray:
    """What a receiver's load_kv() returns for this tensor sent with `method` (source dtype):
    for measuring a transfer's effect on the model before writing (next-token KL at export)."""
    x = as_source_array(x, source_dtype)
    group = group_size_for(x.shape[-1])
    st = encode(x, source_dtype, method, group, None, "tensor", kind)
    if method == "kivi8" and stored_dtype(source_dtype, method) != source_dtype:
        p = {k: a for k, _, a in st.parts}
        back = kivi.decode(st.data, p["scales"], p["zeros"], np.frombuffer(st.fields["kept"], "<u4"),
                           p["kept_values"], kind, kivi.KEY_GROUP, group)
        return from_float32(back, source_dtype)
    return decode(st.data, st.parts[0][2] if st.parts else None, source_dtype, method, group)

