"""Transfer quantizations of KV tensors (none, f16, bf16, int8 per group) and their measured error.

Everything works on numpy arrays. bfloat16 travels as uint16 bit patterns (numpy has no bfloat16).
The error is measured on what the receiver gets back (dequantized, cast to the source dtype)
against the source, in float64 (docs/USXF.md 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .spec import INT8_GROUP, QUANTS, SOURCE_DTYPES, UsxfWriteError

_NP_SOURCE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
_NP_STORED = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"),
              "int8": np.dtype("i1")}
SCALE_DTYPE = "float32"
F16_OVERFLOW = 65520.0  # the smallest magnitude float32 -> float16 rounds to inf


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype a stored or source dtype name travels as."""
    return _NP_STORED[name]


def stored_dtype(source_dtype: str, method: str) -> str:
    if method == "none":
        return source_dtype
    return {"f16": "float16", "bf16": "bfloat16", "int8": "int8"}[method]


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


def encode(x: np.ndarray, source_dtype: str, method: str, group: int,
           meter: ErrorMeter | None = None, name: str = "tensor") -> tuple[np.ndarray, np.ndarray | None]:
    """One tensor (source dtype, shape (..., head_dim)) -> (stored data, int8 scales or None).

    Lossy methods refuse non-finite values, and f16 refuses values beyond its range."""
    if method not in QUANTS:
        raise UsxfWriteError("quant", f"quantization must be one of {QUANTS}, got {method!r}")
    target = stored_dtype(source_dtype, method)
    if target == source_dtype:  # none, or f16 of f16, or bf16 of bf16: bit-exact
        if meter is not None:
            meter.add_source(to_float32(x, source_dtype))
        return x, None
    x32 = to_float32(x, source_dtype)
    if not np.isfinite(x32).all():
        raise UsxfWriteError("kv-values", f"{name} holds NaN or inf; a lossy {method} transfer "
                                          f"would change it: export with quant='none'")
    if meter is not None:
        meter.add_source(x32)
    scales = None
    if method == "f16":
        if x32.size and max(float(x32.max()), float(-x32.min())) >= F16_OVERFLOW:
            raise UsxfWriteError("kv-values", f"{name} exceeds float16's range (|x| > 65504): "
                                              f"export with quant='bf16' or 'none'")
        data = x32.astype("<f2")
    elif method == "bf16":
        data = f32_to_bf16_bits(x32)
    else:
        data, scales = _int8_encode(x32, group)
    if meter is not None:
        meter.add_error(x32, to_float32(decode(data, scales, source_dtype, method, group), source_dtype))
    return data, scales


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
