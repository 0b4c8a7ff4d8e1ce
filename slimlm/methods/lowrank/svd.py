"""Plain truncated SVD: the data-free low-rank baseline (keeps the largest singular values of W)."""

from __future__ import annotations

from slimlm.methods import StepContext, StepReport, register_method
from slimlm.methods.lowrank.common import LowRankConfig, run_lowrank


class SVDConfig(LowRankConfig):
    pass


@register_method("svd", SVDConfig, needs_calibration=lambda cfg: False)
def run_svd(ctx: StepContext, cfg: SVDConfig) -> StepReport:
    return run_lowrank(ctx, cfg, "svd", lambda _stats: None, frozenset())
