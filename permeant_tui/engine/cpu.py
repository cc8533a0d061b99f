"""What this CPU lets native code use: the AMX probe that decides how llama.cpp is built.

A native llama.cpp build (`-march=native`) compiles ggml's AMX kernels when the CPU advertises
AMX. Some virtual machines advertise it but never grant the tile state, and the first matmul
dies with SIGILL (`tilezero`). The probe asks the kernel for the permission
(`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`) and executes real tile instructions in a
child process; when they fault, set-up builds llama.cpp with AMX disabled and keeps the rest of
the native SIMD path.

Runs with no dependency beyond the standard library, before the package is installed:
`python permeant_tui/engine/cpu.py [--cmake-args | --build-key]`.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from dataclasses import dataclass

AMX_OFF = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

# Run in a child: a SIGILL there is an answer, not a crash of ours.
_CHILD = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
# syscall(SYS_arch_prctl=158, ARCH_REQ_XCOMP_PERM=0x1023, XFEATURE_XTILEDATA=18)
if libc.syscall(158, 0x1023, 18) != 0:
    sys.exit(3)
code = bytes([0xC4, 0xE2, 0x78, 0x49, 0x07,   # ldtilecfg [rdi]
              0xC4, 0xE2, 0x7B, 0x49, 0xC0,   # tilezero tmm0
              0xC4, 0xE2, 0x78, 0x49, 0xC0,   # tilerelease
              0xC3])                          # ret
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
cfg = (ctypes.c_ubyte * 64)()
cfg[0] = 1                       # palette 1
cfg[16] = 64                     # tile 0: 64 bytes a row (colsb[0], little endian u16)
cfg[48] = 16                     # tile 0: 16 rows
ctypes.CFUNCTYPE(None, ctypes.c_void_p)(addr)(ctypes.addressof(cfg))
sys.exit(0)
"""


@dataclass(frozen=True)
class AmxDecision:
    advertised: bool
    usable: bool | None  # None: not probed (not advertised, or not an x86-64 Linux machine)
    disable: bool
    reason: str

    @property
    def cmake_args(self) -> str:
        """CMAKE_ARGS for building llama-cpp-python natively on this machine."""
        if not self.disable:
            return ""
        return f'-DCMAKE_C_FLAGS="{AMX_OFF}" -DCMAKE_CXX_FLAGS="{AMX_OFF}"'


def decide(advertised: bool, usable: bool | None) -> AmxDecision:
    """The build decision from the two facts (pure, so both outcomes are unit-tested)."""
    if not advertised:
        return AmxDecision(False, None, False, "AMX not advertised: native build unchanged")
    if usable:
        return AmxDecision(True, True, False, "AMX advertised and usable: native build unchanged")
    return AmxDecision(True, bool(usable), True,
                       "AMX advertised but not usable here (tile state not granted): "
                       f"llama.cpp built with {AMX_OFF}")


def amx_advertised(cpuinfo: str | None = None) -> bool:
    if cpuinfo is None:
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            return False
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return "amx_tile" in line.split()
    return False


def amx_usable(timeout: float = 20.0) -> bool:
    """Execute tile instructions in a child process; True only if it exits cleanly."""
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def probe() -> AmxDecision:
    adv = amx_advertised()
    return decide(adv, amx_usable() if adv else None)


def build_key(decision: AmxDecision) -> str:
    """Names a native build: the CPU's feature flags and the build flags (a wheel built for
    one CPU may not run on another)."""
    feats = platform.machine() + platform.system()
    try:
        with open("/proc/cpuinfo") as f:
            feats += next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        feats += platform.processor()
    return hashlib.sha256((feats + decision.cmake_args).encode()).hexdigest()[:16]


def main(argv: list[str]) -> int:
    d = probe()
    if "--cmake-args" in argv:
        print(d.cmake_args)
    elif "--build-key" in argv:
        print(build_key(d))
    else:
        print(f"cpu probe: {d.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
