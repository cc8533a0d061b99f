"""USXF 1.1 per-layer lengths at the format level (no MLX): the writer takes and the reader
returns each layer's own stored length and start; full K/V on a sliding structure is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_usxf_format import export, make_identity, make_kv

from permeant_tui.engine.usxf import KVPayload, UsxfWriteError, read_usxf
from permeant_tui.engine.usxf.keys import WorkspaceKeys


def _sliding_identity():
    rope = {"class": "RoPE", "dims": 8, "base": 10000.0, "traditional": False}
    layers = [{"type": "sliding", "window": 4, "rope": rope},
              {"type": "full", "window": 0, "rope": {**rope, "base": 1e6}},
              {"type": "sliding", "window": 4, "rope": rope}]
    return make_identity(attention=json.dumps(layers), sliding_window=4)


@pytest.mark.parametrize("quant", ["none", "int8"])
@pytest.mark.parametrize("n", [3, 17])
def test_writer_and_reader_carry_per_layer_lengths(tmp_path, quant, n):
    keys = WorkspaceKeys(tmp_path / "keys").ensure()
    ident = _sliding_identity()
    full = make_kv(n=n, hd=64 if quant == "int8" else 8)
    if quant == "int8":
        ident = ident.__class__(**{**ident.__dict__, "head_dim": 64})
    lengths = [min(n, 4), n, min(n, 4)]
    kv = KVPayload([k[:, n - L:] for k, L in zip(full.keys, lengths, strict=True)],
                   [v[:, n - L:] for v, L in zip(full.values, lengths, strict=True)], "float32")
    tokens = [(i * 37) % 1000 for i in range(n)]
    info = export(tmp_path, keys, quant, kv=kv, identity=ident, tokens=tokens)
    m = info.manifest
    assert [x["type"] for x in m["attention"]["layers"]] == ["sliding", "full", "sliding"]
    assert [x["rope_theta"] for x in m["attention"]["layers"]] == [10000.0, 1e6, 10000.0]
    assert [t["start"] for t in m["kv"]["tensors"]] == [n - L for L in lengths for _ in "kv"]
    got = read_usxf(info.path, trusted=keys).load_kv()
    assert [k.shape[1] for k in got.keys] == lengths == [v.shape[1] for v in got.values]
    if quant == "none":
        assert all(np.array_equal(a, b) for a, b in zip(got.keys, kv.keys, strict=True))
    if n > 4:  # every layer's full K/V for a sliding structure: refused before writing
        with pytest.raises(UsxfWriteError) as ei:
            export(tmp_path, keys, quant, name="b.usxf", kv=full, identity=ident, tokens=tokens)
        assert ei.value.check == "kv-shape" and "layer 0" in ei.value.detail
        assert not (tmp_path / "b.usxf").exists()
