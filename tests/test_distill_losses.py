"""Distillation losses against straightforward reference formulas, on small random logits."""

from __future__ import annotations

import math

import pytest
import torch

from slimlm.distill.data import dense_from_topk, topk_log_probs
from slimlm.distill.losses import divergence, hidden_mse, lm_loss, teacher_log_probs, uniform_layer_map
from slimlm.distill.trainer import DistillConfig, lr_factor
from slimlm.errors import SlimlmError

torch.manual_seed(0)
S = torch.randn(2, 5, 11, dtype=torch.float64)  # (B, T, V) student logits
TL = torch.randn(2, 5, 11, dtype=torch.float64) * 2  # teacher logits


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p / q).log()).sum(-1).mean()


def loss(name: str, s=S, t=TL, **kw) -> torch.Tensor:
    temp = kw.pop("temperature", 1.0)
    return divergence(name, s, teacher_log_probs(t, temp), temperature=temp, **kw).double()


def probs(x: torch.Tensor, temp: float = 1.0) -> torch.Tensor:
    return torch.softmax(x.double() / temp, -1)


def test_kl_family_matches_reference() -> None:
    p, q = probs(TL), probs(S)
    assert loss("fkl").item() == pytest.approx(ref_kl(p, q).item(), rel=1e-5)
    assert loss("rkl").item() == pytest.approx(ref_kl(q, p).item(), rel=1e-5)
    a = 0.3
    assert loss("skl", alpha=a).item() == pytest.approx(ref_kl(p, a * p + (1 - a) * q).item(), rel=1e-5)
    assert loss("srkl", alpha=a).item() == pytest.approx(ref_kl(q, (1 - a) * p + a * q).item(), rel=1e-5)
    b = 0.2
    m = b * p + (1 - b) * q
    assert loss("jsd", beta=b).item() == pytest.approx((b * ref_kl(p, m) + (1 - b) * ref_kl(q, m)).item(), rel=1e-5)
    assert loss("tvd").item() == pytest.approx(0.5 * (p - q).abs().sum(-1).mean().item(), rel=1e-5)


def test_skew_limits_and_temperature_scaling() -> None:
    assert loss("skl", alpha=0.0).item() == pytest.approx(loss("fkl").item(), rel=1e-6)
    assert loss("srkl", alpha=0.0).item() == pytest.approx(loss("rkl").item(), rel=1e-6)
    assert loss("skl", alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # T² · KL(p_T ‖ q_T)
    ref = 4.0 * ref_kl(probs(TL, 2.0), probs(S, 2.0))
    assert loss("fkl", temperature=2.0).item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["fkl", "rkl", "skl", "srkl", "jsd", "tvd"])
def test_divergence_of_a_distribution_with_itself_is_zero(name: str) -> None:
    assert abs(loss(name, s=TL, t=TL).item()) < 1e-6
    assert loss(name).item() > 1e-3


def test_jsd_symmetric_at_half() -> None:
    assert loss("jsd", beta=0.5).item() == pytest.approx(loss("jsd", s=TL, t=S, beta=0.5).item(), rel=1e-6)
    assert loss("jsd", beta=0.1).item() != pytest.approx(loss("jsd", s=TL, t=S, beta=0.1).item(), rel=1e-3)


def test_mask_ignores_masked_positions() -> None:
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 3:] = False
    garbage = S.clone()
    garbage[:, 3:] = 1e3 * torch.randn(2, 2, 11, dtype=torch.float64)
    a = divergence("fkl", S, teacher_log_probs(TL), mask)
    b = divergence("fkl", garbage, teacher_log_probs(TL), mask)
    ref = ref_kl(probs(TL[:, :3]), probs(S[:, :3]))
    assert a.item() == pytest.approx(ref.item(), rel=1e-5) and b.item() == pytest.approx(a.item(), rel=1e-9)


@pytest.mark.parametrize("name", ["fkl", "rkl", "skl", "srkl", "jsd", "tvd"])
def test_gradients_finite_at_extreme_logits(name: str) -> None:
    s = torch.zeros(1, 3, 7, dtype=torch.float32)
    s[..., 0] = 1e4
    s[..., 1] = -1e4
    s.requires_grad_(True)
    t = torch.zeros(1, 3, 7)
    t[..., 6] = 5e3
    t[..., 0] = -5e3
    out = divergence(name, s, teacher_log_probs(t), alpha=0.1, beta=0.5)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_lm_loss_is_cross_entropy() -> None:
    ids = torch.randint(0, 11, (2, 5))
    ref = torch.nn.functional.cross_entropy(S[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert lm_loss(S, ids).item() == pytest.approx(ref.item(), rel=1e-6)


def test_hidden_mse_and_layer_map() -> None:
    assert uniform_layer_map(2, 6) == [(1, 3), (2, 6)]
    hs = [torch.zeros(1, 2, 3), torch.ones(1, 2, 3), torch.ones(1, 2, 3)]
    ht = [torch.zeros(1, 2, 3)] * 3
    assert hidden_mse(hs, ht, [(1, 1), (2, 2)]).item() == pytest.approx(1.0)


def test_topk_cache_is_a_distribution_and_exact_at_full_k() -> None:
    logp = teacher_log_probs(TL.float())
    vals, idx = topk_log_probs(logp, 3)
    dense = dense_from_topk(vals, idx, 11)
    assert torch.allclose(dense.exp().sum(-1), torch.ones(2, 5), atol=1e-3)
    full = dense_from_topk(*topk_log_probs(logp, 11), 11)
    assert torch.allclose(full, logp, atol=1e-2)


def test_schedules() -> None:
    cos = DistillConfig(steps=100, schedule="cosine", min_lr_ratio=0.1, warmup_steps=10)
    assert lr_factor(0, cos) == pytest.approx(0.1) and lr_factor(10, cos) == pytest.approx(1.0)
    assert lr_factor(99, cos) == pytest.approx(0.1, abs=0.01)
    wsd = DistillConfig(steps=100, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, wsd) == 1.0 and lr_factor(79, wsd) == 1.0 and lr_factor(99, wsd) == pytest.approx(0.0)
    assert 0 < lr_factor(90, wsd) < 1


def test_bad_loss_options() -> None:
    with pytest.raises(SlimlmError, match="unknown distillation loss"):
        divergence("kl", S, TL)
    with pytest.raises(SlimlmError, match="out of range"):
        divergence("skl", S, TL, alpha=1.5)
    assert math.isfinite(loss("fkl").item())
