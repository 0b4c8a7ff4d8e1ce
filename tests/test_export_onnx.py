"""ONNX export run by onnxruntime: MatMulNBits 4-bit layers, KV-cache decoding, logits and greedy tokens.

SmolLM2-135M truncated to 4 blocks, RTN 4-bit g128 asymmetric (SmolLM2's 576 columns leave a partial last
block of 64, which MatMulNBits holds). onnxruntime dequantizes the same codes in fp32, so logits agree to
float rounding and greedy decoding is identical.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import slimlm
from slimlm.errors import SlimlmError
from slimlm.methods.prune.layerdrop import drop_blocks

pytest.importorskip("onnxruntime")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from slimlm.export.onnx import onnx_session

    lm = slimlm.load("default")
    drop_blocks(lm.model, lm.arch, set(range(4, lm.info.n_layers)))
    lm = slimlm.compress(lm, "steps:\n  - rtn: {bits: 4, group_size: 128}\n").model
    out = tmp_path_factory.mktemp("onnx") / "m"
    res = slimlm.export(lm, out, format="onnx")
    return lm, out, res, onnx_session(out, threads=2)


def test_graph_uses_matmulnbits_with_codes(exported) -> None:
    import onnx
    from onnx import numpy_helper

    lm, out, res, _ = exported
    assert res.tensor_types == {"MatMulNBits": "28"}
    model = onnx.load(str(out / "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 28 and all(n.domain == "com.microsoft" for n in nodes)
    inits = {i.name: i for i in model.graph.initializer}
    q = lm.model.model.layers[0].mlp.down_proj
    packed = numpy_helper.to_array(inits["model.layers.0.mlp.down_proj.qweight"])
    codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(q.out_features, -1)[:, : q.in_features]
    assert np.array_equal(codes, q.codes().numpy())
    assert json.loads((out / "slimlm_onnx.json").read_text())["linears"] == {"MatMulNBits": 28}


def test_logits_match(exported) -> None:
    lm, _, _, sess = exported
    for text in PROMPTS:
        ids = lm.tokenizer(text)["input_ids"]
        feeds = {"input_ids": np.array([ids])}
        for inp in sess.get_inputs()[1:]:
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float32)
        got = sess.run(["logits"], feeds)[0][0]
        with torch.no_grad():
            ref = lm.model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(got - ref).max() < 2e-3


def test_greedy_decoding_matches_with_kv_cache(exported) -> None:
    from slimlm.export.onnx import onnx_generate

    lm, _, _, sess = exported
    for text in PROMPTS:
        ids = lm.tokenizer(text)["input_ids"]
        got, _ = onnx_generate(sess, ids, 32)
        with torch.no_grad():
            ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert got == ref, text


def test_unsupported_architecture_refused(tmp_path) -> None:
    lm = slimlm.load("default")
    lm.model.config.model_type = "gemma3_text"  # as if it were another family: the writer checks the config
    try:
        with pytest.raises(SlimlmError, match="llama-family"):
            slimlm.export(lm, tmp_path / "o", format="onnx")
    finally:
        lm.model.config.model_type = "llama"
    assert not (tmp_path / "o").exists()
