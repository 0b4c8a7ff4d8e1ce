"""Shared pieces of the low-rank methods: the step config, per-layer rank choice and the factorizer.

Truncated SVD of ``W M`` (``M`` = identity for plain SVD, an activation-derived matrix for the
activation-aware variant) keeps the rank-r approximation that is optimal for ``‖(W − W′) M‖_F``;
multiplying back by ``M⁻¹`` (a triangular solve) gives factors ``B (out, r)`` and ``A (r, in)`` with ``W′ = B A``.
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field, model_validator
from torch import nn

from slimlm.calibrate import LinearStats
from slimlm.errors import SlimlmError
from slimlm.layers.lowrank import LowRankLinear
from slimlm.methods import StepContext, StepReport
from slimlm.methods.linear import LinearStepConfig, apply_to_linears, select_linears


class LowRankConfig(LinearStepConfig):
    """Either ``param_ratio`` (fraction of each layer's weights kept) or a fixed ``rank``."""

    param_ratio: float | None = Field(None, description="kept fraction of each factorized layer's parameters, in (0, 1)")
    rank: int | None = Field(None, description="fixed rank for every targeted layer (alternative to param_ratio)")

    @model_validator(mode="after")
    def _one_budget(self) -> "LowRankConfig":
        if (self.param_ratio is None) == (self.rank is None):
            raise ValueError("give exactly one of param_ratio (e.g. 0.8) or rank")
        if self.param_ratio is not None and not 0.0 < self.param_ratio < 1.0:
            raise ValueError(f"param_ratio must be in (0, 1), got {self.param_ratio}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {self.rank}")
        return self


def choose_rank(cfg: LowRankConfig, out_f: int, in_f: int, name: str, where: str) -> int | None:
    """Rank for one ``(out_f, in_f)`` layer, or ``None`` when factoring would not save parameters."""
    full = min(out_f, in_f)
    if cfg.rank is not None:
        if cfg.rank > full:
            raise SlimlmError(f"{where}: rank {cfg.rank} is larger than {name} allows ({out_f}×{in_f}: at most {full})",
                              f"use a rank ≤ {full}, or param_ratio instead of a fixed rank")
        rank = cfg.rank
    else:
        rank = int(cfg.param_ratio * out_f * in_f / (out_f + in_f))  # type: ignore[operator]
        if rank < 1:
            raise SlimlmError(f"{where}: param_ratio {cfg.param_ratio} leaves {name} ({out_f}×{in_f}) with rank 0",
                              "raise param_ratio or exclude this layer")
    return rank if rank * (out_f + in_f) < out_f * in_f else None


@torch.no_grad()
def factorize(w: torch.Tensor, rank: int, m: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``(A (r, in), B (out, r))`` of ``w (out, in)`` optimal in ‖(W − BA) M‖_F.

    ``m (in, in)`` is lower triangular (a Cholesky factor or a diagonal) built from activation
    statistics; ``None`` = plain SVD. ``A = √Σ Vᵀ M⁻¹`` is a triangular solve, never an explicit
    inverse. Singular values are split evenly (√Σ on each side) so both factors have similar
    ranges, which keeps a later quantization step well conditioned.
    """
    wc = w.double() if w.dtype == torch.float64 else w.float()
    target = wc @ m.to(wc.dtype) if m is not None else wc  # (out, in)
    u, s, vh = torch.linalg.svd(target, full_matrices=False)  # u (out, k), s (k,), vh (k, in)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root  # (out, r)
    a = root[:, None] * vh[:rank]  # (r, in)
    if m is not None:
        a = torch.linalg.solve_triangular(m.to(wc.dtype), a, upper=False, left=False)  # a M⁻¹
    return a.to(w.dtype), b.to(w.dtype)


Scaler = Callable[[LinearStats | None], torch.Tensor | None]


def run_lowrank(ctx: StepContext, cfg: LowRankConfig, method: str, scaler: Scaler, kinds: frozenset[str]) -> StepReport:
    """Factor every targeted linear whose chosen rank saves parameters; ``scaler`` gives M (or None)."""
    targets = select_linears(ctx.model, ctx.arch, cfg, method)
    ranks = {n: choose_rank(cfg, m.out_features, m.in_features, n, method) for n, m in targets.items()}
    targets = {n: m for n, m in targets.items() if ranks[n] is not None}
    if not targets:
        raise SlimlmError(f"{method}: rank {cfg.rank} saves no parameters on any targeted layer",
                          "use a smaller rank (rank·(in+out) must be < in·out) or param_ratio")

    def transform(name: str, linear: nn.Linear, stats: LinearStats | None) -> nn.Module:
        w = linear.weight.detach()
        a, b = factorize(w, ranks[name], scaler(stats))
        return LowRankLinear.from_factors(a, b, linear.bias.detach() if linear.bias is not None else None)

    report = apply_to_linears(ctx.model, ctx.arch, targets, transform, method=method, kinds=kinds,
                              calib_ids=ctx.calib_ids() if kinds else None, batch_size=ctx.calibration.batch_size,
                              propagate=ctx.calibration.propagate)
    report.extra["ranks"] = ranks
    return report
