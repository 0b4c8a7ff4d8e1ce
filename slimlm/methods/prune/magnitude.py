"""Magnitude pruning: drop the smallest |w| — the data-free baseline Wanda and SparseGPT must beat.

Unstructured masks rank weights over the whole layer (the baseline of Han et al. 2015 as used in the
Wanda and SparseGPT papers); N:M masks rank within each group of ``m`` inputs.
"""

from __future__ import annotations

import torch

from slimlm.methods import StepContext, StepReport, register_method
from slimlm.methods.linear import apply_to_linears, select_linears
from slimlm.methods.prune.masks import PruneConfig, check_nm, mark_pruned, score_mask


class MagnitudeConfig(PruneConfig):
    """``sparsity`` or ``n``/``m``; see :class:`PruneConfig`."""


def magnitude_mask(w: torch.Tensor, sparsity: float | None = None, n: int | None = None, m: int | None = None) -> torch.Tensor:
    """Keep-mask (out, in) of the largest-magnitude weights of ``w`` (out, in), per layer or per N:M group."""
    return score_mask(w.abs(), sparsity, n, m, per_row=False)


@register_method("magnitude", MagnitudeConfig, needs_calibration=lambda cfg: False, keeps_dense=lambda cfg: True)
def run_magnitude(ctx: StepContext, cfg: MagnitudeConfig) -> StepReport:
    targets = select_linears(ctx.model, ctx.arch, cfg, "magnitude")
    check_nm(targets, cfg, "magnitude")

    def transform(_name, linear, _stats):
        w = linear.weight.data
        w.mul_(magnitude_mask(w, cfg.sparsity, cfg.n, cfg.m))  # stays a plain Linear with exact zeros
        return linear

    names = list(targets)
    report = apply_to_linears(ctx.model, ctx.arch, targets, transform, method="magnitude")
    mark_pruned(ctx.model, names, cfg.pattern())
    return report
