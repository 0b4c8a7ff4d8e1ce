"""AWQ: exact invertibility of the folded scales, search/clip kernels vs RTN, a real SmolLM2 run, bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import slimlm
from slimlm.calibrate import capture_block_inputs
from slimlm.errors import SlimlmError
from slimlm.layers.quant import QuantLinear, dequantize
from slimlm.methods.quant.awq import ScaleGroup, apply_scales, awq_scales, scale_groups
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.methods.quant.grid import clip_grid, quantize_to_grid, round_to_nearest
from slimlm.models.arch import LLAMA, blocks



@pytest.fixture(scope="module")
def tiny_calib(tmp_path_factory) -> str:
    """Recipe header: 8 × 128 calibration tokens from a small text file (tokenizing all of Shakespeare is slow)."""
    from slimlm.data import load_text

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(load_text("shakespeare", "calib")[:60_000])
    return f"calibration: {{source: {path}, n_samples: 8, seqlen: 128}}\n"


def test_scales_fold_exactly_into_a_real_block(fresh_default) -> None:
    # Before rounding, AWQ must not change the function: every (producer → consumers) pair of a
    # SmolLM2 block, including v → o under grouped-query attention, gets random scales.
    lm = fresh_default
    ids = torch.randint(100, 5000, (2, 32), generator=torch.Generator().manual_seed(0))
    cap = capture_block_inputs(lm.model, lm.arch, ids, batch_size=2)
    block = blocks(lm.model, lm.arch)[0]
    with torch.no_grad():
        before = block(cap.inputs[0], **cap.kwargs[0][0])
        groups = scale_groups(block, lm.arch, head_dim=64)
        assert [g.prev for g in groups] == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]
        assert groups[1].rep == 3  # 9 query heads share 3 key/value heads
        gen = torch.Generator().manual_seed(1)
        for g in groups:
            width = block.get_submodule(g.consumers[0]).in_features
            s = torch.rand(width, generator=gen) * 3 + 0.25
            if g.rep > 1:  # one scale per v channel, repeated over the heads that read it
                s = s.view(-1, g.rep, g.head_dim)[:, :1].expand(-1, g.rep, -1).reshape(-1)
            apply_scales(block, lm.arch, g, s)
        after = block(cap.inputs[0], **cap.kwargs[0][0])
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


def test_scales_fold_into_offset_norms_exactly() -> None:
    # Gemma's RMSNorm computes x̂ · (1 + w): folding must respect the offset.
    class OffsetNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16) * 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)

    block = nn.Module()
    block.norm, block.lin = OffsetNorm(), nn.Linear(16, 8)
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = block.lin(block.norm(x))
        apply_scales(block, replace(LLAMA, norm_offset=1.0), ScaleGroup("norm", ("lin",)), torch.rand(16) + 0.5)
        after = block.lin(block.norm(x))
    assert torch.allclose(after, before, atol=1e-5)


def outlier_layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 64, generator=g)
    x[:, [3, 17, 40]] *= 20.0  # a few activation outlier channels, as in real LLMs
    w = torch.randn(32, 64, generator=g)
    return w, x, x.T @ x


def out_err(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w_hat - w).T).pow(2).sum())


@pytest.mark.parametrize("symmetric", [False, True])
def test_scale_search_beats_rtn_on_outlier_channels(symmetric: bool) -> None:
    w, x, h = outlier_layer()
    s, alpha = awq_scales([w], [32], x.abs().mean(0), h, bits=3, symmetric=symmetric, n_grid=20, search_rank=0)
    awq = round_to_nearest(w * s, 3, 32, symmetric).dequantize() / s
    rtn = round_to_nearest(w, 3, 32, symmetric).dequantize()
    assert alpha > 0 and out_err(w, awq, x) < 0.9 * out_err(w, rtn, x)
    s_sketch, _ = awq_scales([w], [32], x.abs().mean(0), h, bits=3, symmetric=symmetric, n_grid=20, search_rank=16)
    sketched = round_to_nearest(w * s_sketch, 3, 32, symmetric).dequantize() / s_sketch
    assert out_err(w, sketched, x) < out_err(w, rtn, x)  # the cheap sketched objective still finds a gain


def test_clip_search_never_worse_than_rtn_per_group() -> None:
    w, x, h = outlier_layer(seed=1)
    w[0, 0] = 12.0  # a weight outlier: clipping it should pay off
    scale, zero = clip_grid(w, h, bits=3, group_size=16, symmetric=False)
    clipped = dequantize(quantize_to_grid(w, scale, zero, 3, 16), scale, zero, 16, torch.float32)
    rtn = round_to_nearest(w, 3, 16, False).dequantize()
    for a in range(0, 64, 16):
        xs = x[:, a : a + 16]
        assert out_err(w[:, a : a + 16], clipped[:, a : a + 16], xs) <= out_err(w[:, a : a + 16], rtn[:, a : a + 16], xs) + 1e-3


@pytest.mark.slow
def test_awq_on_smollm2_saves_and_reloads_identically(fresh_default, tmp_path, tiny_calib) -> None:
    recipe = tiny_calib + 'steps:\n  - awq: {bits: 4, group_size: 128, n_grid: 6, targets: "layers\\\\.1\\\\."}\n'
    res = slimlm.compress(fresh_default, recipe, tmp_path / "awq")
    (report,) = res.reports
    assert len(report.layer_errors) == 7 and max(report.layer_errors.values()) < 0.1
    assert set(report.extra["alpha"]) == {f"model.layers.1.{p}" for p in
                                          ("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj")}
    quant = [n for n, m in res.model.model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 7
    ids = torch.arange(100, 164)[None]
    with torch.no_grad():
        before = res.model.model(input_ids=ids).logits
        after = slimlm.load(str(res.out)).model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_awq_scales_only_then_gptq(fresh_default, tiny_calib) -> None:
    """``quantize: false`` folds the searched scales and leaves a float model with the same function."""
    lm = fresh_default
    drop_blocks(lm.model, lm.arch, set(range(2, lm.info.n_layers)))  # two blocks keep the test quick
    ids = torch.arange(100, 164)[None]
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
    scaled = slimlm.compress(lm, tiny_calib + 'steps:\n  - awq: {n_grid: 6, quantize: false, targets: "layers\\\\.1\\\\."}\n')
    assert not any(isinstance(m, QuantLinear) for m in lm.model.modules())
    assert scaled.reports[0].extra["alpha"] and scaled.reports[0].layer_errors == {}
    with torch.no_grad():
        out = lm.model(input_ids=ids).logits
    # the same function up to float rounding of the rescaled weights
    assert (out - ref).abs().max() < 2e-3 * ref.abs().max() and torch.equal(out.argmax(-1), ref.argmax(-1))
    res = slimlm.compress(lm, tiny_calib + 'steps:\n  - gptq: {targets: "layers\\\\.1\\\\."}\n')
    assert sum(isinstance(m, QuantLinear) for m in lm.model.modules()) == 7
    assert max(res.reports[0].layer_errors.values()) < 0.1


@pytest.mark.parametrize("options, expected", [
    ("{bits: 9}", "less than or equal to 8"),
    ("{group_size: 100}", "group_size 100 does not fit"),
    ('{targets: "layers\\\\.99\\\\."}', "match no unconverted linear layer"),
    ("{n_grid: 0}", "n_grid"),
])
def test_awq_bad_options(default_lm, options: str, expected: str, tiny_calib) -> None:
    with pytest.raises(SlimlmError, match=expected):
        slimlm.compress(default_lm, tiny_calib + f"steps:\n  - awq: {options}\n")


def test_awq_calibration_text_too_short(default_lm, tmp_path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Now is the winter of our discontent. " * 20)
    recipe = f"calibration: {{source: {short}, n_samples: 8, seqlen: 128}}\nsteps:\n  - awq: {{bits: 4}}\n"
    with pytest.raises(SlimlmError, match="fewer than n_samples × seqlen"):
        slimlm.compress(default_lm, recipe)


def test_awq_non_finite_weights_and_activations(fresh_default, tiny_calib) -> None:
    model = fresh_default.model
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[1, 1] = float("inf")
    with pytest.raises(SlimlmError, match=r"weight of model\.layers\.2\.self_attn\.o_proj contains NaN or inf"):
        slimlm.compress(fresh_default, tiny_calib + "steps:\n  - awq: {bits: 4}\n")
    lm = slimlm.load("default")  # weights are checked block by block: the failed run converted blocks 0-1
    with torch.no_grad():
        lm.model.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(SlimlmError, match=r"activations reaching model\.layers\.0\.self_attn\.q_proj contain NaN or inf"):
        slimlm.compress(lm, tiny_calib + "steps:\n  - awq: {bits: 4}\n")
