"""ggml's KV element types as the sequence-state blob stores them, and the sinks the one
serializer (`codec.write_seq_state_caches`) writes through: llama.cpp's `llama_io_write_dummy`
(count) and `llama_io_write_buffer` (fill), so a blob's size and its bytes cannot disagree."""

from __future__ import annotations

from typing import Protocol

import numpy as np

# ggml_type ids (ggml.h) of the KV types this module reads and writes
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_BF16 = 30
KV_TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "bf16": GGML_TYPE_BF16}
NAME_OF = {v: k for k, v in KV_TYPES.items()}
ELEM_BYTES = {GGML_TYPE_F32: 4, GGML_TYPE_F16: 2, GGML_TYPE_BF16: 2}
NP_STORE = {GGML_TYPE_F32: "<f4", GGML_TYPE_F16: "<f2", GGML_TYPE_BF16: "<u2"}


class SeqStateWriter(Protocol):
    """Where `write_seq_state` puts its output (llama.cpp's `llama_io_write_i`)."""

    def write(self, data: bytes) -> None:
        """Raw header bytes."""

    def write_tensor(self, x: np.ndarray, ggml_type: int) -> None:
        """A float array, converted to `ggml_type` and written in x's index order (C order of
        the possibly transposed view)."""

    def n_bytes(self) -> int:
        """Bytes written so far."""


class CountingWriter:
    """Counts what would be written (llama.cpp's `llama_io_write_dummy`); reads no tensor data,
    so zero-stride broadcast placeholders size a blob for free."""

    def __init__(self) -> None:
        self._n = 0

    def write(self, data: bytes) -> None:
        self._n += len(data)

    def write_tensor(self, x: np.ndarray, ggml_type: int) -> None:
        self._n += x.size * ELEM_BYTES[ggml_type]

    def n_bytes(self) -> int:
        return self._n


class BufferWriter:
    """Writes into a preallocated buffer (llama.cpp's `llama_io_write_buffer`): each tensor is
    converted straight into place, one pass, no concatenation; overflow raises."""

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        self._n = 0

    def _room(self, n: int) -> None:
        if self._n + n > len(self.buf):
            raise ValueError(f"sequence state overflows its buffer of {len(self.buf)} bytes")

    def write(self, data: bytes) -> None:
        self._room(len(data))
        self.buf[self._n:self._n + len(data)] = data
        self._n += len(data)

    def write_tensor(self, x: np.ndarray, ggml_type: int) -> None:
        nbytes = x.size * ELEM_BYTES[ggml_type]
        self._room(nbytes)
        dst = np.frombuffer(self.buf, dtype=NP_STORE[ggml_type], count=x.size,
                            offset=self._n).reshape(x.shape)
        if ggml_type == GGML_TYPE_BF16:
            dst[...] = _bf16_bits(np.asarray(x, dtype=np.float32))
        else:
            dst[...] = x  # numpy's cast: round to nearest even for f16
        self._n += nbytes

    def n_bytes(self) -> int:
        return self._n


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (quiet NaN kept NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(x)
    out = rounded.astype("<u2")
    if nan.any():
        out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype("<u2")
    return out
