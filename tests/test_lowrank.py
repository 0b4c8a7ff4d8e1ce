"""Low-rank factorization: exactness and optimality of the factorizer, activation-aware SVD beating
plain SVD on a real layer with real calibration statistics, the ``LowRankLinear`` format (params,
artifact round trip, quantizing its factors in a chained recipe) and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimlm
from slimlm.config import CalibrationConfig
from slimlm.data import calibration_ids
from slimlm.errors import SlimlmError
from slimlm.layers.lowrank import LowRankLinear
from slimlm.layers.quant import QuantLinear
from slimlm.methods.lowrank.asvd import abs_scaling, whitening
from slimlm.methods.lowrank.common import factorize
from slimlm.models.load import count_params

CALIB = "calibration: {n_samples: 4, seqlen: 64, batch_size: 4}\n"
PROMPT = torch.tensor([[1, 504, 3158, 282, 260, 1345, 30, 2, 9, 100]])


def test_factorize_exact_at_full_rank_and_eckart_young():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    a, b = factorize(w, 8)
    torch.testing.assert_close(b @ a, w)
    x = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    a, b = factorize(w, 8, whitening(x.T @ x, damp=0.0))
    torch.testing.assert_close(b @ a, w)
    s = torch.linalg.svdvals(w)
    a, b = factorize(w, 3)  # plain truncation error = the dropped singular values
    assert float((w - b @ a).norm()) == pytest.approx(float(s[3:].norm()), rel=1e-9)


def test_lowrank_linear_forward_and_params():
    gen = torch.Generator().manual_seed(1)
    a, b, bias = torch.randn(3, 10, generator=gen), torch.randn(7, 3, generator=gen), torch.randn(7, generator=gen)
    layer = LowRankLinear.from_factors(a, b, bias)
    x = torch.randn(5, 10, generator=gen)
    torch.testing.assert_close(layer(x), x @ (b @ a).T + bias)
    torch.testing.assert_close(layer.weight, b @ a)
    assert count_params(nn.Sequential(layer)) == 3 * (10 + 7) + 7
    assert LowRankLinear.empty(layer.spec()).spec() == layer.spec()


@torch.no_grad()
def test_asvd_beats_svd_on_real_layer(default_lm):
    """up_proj of block 5 at 80% params; error measured on held-out calibration tokens."""
    layer = default_lm.model.model.layers[5].mlp.up_proj
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].reshape(-1, inp[0].shape[-1])))
    ids = calibration_ids(default_lm.tokenizer, CalibrationConfig(n_samples=4, seqlen=128))
    try:
        default_lm.model(input_ids=ids)
    finally:
        hook.remove()
    x = torch.cat(seen)  # (tokens, 576)
    fit, held = x[: len(x) // 2], x[len(x) // 2 :]
    w = layer.weight
    rank = int(0.8 * w.shape[0] * w.shape[1] / sum(w.shape))

    def out_error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((held @ (w - b @ a).T).pow(2).sum() / (held @ w.T).pow(2).sum())

    plain = out_error(*factorize(w, rank))
    whitened = out_error(*factorize(w, rank, whitening(fit.T @ fit, damp=0.01)))
    scaled = out_error(*factorize(w, rank, abs_scaling(fit.abs().sum(0), len(fit), 0.5)))
    assert whitened < 0.9 * plain, (whitened, plain)
    assert scaled < plain, (scaled, plain)


@pytest.mark.slow
@torch.no_grad()
def test_asvd_then_rtn_chain_saves_params_and_round_trips(fresh_default, tmp_path):
    before = count_params(fresh_default.model)
    recipe = CALIB + ("steps:\n  - asvd: {param_ratio: 0.8, targets: 'layers\\.(0|1)\\.'}\n"
                      "  - rtn: {bits: 8, group_size: 64, targets: 'layers\\.0\\.'}\n")
    result = slimlm.compress(fresh_default, recipe, out=tmp_path / "asvd")
    model = result.model.model
    q = model.model.layers[0].self_attn.q_proj
    k = model.model.layers[1].self_attn.k_proj
    assert isinstance(q, LowRankLinear) and isinstance(q.first, QuantLinear) and isinstance(q.second, QuantLinear)
    assert isinstance(k, LowRankLinear) and type(k.first) is nn.Linear and k.rank == int(0.8 * 576 * 192 / 768)
    per_block = sum(m.in_features * m.out_features for m in fresh_default.model.model.layers[2].modules() if type(m) is nn.Linear)
    saved = before - count_params(model)
    assert 2 * 0.19 * per_block < saved < 2 * 0.21 * per_block
    reloaded = slimlm.load(result.out)
    torch.testing.assert_close(reloaded.model(input_ids=PROMPT).logits, model(input_ids=PROMPT).logits, rtol=0, atol=1e-5)
    assert reloaded.info.n_params == count_params(model)
    assert result.reports[0].layer_errors["model.layers.1.mlp.down_proj"] < 0.5


@pytest.mark.parametrize("step, message", [
    ("svd: {rank: 600}", "rank 600 is larger than"),
    ("svd: {rank: 300, targets: 'q_proj'}", "saves no parameters"),
    ("svd: {param_ratio: 1.0}", "param_ratio must be in"),
    ("asvd: {param_ratio: 0}", "param_ratio must be in"),
    ("asvd: {param_ratio: 0.00001}", "leaves .* with rank 0"),
    ("svd: {param_ratio: 0.5, rank: 8}", "exactly one of param_ratio"),
    ("asvd: {}", "exactly one of param_ratio"),
    ("asvd: {param_ratio: 0.8, scaling: diag}", "scaling"),
])
def test_bad_lowrank_input(default_lm, step, message):
    with pytest.raises(SlimlmError, match=message):  # raised before any layer is changed
        slimlm.compress(default_lm, CALIB + f"steps:\n  - {step}\n")
    assert type(default_lm.model.model.layers[0].self_attn.q_proj) is nn.Linear
