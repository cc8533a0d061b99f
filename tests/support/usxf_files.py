"""Helpers for the USXF format tests: a small identity and KV, a key pair fixture, export, and
byte-level surgery on written files (header fields, sections, streaming)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xxhash

from permeant_tui.engine.errors import UsxfInvalid
from permeant_tui.engine.identity import ModelIdentity
from permeant_tui.engine.usxf import (
    AgentRecord,
    Fidelity,
    KVPayload,
    StreamVerifier,
    WorkspaceKeys,
    write_usxf,
)
from permeant_tui.engine.usxf import quant as q
from permeant_tui.engine.usxf.spec import (
    HEADER,
    HEADER_SIZE,
)

LAYERS, HEADS, N, HD = 3, 2, 17, 8


def make_identity(**kw) -> ModelIdentity:
    base = dict(
        name="fake-model", architecture="llama", n_layers=LAYERS, n_heads=4, n_kv_heads=HEADS,
        head_dim=HD, hidden_size=32, vocab_size=1000, rope_theta=10000.0, rope_scaling="null",
        rope_layout="interleaved", sliding_window=0, context_limit=2048,
        weights_digest="ab" * 16, tokenizer_digest="cd" * 16, kv_dtype="float32",
    )
    base.update(kw)
    return ModelIdentity(**base)


def make_kv(seed=0, n=N, layers=LAYERS, heads=HEADS, hd=HD, dtype="float32") -> KVPayload:
    rng = np.random.default_rng(seed)

    def one():
        x = rng.standard_normal((heads, n, hd)).astype(np.float32)
        if dtype == "float16":
            return x.astype(np.float16)
        if dtype == "bfloat16":
            return q.f32_to_bf16_bits(x)
        return x

    return KVPayload([one() for _ in range(layers)], [one() for _ in range(layers)], dtype)


AGENT = AgentRecord("tech-1", "technical", "Technical specialist", "You are precise.",
                    [{"user": "hello", "reply": "hi", "span": [0, 9]},
                     {"user": "more", "reply": "sure", "span": [9, N]}])
FIDELITY = Fidelity(probe_prompt_ids=[5, 6, 7], expected_ids=[8, 9], n=2, context_room=2031, note="t")


@pytest.fixture
def keys(tmp_path) -> WorkspaceKeys:
    return WorkspaceKeys(tmp_path / "keys").ensure()


def export(tmp_path, keys, quant="none", name="a.usxf", kv=None, tokens=None, identity=None, **kw):
    kv = kv if kv is not None else make_kv()
    n = kv.keys[0].shape[1]
    tokens = tokens if tokens is not None else [(i * 37) % 1000 for i in range(n)]
    agent = kw.pop("agent", AGENT if n == N else AgentRecord("x", "r", "t", "s", []))
    return write_usxf(tmp_path / name, identity=identity or make_identity(kv_dtype=kv.dtype),
                      token_ids=tokens, kv=kv, agent=agent, keys=keys, quant=quant,
                      fidelity=kw.pop("fidelity", FIDELITY), **kw)


def rewrite(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def fix_header(head: bytes, **fields) -> bytes:
    """A header with fields replaced and its checksum recomputed (a deliberate edit)."""
    names = ["magic", "major", "minor", "sig_alg", "flags", "manifest_len", "sig_len", "chunk_size",
             "payload_offset", "payload_len", "manifest_xxh3", "header_xxh3"]
    vals = dict(zip(names, HEADER.unpack(head[:HEADER_SIZE]), strict=True))
    vals.update(fields)
    raw = HEADER.pack(*[vals[n] for n in names])
    return raw[:56] + xxhash.xxh3_64_intdigest(raw[:56]).to_bytes(8, "little")


def sections(data: bytes) -> dict:
    h = HEADER.unpack(data[:HEADER_SIZE])
    ml, sl, po, pl = h[5], h[6], h[8], h[9]
    return {"manifest": (64, 64 + ml), "signature": (64 + ml, 64 + ml + sl),
            "padding": (64 + ml + sl, po), "payload": (po, po + pl), "chunk_size": h[7]}


def stream(data: bytes, trusted) -> object:
    sv = StreamVerifier(trusted)
    sv.feed(data)
    return sv.finish()


def check_of(fn, *args, **kw) -> str:
    with pytest.raises(UsxfInvalid) as ei:
        fn(*args, **kw)
    return ei.value.check
