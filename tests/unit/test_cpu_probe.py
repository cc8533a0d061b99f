"""The AMX probe that decides how llama.cpp is built (issue 10): both outcomes of the decision,
and the probe's child process on this machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from permeant_tui.engine import cpu

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f {extra}\nbogomips\t: 1\n"


def test_not_advertised_keeps_the_native_build():
    d = cpu.decide(advertised=False, usable=None)
    assert not d.disable and d.cmake_args == "" and "not advertised" in d.reason


def test_advertised_and_usable_keeps_the_native_build():
    d = cpu.decide(advertised=True, usable=True)
    assert not d.disable and d.cmake_args == ""


def test_advertised_but_not_usable_disables_amx_in_c_and_cxx():
    d = cpu.decide(advertised=True, usable=False)
    assert d.disable and "not usable" in d.reason
    for lang in ("C", "CXX"):
        assert f'-DCMAKE_{lang}_FLAGS="{cpu.AMX_OFF}"' in d.cmake_args
    for flag in ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"):
        assert flag in d.cmake_args


def test_advertised_reads_the_flags_line():
    assert cpu.amx_advertised(CPUINFO.format(extra="amx_bf16 amx_tile amx_int8"))
    assert not cpu.amx_advertised(CPUINFO.format(extra="avx_vnni"))
    assert not cpu.amx_advertised("no flags here")


def test_probe_child_answers_without_crashing_us():
    """The child executes real tile instructions; where AMX is not advertised it must report
    'not usable' (refused permission or SIGILL), never take this process down."""
    usable = cpu.amx_usable()
    assert isinstance(usable, bool)
    if not cpu.amx_advertised():
        assert usable is False
    assert cpu.probe().usable in (None, usable)


def test_build_key_depends_on_the_flags():
    on = cpu.build_key(cpu.decide(True, True))
    off = cpu.build_key(cpu.decide(True, False))
    assert on != off and len(on) == 16


def test_script_runs_without_the_package_installed():
    script = Path(cpu.__file__)
    out = subprocess.run([sys.executable, "-I", str(script)], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("cpu probe: ")
