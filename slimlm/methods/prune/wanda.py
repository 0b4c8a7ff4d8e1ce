"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Score each weight by ``|W_ij| · ‖X_j‖₂`` — its magnitude times the L2 norm of its input channel over
the calibration tokens — and drop the lowest scores *within each output row* (or within each N:M
group). One calibration pass, no weight update: the input-norm factor is what lets it beat
magnitude pruning on LLMs, whose activations have a few very large channels.
"""

from __future__ import annotations

import torch

from slimlm.methods import StepContext, StepReport, register_method
from slimlm.methods.linear import apply_to_linears, select_linears
from slimlm.methods.prune.masks import PruneConfig, check_nm, mark_pruned, score_mask


class WandaConfig(PruneConfig):
    """``sparsity`` or ``n``/``m``; see :class:`PruneConfig`."""


def wanda_mask(w: torch.Tensor, sq_norm: torch.Tensor, sparsity: float | None = None,
               n: int | None = None, m: int | None = None) -> torch.Tensor:
    """Keep-mask (out, in) for ``w`` (out, in) given ``sq_norm`` (in,) = Σ x_j² over calibration tokens."""
    score = w.abs().float() * sq_norm.float().sqrt()[None, :]  # (out, in)
    return score_mask(score, sparsity, n, m, per_row=True)


@register_method("wanda", WandaConfig, keeps_dense=lambda cfg: True)
def run_wanda(ctx: StepContext, cfg: WandaConfig) -> StepReport:
    targets = select_linears(ctx.model, ctx.arch, cfg, "wanda")
    check_nm(targets, cfg, "wanda")

    def transform(_name, linear, stats):
        w = linear.weight.data
        w.mul_(wanda_mask(w, stats.sq, cfg.sparsity, cfg.n, cfg.m))
        return linear

    names = list(targets)
    report = apply_to_linears(ctx.model, ctx.arch, targets, transform, method="wanda", kinds=frozenset({"sq"}),
                              calib_ids=ctx.calib_ids(), batch_size=ctx.calibration.batch_size,
                              propagate=ctx.calibration.propagate)
    mark_pruned(ctx.model, names, cfg.pattern())
    return report
