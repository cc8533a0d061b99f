"""MLX runtime set-up: which device, which BLAS, and memory figures.

On Linux, MLX's CPU wheel links the reference BLAS (about 6 GFLOP/s for float32 matmul on the
development machine). Loading Debian's OpenBLAS with RTLD_GLOBAL *before the first
`import mlx`* makes MLX's BLAS calls resolve to it (about 200 GFLOP/s, same machine). That is
what `prepare()` does. On macOS MLX uses Accelerate and Metal; nothing here applies there.

Call `prepare()` before anything imports mlx (the CLI does it first thing).
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys
import threading
from dataclasses import dataclass

# Debian/Ubuntu multiarch paths of libopenblas0-pthread (its libblas.so.3 alternative), then
# generic names. PERMEANT_BLAS=/path/to/libblas.so overrides; PERMEANT_BLAS=none disables.
_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_lock = threading.Lock()
_blas: str | None = None
_prepared = False


def find_openblas() -> str | None:
    override = os.environ.get("PERMEANT_BLAS")
    if override:
        return None if override.lower() == "none" else override
    for pattern in _CANDIDATES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def prepare() -> str:
    """Load OpenBLAS before MLX when useful. Returns a label of the BLAS in use. Idempotent."""
    global _blas, _prepared
    with _lock:
        if _prepared:
            return _blas or "unknown"
        _prepared = True
        if sys.platform == "darwin":
            _blas = "Accelerate"
            return _blas
        if "mlx.core" in sys.modules:
            # Too late: MLX has resolved its BLAS symbols already.
            _blas = "reference (mlx imported before OpenBLAS could be loaded)"
            return _blas
        path = find_openblas()
        if path is None:
            _blas = "reference (install libopenblas0-pthread for ~30x faster CPU matmul)"
            return _blas
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            _blas = f"OpenBLAS ({path})"
        except OSError as exc:
            _blas = f"reference (could not load {path}: {exc})"
        return _blas


def blas_label() -> str:
    return _blas or prepare()


def device_label() -> str:
    import mlx.core as mx

    dev = mx.default_device()
    if dev.type == mx.gpu and mx.metal.is_available():
        return f"gpu (Metal, {platform.machine()})"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.gpu


@dataclass(frozen=True)
class MemoryFigures:
    rss_bytes: int
    mlx_active_bytes: int
    mlx_peak_bytes: int


def memory_figures() -> MemoryFigures:
    """Process RSS and MLX's allocator figures. Cheap enough for a gauge timer."""
    import psutil

    rss = psutil.Process().memory_info().rss
    active = peak = 0
    if "mlx.core" in sys.modules:
        import mlx.core as mx

        active, peak = mx.get_active_memory(), mx.get_peak_memory()
    return MemoryFigures(rss, active, peak)


def weights_dtype_choice() -> str:
    """float32 copies on the CPU device (MLX's CPU quantized/half kernels are slow, measured);
    the file's quantization on the GPU where MLX has fast quantized kernels.
    PERMEANT_WEIGHTS=quantized|float32|float16 overrides."""
    forced = os.environ.get("PERMEANT_WEIGHTS")
    if forced:
        return forced
    return "quantized" if on_gpu() else "float32"
