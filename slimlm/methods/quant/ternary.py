"""Ternary {-1, 0, +1} weights by absmean post-training quantization (BitNet b1.58,
Ma et al. 2024, https://arxiv.org/abs/2402.17764).

``γ = mean|W|`` per output channel (``group_size=-1``) or per group of input columns;
``W_t = clip(round(W / γ), -1, 1)``, ``W ≈ γ · W_t``. BitNet trains with this quantizer in the loop;
applied after training it destroys most of a model's quality — this step is the starting point for
quantization-aware distillation, not a finished compressor.

Storage: the packed 2-bit :class:`~slimlm.layers.quant.QuantLinear` format with code = t + 1 and a
fixed zero point of 1 (2 bits per weight plus one fp16 scale and one uint8 zero per group), so
ternary artifacts load and run with the same runtime layer as RTN. Base-3 packing (1.6 bits) would
save a further 20% of the codes; it is not implemented.
"""

from __future__ import annotations

import torch
from pydantic import Field

from slimlm.layers.quant import QuantizedWeight, QuantLinear
from slimlm.methods import StepContext, StepReport, register_method
from slimlm.methods.linear import LinearStepConfig, apply_to_linears, require_finite_weights, select_linears
from slimlm.methods.quant.grid import _pad_groups
from slimlm.methods.quant.rtn import check_group_sizes, resolve_group_size


class TernaryConfig(LinearStepConfig):
    group_size: int = Field(-1, description="-1: one absmean scale per output channel; else columns per group")


def ternary_quantize(w: torch.Tensor, group_size: int) -> QuantizedWeight:
    """Absmean ternary codes of ``w`` (out, in) as a 2-bit grid: q = t + 1 ∈ {0, 1, 2}, zero point 1."""
    g = _pad_groups(w.float(), group_size)  # (out, n_groups, group)
    gamma = g.abs().mean(dim=2).clamp(min=1e-8).to(torch.float16)  # (out, n_groups)
    gamma = gamma.clamp(min=torch.finfo(torch.float16).tiny)
    t = torch.round(g / gamma.float()[..., None]).clamp(-1, 1)
    q = (t + 1).reshape(w.shape[0], -1)[:, : w.shape[1]].to(torch.uint8)
    return QuantizedWeight(q=q, scale=gamma, zero=torch.ones_like(gamma, dtype=torch.uint8), bits=2, group_size=group_size)


@register_method("ternary", TernaryConfig, needs_calibration=lambda cfg: False)
def run_ternary(ctx: StepContext, cfg: TernaryConfig) -> StepReport:
    targets = select_linears(ctx.model, ctx.arch, cfg, "ternary")
    check_group_sizes(targets, cfg.group_size, "ternary")

    def transform(name, linear, _stats):
        require_finite_weights({name: linear}, "ternary")  # per layer, not up front
        g = resolve_group_size(cfg.group_size, linear.in_features, name, "ternary")
        return QuantLinear.from_quantized(ternary_quantize(linear.weight.detach(), g), linear.bias)

    return apply_to_linears(ctx.model, ctx.arch, targets, transform, method="ternary")
