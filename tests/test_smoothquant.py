"""SmoothQuant W8A8: int8 kernel, exact smoothing, contract on SmolLM2 (few layers), bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimlm
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.errors import SlimlmError
from slimlm.layers.int8 import Int8Linear, int8_matmul, quantize_per_row, set_int8_kernel
from slimlm.methods.quant.smoothquant import smooth_block, smooth_into_norm, smoothing_scales

CALIB = "calibration: {n_samples: 4, seqlen: 64, batch_size: 4}\n"


def truncate(lm: slimlm.LoadedModel, n: int = 2) -> slimlm.LoadedModel:
    """Keep the first ``n`` decoder blocks of a private model copy (fast, still real weights)."""
    drop_blocks(lm.model, lm.arch, set(range(n, lm.info.n_layers)))
    return lm


def test_int8_matmul_kernels_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 24), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 7), generator=gen, dtype=torch.int8)
    ref = a.long() @ b.long()
    for kernel in ("int_mm", "int32", "auto"):
        out = int8_matmul(a, b, kernel)
        assert out.dtype == torch.int32 and torch.equal(out.long(), ref)


def test_int8_linear_matches_fp_within_quantization_error() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    q = Int8Linear.from_linear(lin.weight, lin.bias)
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() <= 127
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        ref, out = lin(x), q(x)
    # per-element bound: weight step/2 · Σ|x| + activation step/2 · Σ|w|, summed over the input dim
    w_step = q.w_scale.float()[None, None, :]
    x_step = x.abs().amax(-1, keepdim=True) / 127
    bound = (w_step / 2) * x.abs().sum(-1, keepdim=True) + (x_step / 2) * lin.weight.abs().sum(1)[None, None, :]
    assert ((out - ref).abs() <= bound + 1e-5).all()
    assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 1e-3
    set_int8_kernel(q, "int_mm")
    a = q(x)
    set_int8_kernel(q, "int32")
    assert torch.equal(a, q(x))  # both kernels give identical accumulators


def test_quantize_per_row_known_answer() -> None:
    q, s = quantize_per_row(torch.tensor([[1.27, -0.635, 0.0]]))
    assert q.tolist() == [[127, -64, 0]] and torch.allclose(s, torch.tensor([[0.01]]))


def test_smoothing_scales_formula() -> None:
    s = smoothing_scales(torch.tensor([4.0, 0.0, 9.0]), torch.tensor([1.0, 2.0, 4.0]), 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 1.0, 1.5]))  # 4^.5/1^.5, dead channel → 1, 9^.5/4^.5


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_smoothing_into_norm_is_exact(offset: float) -> None:
    """y = W · (n ⊙ (off + g)) is unchanged by g ← (off + g)/s − off, W ← W·s (Gemma uses off = 1)."""
    torch.manual_seed(0)
    norm = nn.Module()
    norm.weight = nn.Parameter(torch.rand(16) + 0.5)
    lins = [nn.Linear(16, 8, bias=False), nn.Linear(16, 4, bias=False)]
    n = torch.randn(5, 16)
    before = [lin(n * (offset + norm.weight)) for lin in lins]
    smooth_into_norm(norm, lins, torch.rand(16) * 4 + 0.25, offset)
    after = [lin(n * (offset + norm.weight)) for lin in lins]
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-5)


def test_smooth_block_keeps_real_block_outputs(fresh_default) -> None:
    lm = truncate(fresh_default, 1)
    ids = lm.tokenizer("The tower is 324 metres tall, about the same height as an 81-storey building.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = lm.model(ids).logits
    block, arch = lm.model.model.layers[0], lm.arch
    xmax = {"attn_in": torch.rand(576) * 20, "mlp_in": torch.rand(576) * 20, "down_in": torch.rand(1536) * 5}
    wanted = {"self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"}
    assert smooth_block(block, arch, xmax, 0.5, True, wanted) == ["qkv", "gate_up", "down"]
    with torch.no_grad():
        out = lm.model(ids).logits
    assert torch.allclose(out, ref, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_smoothquant_contract_save_reload_and_chain(fresh_default, tmp_path, wikitext_eval) -> None:
    lm = truncate(fresh_default, 2)
    recipe = "steps:\n  - magnitude: {sparsity: 0.3, targets: 'mlp'}\n  - smoothquant: {alpha: 0.5}\n" + CALIB
    res = slimlm.compress(lm, recipe, out=tmp_path / "w8a8")
    mods = dict(lm.model.named_modules())
    assert all(isinstance(mods[f"model.layers.{i}.{p}"], Int8Linear) for i in range(2)
               for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"))
    assert res.reports[1].extra["smoothed"]["model.layers.0"] == ["qkv", "gate_up", "down"]
    assert all(e < 0.05 for e in res.reports[1].block_errors.values())
    again = slimlm.load(str(tmp_path / "w8a8"))
    ids = lm.tokenizer(wikitext_eval[:400], return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, again.model(ids).logits)


@pytest.mark.parametrize("options, match", [("{alpha: 1.5}", "alpha"), ("{alpha: -0.1}", "alpha"), ("{bits: 4}", "bits=8 only")])
def test_smoothquant_bad_options(options: str, match: str) -> None:
    with pytest.raises(SlimlmError, match=match):
        slimlm.Recipe.from_yaml(f"steps:\n  - smoothquant: {options}\n")


def test_smoothquant_targets_matching_nothing(fresh_default) -> None:
    with pytest.raises(SlimlmError, match="match no"):
        slimlm.compress(truncate(fresh_default, 1), "steps:\n  - smoothquant: {targets: no_such_layer}\n" + CALIB)


def test_smoothquant_rejects_non_finite(fresh_default) -> None:
    lm = truncate(fresh_default, 1)
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SlimlmError, match="NaN or inf"):
        slimlm.compress(lm, "steps:\n  - smoothquant: {}\n" + CALIB)
    lm = truncate(slimlm.load("default"), 1)
    with torch.no_grad():
        lm.model.model.layers[0].input_layernorm.weight[3] = float("inf")  # activations become inf
    with pytest.raises(SlimlmError, match="activations .* NaN or inf"):
        slimlm.compress(lm, "steps:\n  - smoothquant: {}\n" + CALIB)
