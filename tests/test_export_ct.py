"""compressed-tensors export: loaded by transformers with the compressed-tensors package, codes byte for byte.

SmolLM2-135M truncated to 2 blocks. Symmetric and W8A8 exports load through ``AutoModelForCausalLM``. An
asymmetric export in the format's own layout (packed zero points, what vLLM reads) is decompressed with
compressed-tensors' ``PackedQuantizationCompressor``: transformers 5.24 + compressed-tensors 0.20 build the
zero-point parameter unpacked on the meta device and reject every such checkpoint, ours and
llm-compressor's alike (vllm-project/llm-compressor#1618); ``zero_points="padded"`` writes the same values
in the shape they accept, and that export loads through ``AutoModelForCausalLM`` with identical logits.
"""

from __future__ import annotations

import json

import pytest
import torch

import slimlm
from slimlm.errors import SlimlmError
from slimlm.layers.quant import QuantLinear
from slimlm.methods.prune.layerdrop import drop_blocks

pytest.importorskip("compressed_tensors")
TEXT = "The capital of France is Paris, and the capital of Germany is"


def truncated(recipe: str, n: int = 2) -> slimlm.LoadedModel:
    lm = slimlm.load("default")
    drop_blocks(lm.model, lm.arch, set(range(n, lm.info.n_layers)))
    return slimlm.compress(lm, recipe).model


def hf_load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def logits(model, tok) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tok(TEXT)["input_ids"]])).logits[0]


def test_w4a16_symmetric_loads_in_transformers_exactly(tmp_path) -> None:
    lm = truncated("steps:\n  - rtn: {bits: 4, group_size: 64, symmetric: true}\n")
    res = slimlm.export(lm, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"], w["strategy"]) == (4, 64, True, "group")
    assert set(res.tensor_types.values()) == {"W4A16"}
    m = hf_load(tmp_path / "ct")
    assert torch.allclose(logits(m, lm.tokenizer), logits(lm.model, lm.tokenizer), atol=1e-4)


def test_w4a16_asymmetric_codes_and_zero_points_exact(tmp_path) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    lm = truncated("steps:\n  - rtn: {bits: 4, group_size: 64}\n")
    slimlm.export(lm, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["symmetric"] is False
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**group["weights"]))
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    n = 0
    for name, mod in lm.model.named_modules():
        if isinstance(mod, QuantLinear):
            local = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            assert local["weight_zero_point"].shape == (mod.out_features // 8, mod.in_features // 64)  # packed along out
            out = PackedQuantizationCompressor.decompress(local, scheme)
            assert torch.equal(out["weight"].float(), mod.weight_dequantized(torch.float32)), name
            n += 1
    assert n == 14


def test_w4a16_asymmetric_padded_zero_points_load_in_transformers(tmp_path) -> None:
    lm = truncated("steps:\n  - rtn: {bits: 4, group_size: 64}\n")
    slimlm.export(lm, tmp_path / "ct", format="compressed-tensors", zero_points="padded")
    m = hf_load(tmp_path / "ct")
    assert torch.allclose(logits(m, lm.tokenizer), logits(lm.model, lm.tokenizer), atol=1e-4)


def test_w8a8_smoothquant_loads(tmp_path) -> None:
    lm = truncated("calibration: {source: shakespeare, n_samples: 4, seqlen: 128}\nsteps:\n  - smoothquant: {alpha: 0.5}\n")
    slimlm.export(lm, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    g = qc["config_groups"]["group_0"]
    assert g["input_activations"]["strategy"] == "token" and g["input_activations"]["dynamic"] is True
    m = hf_load(tmp_path / "ct")
    a, b = logits(m, lm.tokenizer), logits(lm.model, lm.tokenizer)
    # transformers runs the decompressed int8 weights on fp activations; slimlm rounds activations per token
    assert ((a - b).abs().max(-1).values / b.abs().max(-1).values).max() < 0.03
    assert torch.equal(a[-1].argmax(), b[-1].argmax())


def test_partial_group_and_unsupported_refused(tmp_path) -> None:
    lm = truncated("steps:\n  - rtn: {bits: 4, group_size: 128}\n", n=1)
    with pytest.raises(SlimlmError, match=r"q_proj: group_size 128 leaves a partial last group.*--format gguf"):
        slimlm.export(lm, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists() and not list(tmp_path.iterdir())
    lm = truncated("steps:\n  - nf4: {}\n", n=1)
    with pytest.raises(SlimlmError, match="nf4_linear"):
        slimlm.export(lm, tmp_path / "ct", format="compressed-tensors")
