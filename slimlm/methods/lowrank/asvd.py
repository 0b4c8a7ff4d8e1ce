"""Activation-aware SVD: truncate ``W M`` instead of ``W``, where ``M`` comes from calibration inputs.

Two choices of ``M`` (option ``scaling``):

* ``whiten`` (default) — SVD-LLM (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value
  Decomposition for LLM Compression"): ``M = L`` with ``L Lᵀ = XᵀX`` (Cholesky). Then
  ``‖(W − W′) X‖_F = ‖(W − W′) L‖_F``, so truncating the SVD of ``W L`` is the *optimal* rank-r
  approximation for the layer's output error on the calibration data.
* ``abs`` — ASVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition"):
  ``M = diag(mean|x|^alpha)``, a per-input-channel scaling that protects channels with large
  activations; cheaper statistics, weaker than whitening.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from slimlm.calibrate import LinearStats
from slimlm.methods import StepContext, StepReport, register_method
from slimlm.methods.lowrank.common import LowRankConfig, run_lowrank


class ASVDConfig(LowRankConfig):
    scaling: Literal["whiten", "abs"] = "whiten"
    alpha: float = Field(0.5, gt=0, le=2, description="exponent of mean|x| for scaling=abs")
    damp: float = Field(0.01, ge=0, lt=1, description="ridge added to XᵀX as a fraction of its mean diagonal")


def whitening(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower-triangular ``L`` with ``L Lᵀ = XᵀX + damp·mean(diag)·I`` (float64 Cholesky); the ridge
    keeps it defined when some input channels are (nearly) constant on the calibration data."""
    h = hessian.double()  # (in, in)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    h = h + (damp * h.diagonal().mean().clamp(min=1e-12)) * eye
    return torch.linalg.cholesky(h).to(hessian.dtype)


def abs_scaling(abs_sum: torch.Tensor, n_tokens: int, alpha: float) -> torch.Tensor:
    """``diag(s)`` with ``s = (mean|x|)^alpha`` per input channel."""
    return torch.diag((abs_sum / max(n_tokens, 1)).clamp(min=1e-8).pow(alpha))  # (in, in)


@register_method("asvd", ASVDConfig)
def run_asvd(ctx: StepContext, cfg: ASVDConfig) -> StepReport:
    def scaler(stats: LinearStats | None) -> torch.Tensor:
        assert stats is not None
        if cfg.scaling == "whiten":
            return whitening(stats.hessian, cfg.damp)  # type: ignore[arg-type]
        return abs_scaling(stats.abs, stats.n_tokens, cfg.alpha)  # type: ignore[arg-type]

    kinds = frozenset({"hessian"}) if cfg.scaling == "whiten" else frozenset({"abs"})
    report = run_lowrank(ctx, cfg, "asvd", scaler, kinds)
    report.extra["scaling"] = cfg.scaling
    return report
