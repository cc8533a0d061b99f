"""MLX runtime set-up: which device, which BLAS, and memory figures.

On Linux, MLX's CPU wheel links the reference BLAS (about 6 GFLOP/s for float32 matmul on the
development machine). Loading Debian's OpenBLAS with RTLD_GLOBAL *before the first
`import mlx`* makes MLX's BLAS calls resolve to it (about 200 GFLOP/s, same machine). That is
what `prepare()` does, after choosing OpenBLAS's core type and putting the sgemv shim in front
of it (`engine/blas.py`). On macOS MLX uses Accelerate and Metal; nothing here applies there.

Call `prepare()` before anything imports mlx (the CLI does it first thing).
"""

from __future__ import annotations

import atexit
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
_core: str = "n/a (OpenBLAS not loaded)"
_sgemv: str = "off (OpenBLAS not loaded)"
_shim = None  # the loaded shim (ctypes.CDLL), for benchmarks that switch it


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
        atexit.register(quiesce)  # every entry point: benches and scripts, not only the CLI
        if sys.platform.startswith("linux"):
            from . import mlx_imports

            mlx_imports.install()  # transformers only when a model needs it (cold start)
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
        _load_openblas(path)
        return _blas or "unknown"


def _load_openblas(path: str) -> None:
    """Core type first (read by OpenBLAS when it loads), then OpenBLAS privately (so a library
    that fails to load leaves nothing behind), then the shim and OpenBLAS into the global
    scope in that order: MLX's `cblas_sgemm` then resolves to the shim, the rest to OpenBLAS."""
    global _blas, _core, _sgemv, _shim
    from . import blas

    _core = blas.configure_core(path).label
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
    except OSError as exc:
        _blas = f"reference (could not load {path}: {exc})"
        return
    if os.environ.get("PERMEANT_SGEMV", "1") == "0":
        _sgemv = "off (PERMEANT_SGEMV=0)"
    else:
        shim_file = blas.shim_path()
        if not shim_file.is_file():
            _sgemv = "off: shim not built (`make setup` builds it with cc)"
        else:
            try:
                _shim = blas.load_shim(shim_file)
                ok = blas.attach_shim(_shim, lib)
                _sgemv = ("on (one-row cblas_sgemm -> cblas_sgemv)" if ok
                          else "off: the shim failed its self-test")
            except (OSError, AttributeError) as exc:
                _sgemv = f"off: {exc}"
    lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    _blas = f"OpenBLAS ({path})"


def blas_label() -> str:
    return _blas or prepare()


def kernel_labels() -> tuple[str, str]:
    """(OpenBLAS core choice, sgemv shim state), for doctor and the benchmarks."""
    prepare()
    return _core, _sgemv


def set_sgemv(on: bool) -> bool:
    """Switch the shim at run time (benchmarks compare both in one process). False when the
    shim is not loaded."""
    if _shim is None:
        return False
    _shim.permeant_sgemv_enable(1 if on else 0)
    return True


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


_keep_freed = 0  # the freed-buffer limit keep_freed_buffers set, 0 before its first call


def keep_freed_buffers(nbytes: int) -> int:
    """Let MLX keep at least `nbytes` of freed buffers for reuse instead of returning them to
    the system. Called before the LRU releases an agent: the restore that usually follows
    (the agent made room for) then gets the released K/V buffers back, already faulted in,
    instead of new memory, which it must fault in page by page (bench/restore_populate.py:
    the largest cost of a restore beyond reading the bytes). MLX keeps 32 MB on the CPU by
    default; Metal's default is far larger, and a higher limit is never lowered here. The
    memory stays the process's, at most one released agent's K/V at a time (each restore
    takes it back). Returns the limit in force."""
    global _keep_freed
    if nbytes <= _keep_freed:
        return _keep_freed
    import mlx.core as mx

    with _lock:
        before = mx.set_cache_limit(nbytes)
        if before > nbytes:  # MLX already kept more (Metal): leave it so
            mx.set_cache_limit(before)
        _keep_freed = max(before, nbytes)
        return _keep_freed


def quiesce() -> None:
    """Wait for the MLX work still queued on its streams. Call it before the process exits.

    mlx_lm's `generate_step` evaluates one step ahead (`async_eval`), so after the last token
    a forward pass is still running on its stream. If the process exits meanwhile, that stream
    thread runs in OpenBLAS while the exit handlers unload it. Measured 2026-12-01: `usxf verify
    --fidelity` died with SIGSEGV in `cblas_sgemv` in about 1 exit in 20; the exit deadlocked in
    OpenBLAS's `blas_thread_shutdown_`, and one CI run hung on that for an hour. `prepare()`
    registers it with atexit: every entry point calls `prepare()` (CLI, TUI, benches, demo,
    tests). Safe to call from any thread, and cheap when nothing is queued."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return
    streams = []
    gen = sys.modules.get("mlx_lm.generate")
    if gen is not None and getattr(gen, "generation_stream", None) is not None:
        streams.append(gen.generation_stream)
    for device in (mx.default_device(), mx.cpu):
        streams.append(mx.default_stream(device))
    for stream in streams:
        try:
            mx.synchronize(stream)
        except Exception:  # noqa: BLE001 - a stream MLX no longer knows; nothing to wait for
            pass
