"""Kernels of magnitude / Wanda / SparseGPT on small layers with known answers, and bad input."""

from __future__ import annotations

import pytest
import torch

import slimlm
from slimlm.errors import SlimlmError
from slimlm.layers.quant import dequantize
from slimlm.methods import METHODS, StepContext
from slimlm.methods.prune.magnitude import magnitude_mask
from slimlm.methods.prune.sparsegpt import sparsegpt_prune
from slimlm.methods.prune.wanda import wanda_mask
from slimlm.recipe import Recipe


def _layer(out: int = 16, inp: int = 64, tokens: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (out, in) and the Hessian Σ XᵀX of correlated inputs with a few loud channels, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)
    x = torch.randn(tokens, inp, generator=g) @ mix
    x[:, :4] *= 20.0  # outlier channels
    return w, x.T @ x


def _output_error(w: torch.Tensor, w_new: torch.Tensor, h: torch.Tensor) -> float:
    d = w_new - w
    return float(((d @ h) * d).sum())


def _all_prunes(w, h, **pattern):
    return {
        "magnitude": w * magnitude_mask(w, **pattern),
        "wanda": w * wanda_mask(w, torch.diag(h), **pattern),
        "sparsegpt": sparsegpt_prune(w, h, blocksize=16, **pattern)[0],
    }


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern_is_exact(n, m):
    w, h = _layer()
    for name, pruned in _all_prunes(w, h, n=n, m=m).items():
        per_group = (pruned != 0).reshape(w.shape[0], -1, m).sum(2)
        assert (per_group == n).all(), name  # random weights: exactly n survivors in every group


def test_unstructured_sparsity_and_scope():
    w, h = _layer()
    pruned = _all_prunes(w, h, sparsity=0.75)
    assert int((pruned["magnitude"] == 0).sum()) == int(w.numel() * 0.75)  # one threshold per layer
    assert ((pruned["wanda"] == 0).sum(1) == 48).all()  # per output row: 75 % of 64
    assert int((pruned["sparsegpt"] == 0).sum()) == int(w.numel() * 0.75)  # 16-column blocks, 75 % each
    kept_mag = magnitude_mask(w, sparsity=0.75)
    assert w[kept_mag].abs().min() >= w[~kept_mag].abs().max()


def test_wanda_keeps_the_right_weights():
    # Row 0: |w|·‖x‖ = [1·10, 2·1, 3·1, 4·0.1] = [10, 2, 3, 0.4] → keep columns 0 and 2.
    # Magnitude alone would keep columns 2 and 3; the loud input channel 0 is what Wanda protects.
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-4.0, 3.0, -2.0, 1.0]])
    sq = torch.tensor([100.0, 1.0, 1.0, 0.01])  # Σx² per input channel → norms [10, 1, 1, 0.1]
    mask = wanda_mask(w, sq, sparsity=0.5)
    assert mask.tolist() == [[True, False, True, False], [True, True, False, False]]
    assert magnitude_mask(w[:1], sparsity=0.5).tolist() == [[False, False, True, True]]
    assert wanda_mask(w, sq, n=1, m=2).tolist() == [[True, False, True, False], [True, False, True, False]]


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n": 2, "m": 4}, {"sparsity": 0.8}])
def test_sparsegpt_error_below_magnitude_and_wanda(pattern):
    w, h = _layer(out=32, inp=128)
    errs = {k: _output_error(w, v, h) for k, v in _all_prunes(w, h, **pattern).items()}
    assert errs["sparsegpt"] <= errs["magnitude"]
    assert errs["sparsegpt"] <= errs["wanda"]
    assert errs["wanda"] < errs["magnitude"]  # the input norms matter on outlier channels


def test_sparsegpt_joint_quantization():
    w, h = _layer(out=32, inp=96)
    dense, qw = sparsegpt_prune(w, h, n=2, m=4, bits=4, group_size=32, symmetric=True, blocksize=32)
    assert qw is not None and qw.scale.shape == (32, 3)
    assert torch.equal(dense, dequantize(qw.q, qw.scale, qw.zero, 32, torch.float32))
    assert ((dense != 0).reshape(32, -1, 4).sum(2) <= 2).all()  # pruned weights decode to exactly 0
    sparse_only, _ = sparsegpt_prune(w, h, n=2, m=4, blocksize=32)
    err_joint, err_sparse = _output_error(w, dense, h), _output_error(w, sparse_only, h)
    assert err_sparse <= err_joint < 1.5 * err_sparse  # 4 bits on top of 2:4 costs little


def test_sparsegpt_dead_inputs_are_pruned_not_nan():
    w, h = _layer(out=8, inp=32)
    h[5, :] = 0
    h[:, 5] = 0
    pruned, _ = sparsegpt_prune(w, h, sparsity=0.5, blocksize=16)
    assert torch.isfinite(pruned).all() and (pruned[:, 5] == 0).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("opts,match", [
    ({"sparsity": 0.0}, "sparsity must be in"),
    ({"sparsity": 1.0}, "sparsity must be in"),
    ({"sparsity": 1.5}, "sparsity must be in"),
    ({"n": 4, "m": 4}, "0 < n < m"),
    ({"n": 5, "m": 4}, "0 < n < m"),
    ({"n": 2}, "both n and m"),
    ({}, "give sparsity"),
    ({"sparsity": 0.5, "n": 2, "m": 4}, "either sparsity or n/m"),
])
def test_bad_config(method, opts, match):
    with pytest.raises(SlimlmError, match=match):
        Recipe.from_dict({"steps": [{method: opts}]})


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("opts,match", [
    ({"n": 2, "m": 5}, "m=5 does not divide in_features 576"),
    ({"sparsity": 0.5, "targets": "no_such_layer"}, "match no unconverted linear layer"),
])
def test_bad_input_on_real_model(default_lm, method, opts, match):
    """Checked before any weight changes, so the shared model stays intact."""
    step = Recipe.from_dict({"steps": [{method: opts}]}).steps[0]
    ctx = StepContext(default_lm.model, default_lm.arch, default_lm.tokenizer, Recipe([step]).calibration, "default")
    before = default_lm.model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(SlimlmError, match=match):
        METHODS.get(method).run(ctx, step.config)
    assert torch.equal(before, default_lm.model.model.layers[0].self_attn.q_proj.weight)


def test_bad_joint_group_size(default_lm):
    with pytest.raises(SlimlmError, match="group_size 100 does not fit"):
        slimlm.compress(default_lm, "steps:\n  - sparsegpt: {sparsity: 0.5, bits: 4, group_size: 100}\n")
