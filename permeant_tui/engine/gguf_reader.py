"""GGUF files read without executing anything: header, metadata and tensors, any tensor type.

The header is parsed here with `struct` and numpy (gguf-py's `GGUFReader` builds a Python
object per array element and takes ~19 s on Gemma 3's 262,144-token vocabulary; this parser
takes well under a second). Tensor bytes stay in a read-only memory map until asked for;
`dequantize` turns any type llama.cpp writes (Q4_K, Q5_0, Q6_K, IQ*, ...) into float32 with
gguf-py's own reference dequantizers (`gguf.quants`), the same package llama.cpp ships.

MLX's built-in GGUF reader (`mx.load`) handles F32, F16, Q4_0, Q4_1 and Q8_0 only (and then
returns MLX affine triples directly); `mlx_fast_path` says when a file can take that path.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelLoadError

# ggml types MLX's own GGUF loader reads (gguf.GGMLQuantizationType values)
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
MLX_GGUF_TYPES = frozenset({F32, F16, Q4_0, Q4_1, Q8_0})

# GGUF metadata value types -> struct format (scalars)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order (GGUF stores the innermost dimension first)
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type{self.ggml_type}"


@dataclass
class GgufFile:
    path: Path
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    _map: mmap.mmap | None = None

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def types(self) -> set[int]:
        return {t.ggml_type for t in self.tensors.values()}

    @property
    def mlx_fast_path(self) -> bool:
        """True when `mx.load` can read every tensor (and keep Q4_0/Q4_1/Q8_0 quantized)."""
        return self.types() <= MLX_GGUF_TYPES

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view (rows of blocks for quantized types)."""
        if self._map is None:
            raise ModelLoadError(f"{self.path}: GGUF file already closed")
        buf = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return buf.reshape(*info.shape[:-1], -1) if info.shape else buf

    def dequantize(self, name: str) -> np.ndarray:
        """Any tensor as a float32 numpy array of its logical shape (a new array)."""
        from gguf import GGMLQuantizationType, quants

        info = self.tensors[name]
        raw = self.raw(info)
        if info.ggml_type == F32:
            return raw.view(np.float32).reshape(info.shape).copy()
        try:
            out = quants.dequantize(raw, GGMLQuantizationType(info.ggml_type))
        except (NotImplementedError, ValueError) as exc:
            raise ModelLoadError(f"{self.path}: tensor {name} has type {info.type_name}, "
                                 f"which gguf-py cannot dequantize ({exc})") from exc
        return np.ascontiguousarray(out, dtype=np.float32).reshape(info.shape)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as exc:
            raise ModelLoadError(f"{self.path}: truncated GGUF header") from exc
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ModelLoadError(f"{self.path}: truncated GGUF header (string of {n} bytes)")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, n: int) -> list[str]:
        """n length-prefixed strings (vocabularies: the hot loop of header parsing)."""
        buf, pos = self.buf, self.pos
        out: list[str] = []
        unpack, append = _U64.unpack_from, out.append
        try:
            for _ in range(n):
                (k,) = unpack(buf, pos)
                pos += 8
                append(buf[pos:pos + k].decode("utf-8", errors="replace"))
                pos += k
        except struct.error as exc:
            raise ModelLoadError(f"{self.path}: truncated GGUF header (string array)") from exc
        if pos > len(buf):
            raise ModelLoadError(f"{self.path}: truncated GGUF header (string array)")
        self.pos = pos
        return out

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.take("<I"), self.take("<Q")
            if etype == _STRING:
                return self.strings(n)
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                end = self.pos + n * dt.itemsize
                if end > len(self.buf):
                    raise ModelLoadError(f"{self.path}: truncated GGUF header (array)")
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
                self.pos = end
                return arr
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
            raise ModelLoadError(f"{self.path}: unknown GGUF array element type {etype}")
        if vtype in _SCALAR:
            v = self.take(_SCALAR[vtype])
            return np.float32(v).item() if vtype == 6 else v
        raise ModelLoadError(f"{self.path}: unknown GGUF value type {vtype}")


def _block(ggml_type: int) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"unknown ggml tensor type {ggml_type}") from exc


def open_gguf(path: str | Path) -> GgufFile:
    """Parse a GGUF file's header; tensors stay memory-mapped until read."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"model file not found: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{p} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError) as exc:
            raise ModelLoadError(f"could not map GGUF {p}: {exc}") from exc
    cur = _Cursor(mm, p)
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        mm.close()
        raise ModelLoadError(f"{p}: GGUF version {version} is not supported (2 or 3 expected)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    meta: dict = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    align = int(meta.get("general.alignment", 32))
    data_start = cur.pos + (-cur.pos % align)
    out = GgufFile(p, version, meta, _map=mm)
    for name, dims, gtype, rel in infos:
        block, size = _block(gtype)
        if dims and dims[0] % block:
            raise ModelLoadError(f"{p}: tensor {name} rows ({dims[0]}) are not whole blocks")
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        nbytes = n // block * size
        if data_start + rel + nbytes > len(mm):
            raise ModelLoadError(f"{p}: tensor {name} extends past the end of the file "
                                 "(truncated download?)")
        out.tensors[name] = TensorInfo(name, gtype, tuple(reversed(dims)), data_start + rel,
                                       nbytes)
    return out


def scalar(meta: dict, key: str, default=None):
    """A metadata value as a plain Python scalar (numpy and MLX scalars unwrapped)."""
    v = meta.get(key, default)
    if hasattr(v, "item") and getattr(v, "size", 1) == 1:
        v = v.item()
    return v
