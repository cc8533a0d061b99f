"""Which OpenBLAS kernels MLX runs on a Linux CPU: the core type, and sgemv for one-row products.

Core type. OpenBLAS built with DYNAMIC_ARCH (Debian's) picks its kernels when it is loaded, from
the CPU model. A model it does not know (a new Xeon, some VMs' virtual CPUs) falls back to a
generic core (`Prescott`, SSE3) even when the CPU's flags allow AVX2 or AVX-512 kernels: prefill
runs about 2x slower. `configure_core()` asks a child process which core OpenBLAS picks by
itself; when that core is of a lower instruction-set tier than the flags allow, it chooses the
best core for the flags (`choose_core`, a pure table), checks it in a second child with a small
exact matrix product (a core whose instructions fault kills only the child), and sets
`OPENBLAS_CORETYPE` before the library is loaded. An `OPENBLAS_CORETYPE` that is already set
(by the user, or a machine whose older OpenBLAS crashes without it) is never changed. The
answer is cached per library file and CPU flags, so only the first start pays for the probe.

sgemv. Every decode step multiplies one row by each weight matrix; MLX calls `cblas_sgemm` with
M=1 and OpenBLAS's sgemm is about half as fast there as its sgemv (it reads the weights at half
the bandwidth). A ~30-line C shim (`SHIM_SOURCE`) defines `cblas_sgemm`, sends M=1 row-major
calls to `cblas_sgemv` and everything else to OpenBLAS's sgemm. It is loaded with RTLD_GLOBAL
just before OpenBLAS, so MLX's `cblas_sgemm` resolves to it (no LD_PRELOAD, no re-exec), and
checked against exact products before it is switched on. Built with `cc` at set-up
(`python -m permeant_tui.engine.blas --build-shim`, run by `make`); without a compiler it is
skipped and `doctor` says so. `PERMEANT_SGEMV=0` turns it off. Linux only: macOS uses Accelerate.

Standard library only: this runs before MLX is imported.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# OpenBLAS core names (openblas_get_corename) by the instruction-set tier of their kernels.
CORE_TIERS: dict[str, int] = {
    **{n: 1 for n in ("katmai", "coppermine", "northwood", "prescott", "banias", "core2",
                      "penryn", "dunnington", "nehalem", "atom", "athlon", "opteron",
                      "opteron(sse3)", "barcelona", "bobcat", "nano")},
    **{n: 2 for n in ("sandybridge", "bulldozer", "piledriver", "steamroller", "excavator")},
    **{n: 3 for n in ("haswell", "zen")},
    **{n: 4 for n in ("skylakex", "cooperlake", "sapphirerapids")},
}
AVX512 = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")  # what SkylakeX uses
# The best core for a set of CPU flags, best first: (required flags, core, tier).
CORE_TABLE: tuple[tuple[tuple[str, ...], str, int], ...] = (
    (AVX512 + ("avx2", "fma"), "SkylakeX", 4),
    (("avx2", "fma"), "Haswell", 3),
    (("avx",), "Sandybridge", 2),
)
CHILD_TIMEOUT = 30.0


def best_core(flags: set[str] | frozenset[str]) -> tuple[str, int] | None:
    """The best OpenBLAS core these CPU flags can run, and its tier; None: nothing above SSE."""
    for needed, core, tier in CORE_TABLE:
        if all(f in flags for f in needed):
            return core, tier
    return None


def core_tier(name: str | None) -> int:
    return CORE_TIERS.get((name or "").strip().lower(), 0)


@dataclass(frozen=True)
class CoreChoice:
    detected: str | None  # what OpenBLAS picks by itself (None: not probed)
    chosen: str | None  # the OPENBLAS_CORETYPE we set (None: nothing set by us)
    preset: str | None  # an OPENBLAS_CORETYPE found in the environment
    reason: str

    @property
    def label(self) -> str:
        return self.reason


def choose_core(detected: str | None, flags: set[str] | frozenset[str],
                preset: str | None) -> CoreChoice:
    """The decision table (pure). A preset always wins; otherwise a better core only when
    OpenBLAS's own pick is of a lower tier than the flags allow."""
    if preset:
        return CoreChoice(detected, None, preset,
                          f"OPENBLAS_CORETYPE={preset} was set before start: left as it is")
    best = best_core(flags)
    if detected is None:
        return CoreChoice(None, None, None, "OpenBLAS's own core (not probed)")
    if best is None:
        return CoreChoice(detected, None, None,
                          f"{detected} (OpenBLAS's own pick; no AVX on this CPU)")
    core, tier = best
    if core_tier(detected) >= tier:
        return CoreChoice(detected, None, None,
                          f"{detected} (OpenBLAS's own pick; the flags allow {core}-class)")
    return CoreChoice(detected, core, None,
                      f"{core} (chosen from the CPU flags: OpenBLAS fell back to {detected})")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


# The child: load OpenBLAS, name its core, and check sgemm (square and one-row) and sgemv on
# small integer matrices, whose float32 products are exact.
_CHILD = r"""
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
name = lib.openblas_get_corename
name.restype = ctypes.c_char_p
core = name().decode()
F = ctypes.c_float
def mat(r, c, s):
    return [float(((i * 7 + j * 3 + s) % 9) - 4) for i in range(r) for j in range(c)]
def ref(a, b, m, n, k):
    return [sum(a[i * k + p] * b[p * n + j] for p in range(k)) for i in range(m) for j in range(n)]
ok = True
for m, n, k in ((64, 48, 40), (1, 96, 80)):
    a, b = mat(m, k, 1), mat(k, n, 2)
    A, B, C = (F * (m * k))(*a), (F * (k * n))(*b), (F * (m * n))()
    lib.cblas_sgemm(101, 111, 111, m, n, k, F(1.0), A, k, B, n, F(0.0), C, n)
    ok = ok and list(C) == ref(a, b, m, n, k)
    if m == 1:  # the same row through sgemv: y = B^T a
        Y = (F * n)()
        lib.cblas_sgemv(101, 112, k, n, F(1.0), B, n, A, 1, F(0.0), Y, 1)
        ok = ok and list(Y) == ref(a, b, m, n, k)
print(json.dumps({"core": core, "ok": ok}))
"""


def run_child(lib_path: str, coretype: str | None) -> dict | None:
    """{"core": name, "ok": bool} from a fresh process, or None when it crashed or hung."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    env["OPENBLAS_NUM_THREADS"] = "1"
    try:
        r = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD, lib_path], env=env,
                           capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return out if isinstance(out, dict) else None


def blas_dir() -> Path:
    """Machine-local facts about the BLAS (probe answers, the built shim). PERMEANT_BLAS_DIR
    moves it; PERMEANT_CACHE (per test, per workspace) deliberately does not: the CPU and the
    library are the machine's."""
    env = os.environ.get("PERMEANT_BLAS_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "permeant" / "blas"


def _library_key(lib_path: str, flags: frozenset[str]) -> str:
    real = os.path.realpath(lib_path)
    try:
        st = os.stat(real)
        stamp = f"{real}:{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        stamp = real
    text = stamp + "|" + " ".join(sorted(flags)) + "|" + sys.executable + "|v1"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the probe again next time


def probe_core(lib_path: str, flags: frozenset[str]) -> CoreChoice:
    """What to set for this library on this CPU (children on first use, then cached)."""
    cache = blas_dir() / f"core-{_library_key(lib_path, flags)}.json"
    try:
        data = json.loads(cache.read_text())
        return CoreChoice(data["detected"], data["chosen"], None, data["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    own = run_child(lib_path, None)
    if own is None:
        choice = CoreChoice(None, None, None, "OpenBLAS's own core (the probe did not run)")
    else:
        choice = choose_core(own.get("core"), flags, None)
        if choice.chosen:
            forced = run_child(lib_path, choice.chosen)
            if forced is None or not forced.get("ok") or \
                    str(forced.get("core", "")).lower() != choice.chosen.lower():
                choice = CoreChoice(
                    choice.detected, None, None,
                    f"{choice.detected} (OpenBLAS's own pick; {choice.chosen} failed the "
                    "self-test here, so it is not used)")
            else:
                choice = CoreChoice(choice.detected, choice.chosen, None,
                                    choice.reason + "; self-test passed")
    _write_json(cache, {"detected": choice.detected, "chosen": choice.chosen,
                        "reason": choice.reason})
    return choice


def configure_core(lib_path: str, environ=os.environ, probe=probe_core,
                   flags: frozenset[str] | None = None) -> CoreChoice:
    """Set OPENBLAS_CORETYPE for `lib_path` before it is loaded, unless already set."""
    preset = environ.get("OPENBLAS_CORETYPE")
    if preset:
        return choose_core(None, frozenset(), preset)
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return CoreChoice(None, None, None, "OpenBLAS's own core (not an x86-64 Linux CPU)")
    choice = probe(lib_path, cpu_flags() if flags is None else flags)
    if choice.chosen:
        environ["OPENBLAS_CORETYPE"] = choice.chosen
    return choice


# --- sgemv shim ---------------------------------------------------------------------------

SHIM_SOURCE = r"""
/* permeant: cblas_sgemm with M == 1 (row-major) sent to cblas_sgemv; the rest to sgemm. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <string.h>
enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static int enabled;
static long routed;
void permeant_sgemv_init(void *sgemm, void *sgemv) {
  real_sgemm = (sgemm_fn)sgemm; real_sgemv = (sgemv_fn)sgemv;
}
void permeant_sgemv_enable(int on) { enabled = on && real_sgemv; }
long permeant_sgemv_routed(void) { return routed; }
void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (enabled && m == 1 && order == RowMajor && n > 0 && k > 0) {
    int incx = (ta == NoTrans) ? 1 : lda;   /* A is 1 x K, or K x 1 when transposed */
    if (beta == 0.0f) memset(c, 0, sizeof(float) * (size_t)n);  /* sgemm never reads C */
    if (tb == NoTrans) real_sgemv(RowMajor, Trans, k, n, alpha, b, ldb, a, incx, beta, c, 1);
    else real_sgemv(RowMajor, NoTrans, n, k, alpha, b, ldb, a, incx, beta, c, 1);
    routed++;
    return;
  }
  if (!real_sgemm) real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");  /* never attached */
  real_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""


def shim_path() -> Path:
    tag = hashlib.sha256((SHIM_SOURCE + platform.machine()).encode()).hexdigest()[:12]
    return blas_dir() / f"sgemv-shim-{tag}.so"


def build_shim(dest: Path | None = None, cc: str | None = None) -> tuple[Path | None, str]:
    """Compile the shim (once: the file name carries the source's digest). (path, note)."""
    dest = dest or shim_path()
    if dest.is_file():
        return dest, "built"
    if platform.system() != "Linux":
        return None, "not used off Linux"
    compiler = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, "not built: no C compiler (install gcc, then run `make setup`)"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            src = Path(tmp) / "shim.c"
            src.write_text(SHIM_SOURCE)
            out = Path(tmp) / "shim.so"
            r = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(out), str(src), "-ldl"],
                               capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                return None, f"not built: {compiler} failed ({last})"
            os.replace(out, dest)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"not built: {exc}"
    return dest, "built"


def load_shim(path: Path) -> ctypes.CDLL:
    """Load the shim with RTLD_GLOBAL. Must come before OpenBLAS and before MLX."""
    return ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL)


def attach_shim(shim: ctypes.CDLL, openblas: ctypes.CDLL) -> bool:
    """Point the shim at OpenBLAS, check it on exact products, then switch it on."""
    addr = [ctypes.cast(getattr(openblas, n), ctypes.c_void_p) for n in
            ("cblas_sgemm", "cblas_sgemv")]
    shim.permeant_sgemv_init(*addr)
    shim.permeant_sgemv_enable(1)
    if shim_self_test(shim):
        return True
    shim.permeant_sgemv_enable(0)
    return False


def shim_self_test(shim: ctypes.CDLL) -> bool:
    """M=1 products through the shim (B plain and transposed, A transposed with a stride,
    beta 0 over NaN, beta 1) against exact integer results."""
    F = ctypes.c_float
    k, n = 37, 29
    a = [float((i * 5) % 7 - 3) for i in range(k)]
    b = [float(((i * 3 + j) % 11) - 5) for i in range(k) for j in range(n)]  # K x N
    bt = [b[p * n + j] for j in range(n) for p in range(k)]  # N x K
    want = [sum(a[p] * b[p * n + j] for p in range(k)) for j in range(n)]
    a_t = [x for v in a for x in (v, 7.0, -7.0)]  # A transposed: K x 1 inside a K x 3 block
    before = shim.permeant_sgemv_routed()
    cases = [(111, a, k, tb, mat, ldb, beta, start)
             for tb, mat, ldb in ((111, b, n), (112, bt, k))
             for beta, start in ((0.0, float("nan")), (1.0, 2.0))]
    cases.append((112, a_t, 3, 111, b, n, 0.0, float("nan")))
    for ta, av, lda, tb, mat, ldb, beta, start in cases:
        c = (F * n)(*([start] * n))
        shim.cblas_sgemm(101, ta, tb, 1, n, k, F(1.0), (F * len(av))(*av), lda,
                         (F * len(mat))(*mat), ldb, F(beta), c, n)
        expect = [w + (2.0 if beta else 0.0) for w in want]
        if list(c) != expect:
            return False
    return shim.permeant_sgemv_routed() - before == len(cases)


@dataclass(frozen=True)
class SgemvState:
    on: bool
    note: str


def main(argv: list[str]) -> int:
    if "--build-shim" in argv:  # quiet when there is nothing to do (make runs it every time)
        if platform.system() != "Linux" or shim_path().is_file():
            return 0
        path, note = build_shim()
        print(f"sgemv shim: {note}" + (f" ({path})" if path else ""))
        return 0
    flags = cpu_flags()
    print(f"best core for this CPU's flags: {best_core(flags)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
