"""Round-to-nearest (RTN) weight quantization: the data-free baseline every other method must beat."""

from __future__ import annotations

import torch
from pydantic import Field

from slimlm.errors import SlimlmError
from slimlm.layers.quant import QuantLinear
from slimlm.methods import StepContext, StepReport, register_method
from slimlm.methods.linear import LinearStepConfig, apply_to_linears, select_linears
from slimlm.methods.quant.grid import round_to_nearest


class WeightQuantConfig(LinearStepConfig):
    """Shared by weight-only quantizers: ``group_size=-1`` means one group per output channel."""

    bits: int = Field(4, ge=2, le=8, description="bits per weight (2–8)")
    group_size: int = 128
    symmetric: bool = False


class RTNConfig(WeightQuantConfig):
    lm_head: bool = Field(False, description="also quantize lm_head (unties it from the embeddings)")


def resolve_group_size(group_size: int, in_features: int, name: str, where: str) -> int:
    """Columns per group for a layer: ``-1`` → whole row; a power of two may leave a partial last group."""
    if group_size == -1:
        return in_features
    power_of_two = group_size >= 8 and group_size & (group_size - 1) == 0
    if group_size <= 0 or (in_features % group_size and not power_of_two) or group_size > in_features:
        raise SlimlmError(
            f"{where}: group_size {group_size} does not fit in_features {in_features} of {name}",
            "use -1 (per channel), a divisor of every layer's input size, or a power of two ≤ the input size",
        )
    return group_size


def requantize_like(base: QuantLinear, w: torch.Tensor) -> QuantLinear:
    """RTN of ``w`` onto ``base``'s grid shape (bits, group size, symmetry): merged LoRA back into codes."""
    symmetric = bool((base.zeros == 2 ** (base.bits - 1)).all())
    bias = None if base.bias is None else base.bias.detach()
    return QuantLinear.from_quantized(round_to_nearest(w, base.bits, base.group_size, symmetric), bias)


def check_group_sizes(targets: dict, group_size: int, where: str) -> None:
    for name, mod in targets.items():
        resolve_group_size(group_size, mod.in_features, name, where)


@register_method("rtn", RTNConfig, needs_calibration=lambda cfg: False)
def run_rtn(ctx: StepContext, cfg: RTNConfig) -> StepReport:
    model, arch = ctx.model, ctx.arch
    targets = select_linears(model, arch, cfg, "rtn")
    if cfg.lm_head:
        head = model.get_submodule(arch.lm_head)
        targets[arch.lm_head] = head
        model.config.tie_word_embeddings = False  # the quantized head no longer shares the embedding
    check_group_sizes(targets, cfg.group_size, "rtn")

    def transform(name, linear, _stats):
        g = resolve_group_size(cfg.group_size, linear.in_features, name, "rtn")
        qw = round_to_nearest(linear.weight.detach(), cfg.bits, g, cfg.symmetric)
        return QuantLinear.from_quantized(qw, linear.bias)

    return apply_to_linears(model, arch, targets, transform, method="rtn")
