"""NF4 with double quantization (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

Data-free: each block of 64 weights is scaled by its absmax into [-1, 1] and rounded to the nearest
of the 16 NormalFloat levels (quantiles of a normal distribution, which is what pretrained weights
look like). Double quantization stores the block absmaxes as int8 around their mean with one fp32
scale per 256 of them (bitsandbytes uses an 8-bit dynamic-tree code there; a linear int8 code is
used here). Codes are chosen against the *dequantized* absmax, so the artifact is what was measured.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from slimlm.layers.nf4 import NF4Linear, dequantize_absmax, nf4_codebook
from slimlm.methods import StepContext, StepReport, register_method
from slimlm.methods.linear import LinearStepConfig, apply_to_linears, require_finite_weights, select_linears


class NF4Config(LinearStepConfig):
    bits: int = Field(4, description="NF4 is 4-bit only")
    block_size: int = Field(64, description="weights per absmax block (power of two, 16–4096)")
    double_quant: bool = True
    dq_block_size: int = Field(256, description="absmaxes per second-level fp32 scale (power of two)")

    @field_validator("bits")
    @classmethod
    def _only_four(cls, v: int) -> int:
        if v != 4:
            raise ValueError(f"nf4 has 16 levels, so bits must be 4 (got {v}); use rtn/gptq for other bit widths")
        return v

    @field_validator("block_size", "dq_block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v > 4096 or v & (v - 1):
            raise ValueError(f"block sizes must be powers of two in [16, 4096] (got {v})")
        return v


def double_quantize(absmax: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax (n,) fp32 → (int8 codes (n,), fp32 scale per ``block`` codes, fp32 offset (1,))."""
    offset = absmax.mean().reshape(1)
    centered = absmax - offset
    pad = (-centered.numel()) % block
    groups = F.pad(centered, (0, pad)).view(-1, block)  # (n_blocks2, block)
    scale = groups.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(groups / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[: absmax.numel()]
    return q, scale, offset


def nf4_quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = True, dq_block_size: int = 256) -> dict[str, torch.Tensor]:
    """Buffers of an :class:`NF4Linear` for weight ``w`` (out, in): packed codes and block scales."""
    flat = w.detach().float().reshape(-1)
    blocks = F.pad(flat, (0, (-flat.numel()) % block_size)).view(-1, block_size)  # (n_blocks, block)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    out: dict[str, torch.Tensor] = {}
    if double_quant:
        q, scale, offset = double_quantize(absmax, dq_block_size)
        out.update(absmax_q=q, absmax_scale=scale, absmax_offset=offset)
        absmax = dequantize_absmax(q, scale, offset, dq_block_size)
    else:
        out["absmax"] = absmax
    book = nf4_codebook(torch.float32).to(w.device)
    mids = (book[1:] + book[:-1]) / 2  # (15,) decision thresholds between neighbouring levels
    normed = (blocks / absmax.clamp(min=1e-12)[:, None]).clamp(-1, 1)
    codes = torch.bucketize(normed, mids).to(torch.uint8).reshape(-1)  # nearest level index in [0, 16)
    out["qweight"] = codes[0::2] | (codes[1::2] << 4)  # two per byte, low nibble first (unpack_bits' layout)
    return out


@register_method("nf4", NF4Config, needs_calibration=lambda cfg: False)
def run_nf4(ctx: StepContext, cfg: NF4Config) -> StepReport:
    targets = select_linears(ctx.model, ctx.arch, cfg, "nf4")
    bits: list[float] = []

    def transform(name, linear, _stats):
        require_finite_weights({name: linear}, "nf4")  # per layer, not up front
        layer = NF4Linear(linear.in_features, linear.out_features, linear.bias is not None, cfg.block_size,
                          cfg.double_quant, cfg.dq_block_size).to(linear.weight.device)
        for key, t in nf4_quantize(linear.weight, cfg.block_size, cfg.double_quant, cfg.dq_block_size).items():
            setattr(layer, key, t)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.detach().clone())
        bits.append(layer.bits_per_weight())
        return layer

    n = [t.weight.numel() for t in targets.values()]
    report = apply_to_linears(ctx.model, ctx.arch, targets, transform, method="nf4")
    report.extra["bits_per_weight"] = sum(b * k for b, k in zip(bits, n)) / max(math.fsum(n), 1)
    return report
