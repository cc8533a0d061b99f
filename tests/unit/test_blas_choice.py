"""OpenBLAS core choice (engine/blas.py): the decision table, a preset OPENBLAS_CORETYPE is
never overridden, the probe's self-test gate and cache, and the probe child on this machine."""

from __future__ import annotations

import pytest

from permeant_tui.engine import blas, runtime

AVX512 = frozenset({"sse3", "avx", "avx2", "fma", *blas.AVX512})
AVX2 = frozenset({"sse3", "avx", "avx2", "fma"})
AVX = frozenset({"sse3", "avx"})
SSE = frozenset({"sse3", "ssse3"})


@pytest.mark.parametrize(("detected", "flags", "chosen"), [
    ("Prescott", AVX512, "SkylakeX"),  # a Xeon OpenBLAS does not know (the machine)
    ("Prescott", AVX512 | {"amx_tile"}, "SkylakeX"),  # AMX or not: the flags decide
    ("Prescott", AVX2, "Haswell"),
    ("Nehalem", AVX2, "Haswell"),
    ("Core2", AVX, "Sandybridge"),
    ("Haswell", AVX512, "SkylakeX"),  # a lower tier than the flags allow
    ("Prescott", SSE, None),  # nothing better to run
    ("Zen", AVX2, None),  # OpenBLAS's own pick is already AVX2-class (this machine)
    ("Haswell", AVX2, None),
    ("SkylakeX", AVX512, None),
    ("Cooperlake", AVX512, None),
    ("SapphireRapids", AVX512, None),
])
def test_choice_table(detected, flags, chosen):
    c = blas.choose_core(detected, flags, None)
    assert c.chosen == chosen
    assert c.detected == detected
    assert (chosen or detected) in c.label


def test_avx512_needs_every_subset_skylakex_uses():
    partial = AVX2 | {"avx512f"}  # e.g. Knights Landing style subsets: not SkylakeX
    assert blas.best_core(partial) == ("Haswell", 3)
    assert blas.best_core(AVX512) == ("SkylakeX", 4)


def test_a_preset_core_type_is_never_overridden():
    env = {"OPENBLAS_CORETYPE": "Nehalem"}

    def probe(*_):
        raise AssertionError("no probe when the user chose")

    c = blas.configure_core("/nonexistent/libopenblas.so", environ=env, probe=probe,
                            flags=AVX512)
    assert env == {"OPENBLAS_CORETYPE": "Nehalem"}
    assert c.preset == "Nehalem" and c.chosen is None and "left as it is" in c.label
    assert blas.choose_core("Prescott", AVX512, "Nehalem").chosen is None


def test_a_chosen_core_is_set_before_loading(monkeypatch):
    monkeypatch.setattr(blas.platform, "system", lambda: "Linux")
    monkeypatch.setattr(blas.platform, "machine", lambda: "x86_64")
    env: dict[str, str] = {}
    c = blas.configure_core("lib.so", environ=env, flags=AVX512,
                            probe=lambda path, flags: blas.choose_core("Prescott", flags, None))
    assert c.chosen == "SkylakeX" and env == {"OPENBLAS_CORETYPE": "SkylakeX"}


def _fake_children(monkeypatch, answers):
    calls = []

    def run_child(lib, core):
        calls.append(core)
        return answers.get(core)

    monkeypatch.setattr(blas, "run_child", run_child)
    return calls


def test_a_core_that_fails_its_self_test_is_not_used(monkeypatch, tmp_path):
    monkeypatch.setenv("PERMEANT_BLAS_DIR", str(tmp_path))
    calls = _fake_children(monkeypatch, {None: {"core": "Prescott", "ok": True},
                                         "SkylakeX": None})  # the forced child crashed
    c = blas.probe_core("lib.so", AVX512)
    assert calls == [None, "SkylakeX"]
    assert c.chosen is None and "failed the self-test" in c.label


def test_a_wrong_product_or_an_ignored_coretype_is_a_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("PERMEANT_BLAS_DIR", str(tmp_path))
    _fake_children(monkeypatch, {None: {"core": "Prescott", "ok": True},
                                 "Haswell": {"core": "Haswell", "ok": False}})
    assert blas.probe_core("a.so", AVX2).chosen is None
    _fake_children(monkeypatch, {None: {"core": "Prescott", "ok": True},
                                 "Haswell": {"core": "Prescott", "ok": True}})
    assert blas.probe_core("b.so", AVX2).chosen is None


def test_the_probe_is_cached_per_library_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("PERMEANT_BLAS_DIR", str(tmp_path))
    calls = _fake_children(monkeypatch, {None: {"core": "Prescott", "ok": True},
                                         "Haswell": {"core": "Haswell", "ok": True}})
    first = blas.probe_core("lib.so", AVX2)
    assert first.chosen == "Haswell" and "self-test passed" in first.label
    again = blas.probe_core("lib.so", AVX2)
    assert again == first and calls == [None, "Haswell"]
    blas.probe_core("lib.so", AVX512)  # other flags: probed again
    assert len(calls) > 2


def test_cpu_flags_parsing():
    text = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\nbogomips\t: 1\n"
    assert blas.cpu_flags(text) == {"fpu", "sse", "avx2", "avx512f"}
    assert blas.cpu_flags("nothing") == frozenset()


def test_the_probe_child_names_and_checks_the_real_library():
    lib = runtime.find_openblas()
    if lib is None:
        pytest.skip("OpenBLAS not installed (make setup installs it)")
    own = blas.run_child(lib, None)
    assert own is not None and own["ok"] is True
    assert blas.core_tier(own["core"]) >= 1, own
    forced = blas.run_child(lib, "Prescott")  # every x86-64 CPU runs the generic core
    assert forced == {"core": "Prescott", "ok": True}
